//! Errors of the reference executor. Every problem with the inputs, parameters or bindings a
//! caller supplies is reported as an [`ExecError`] naming what is wrong, never as a panic.

use kiln_ir::{DType, ValueId, VerifyError};

/// Why a graph could not be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The graph failed [`kiln_ir::verify()`].
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// A graph input was not supplied.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// A supplied input is not an input of the graph (most likely a misspelt name).
    #[error("`{0}` is not an input of the graph")]
    UnknownInput(String),
    /// An output asked for is not one of the graph's (a name, or `#i` for a position).
    #[error("`{0}` is not an output of the graph")]
    UnknownOutput(String),
    /// A parameter was not found in the parameter source.
    #[error("missing parameter `{0}`")]
    MissingParam(String),
    /// An input or parameter has the wrong dtype, rank or size.
    #[error("{kind} `{name}` should be {expected} but is {got}")]
    InputType {
        /// `"input"` or `"param"`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The declared type, e.g. `f32[batch, 7]`.
        expected: String,
        /// The supplied tensor's type, e.g. `f32[2, 8]`.
        got: String,
    },
    /// Two inputs or parameters give a size symbol different values.
    #[error("size symbol `{sym}` is {first_value} from {first} but {second_value} from {second}")]
    DimConflict {
        /// The symbol.
        sym: String,
        /// Where it was bound first, e.g. ``input `x` axis 0``.
        first: String,
        /// The first value.
        first_value: i64,
        /// Where the conflicting size was found.
        second: String,
        /// The conflicting value.
        second_value: i64,
    },
    /// A size symbol is needed but no input, parameter or explicit binding determines it.
    #[error("size symbol `{sym}` is not bound (needed by {at})")]
    Unbound {
        /// The symbol.
        sym: String,
        /// What needs it, e.g. `%5 (slice)` or ``input `x` axis 1``.
        at: String,
    },
    /// A dimension evaluates to a negative number or overflows.
    #[error("{at}: dimension {dim} {reason}")]
    BadDim {
        /// What uses the dimension.
        at: String,
        /// The dimension, printed.
        dim: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A gather index is negative or not below the indexed axis's size.
    #[error("{node} ({op}): index {index} is out of range for an axis of size {size}")]
    IndexOutOfRange {
        /// The gathering node.
        node: ValueId,
        /// Its op mnemonic.
        op: &'static str,
        /// The offending index.
        index: i64,
        /// The size of the indexed axis.
        size: usize,
    },
    /// Slice bounds outside `0 <= start <= end <= size`.
    #[error("{node} (slice): bounds {start}..{end} do not fit an axis of size {size}")]
    SliceOutOfRange {
        /// The slicing node.
        node: ValueId,
        /// The evaluated start.
        start: i64,
        /// The evaluated end.
        end: i64,
        /// The size of the sliced axis.
        size: usize,
    },
    /// Integer division by zero.
    #[error("{node} (div): integer division by zero")]
    DivisionByZero {
        /// The dividing node.
        node: ValueId,
    },
    /// A max, min or argmax over an empty axis, which has no value.
    #[error("{node} ({op}): reduction over an empty axis")]
    EmptyReduction {
        /// The reducing node.
        node: ValueId,
        /// Its op mnemonic.
        op: &'static str,
    },
    /// `topk` with `k` larger than the searched axis.
    #[error("{node} (topk): k = {k} exceeds the axis size {size}")]
    TopKOutOfRange {
        /// The node.
        node: ValueId,
        /// The requested count.
        k: usize,
        /// The axis size.
        size: usize,
    },
    /// An op met a dtype it does not accept (cannot happen in a verified graph).
    #[error("{node} ({op}): does not accept {dtype} operands")]
    Unsupported {
        /// The node.
        node: ValueId,
        /// Its op mnemonic.
        op: &'static str,
        /// The operand dtype.
        dtype: DType,
    },
    /// A node's operands or result disagree with the declared types evaluated with the bindings
    /// (cannot happen in a verified graph whose inputs bound consistently).
    #[error("{node} ({op}): {detail}")]
    ShapeMismatch {
        /// The node.
        node: ValueId,
        /// Its op mnemonic.
        op: &'static str,
        /// What disagrees.
        detail: String,
    },
    /// A run whose memory plan needs more bytes than the machine has available (refused
    /// before allocating).
    #[error(
        "this run needs {needed} bytes (memory plan: {detail}) but only {available} bytes of memory are available; use a shorter input, a smaller batch or fewer new tokens"
    )]
    OutOfMemory {
        /// Bytes the memory plan needs.
        needed: usize,
        /// Bytes available (`MemAvailable`).
        available: usize,
        /// What the estimate covers.
        detail: String,
    },
    /// A backend (a GPU) failed to run a kernel or move data.
    #[error("{backend}: {detail}")]
    Backend {
        /// The backend, e.g. `cuda`.
        backend: &'static str,
        /// What failed.
        detail: String,
    },
}

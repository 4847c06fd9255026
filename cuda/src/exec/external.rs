//! Kernels from outside the CUDA backend as PTX (e.g. `kiln-compiler`'s MLIR GPU code
//! generator, `--codegen mlir`), plugged into the executor without this crate depending on
//! whoever makes them.
//!
//! A [`PtxProvider`] is asked at plan time whether it may compute a node ([`accepts`], from the
//! op and its operands' declared types) and at run time for the launches computing it at the
//! operands' concrete shapes ([`launches`]: PTX modules, entry points, grid and block, and the
//! arguments in the kernel's order). A launch's arguments are memrefs (an operand, or the result,
//! viewed at a given shape; passed as MLIR's expanded descriptor: allocated pointer, aligned
//! pointer, offset, sizes, strides) and 64-bit scalars; [`pack`] turns them into parameter
//! values and checks them against the `.param` list the PTX declares for the entry
//! ([`entry_params`]), so a disagreement is an error, never a bad launch. Whenever the provider
//! cannot give launches, the backend's own kernel runs and the reason is recorded once per kind
//! of step ([`Provider::fallbacks`]; printed to stderr with `KILN_CODEGEN_LOG=1`).
//!
//! [`accepts`]: PtxProvider::accepts
//! [`launches`]: PtxProvider::launches

use super::select::Step;
use crate::{Arch, CudaError};
use kiln_ir::{Op, TensorType};
use kiln_runtime::provider_log::ProviderLog;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One argument of a launch, in the kernel's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchArg {
    /// A memref over operand `operand` (the node's operands in order, then the result at
    /// index `operands.len()`), dense and row-major, viewed at `shape` (same element count).
    Memref {
        /// Which buffer.
        operand: usize,
        /// The sizes the kernel sees.
        shape: Vec<usize>,
    },
    /// A 64-bit integer (`index`, `i64`).
    I64(i64),
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxLaunch {
    /// The PTX module (loaded once per distinct text).
    pub ptx: Arc<str>,
    /// Its entry point.
    pub entry: String,
    /// Blocks per grid.
    pub grid: [u32; 3],
    /// Threads per block.
    pub block: [u32; 3],
    /// The arguments, in the kernel's order.
    pub args: Vec<LaunchArg>,
}

/// Makes PTX kernels for graph nodes.
pub trait PtxProvider: Send + Sync {
    /// A short name for logs, e.g. `mlir`.
    fn name(&self) -> &str;

    /// Whether this provider may compute a node with `op` over operands of these declared
    /// types (`Err` says why not).
    fn accepts(&self, op: &Op, operands: &[&TensorType]) -> Result<(), String>;

    /// The launches computing `op` over dense f32 operands of exactly these shapes into a dense
    /// f32 result, in order on one stream, for a device of architecture `arch`; or why there
    /// are none.
    fn launches(&self, op: &Op, shapes: &[&[usize]], arch: Arch) -> Result<Vec<PtxLaunch>, String>;
}

/// The kind of a `.param` of a PTX entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// 4 bytes (`.b32`, `.u32`, `.s32`, `.f32`).
    B32,
    /// 8 bytes (`.b64`, `.u64`, `.s64`, `.f64`; pointers).
    B64,
}

/// The `.param` list of entry point `entry` in `ptx`, or why it cannot be read.
pub fn entry_params(ptx: &str, entry: &str) -> Result<Vec<Param>, CudaError> {
    let bad = |why: String| CudaError::Args(format!("PTX entry `{entry}`: {why}"));
    let head = ptx
        .match_indices(".entry")
        .map(|(i, _)| &ptx[i + ".entry".len()..])
        .find(|rest| {
            rest.trim_start()
                .strip_prefix(entry)
                .is_some_and(|r| r.trim_start().starts_with('('))
        })
        .ok_or_else(|| bad("not declared in the module".into()))?;
    let open = head.find('(').unwrap_or(0);
    let close = head[open..]
        .find(')')
        .ok_or_else(|| bad("unterminated parameter list".into()))?;
    head[open + 1..open + close]
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut words = p.split_whitespace();
            if words.next() != Some(".param") {
                return Err(bad(format!("parameter `{p}`")));
            }
            match words.next() {
                Some(".b64" | ".u64" | ".s64" | ".f64") => Ok(Param::B64),
                Some(".b32" | ".u32" | ".s32" | ".f32") => Ok(Param::B32),
                _ => Err(bad(format!(
                    "parameter `{p}` is not a 32- or 64-bit scalar"
                ))),
            }
        })
        .collect()
}

/// A parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamValue {
    /// 4 bytes.
    B32(u32),
    /// 8 bytes.
    B64(u64),
}

/// Row-major element strides of `shape`.
fn dense_strides(shape: &[usize]) -> Vec<u64> {
    let mut s = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc = acc.saturating_mul(shape[i] as u64);
    }
    s
}

/// The parameter values of `launch` given the device pointers of the buffers (operands, then
/// the result) and their lengths in f32 elements, checked against the entry's declared
/// `params`: a memref of rank r is 3 + 2r 64-bit values (allocated and aligned pointer, offset
/// 0, sizes, row-major strides) and must fit its buffer.
pub fn pack(
    launch: &PtxLaunch,
    params: &[Param],
    buffers: &[(u64, usize)],
) -> Result<Vec<ParamValue>, CudaError> {
    let mut values = Vec::with_capacity(params.len());
    for arg in &launch.args {
        match arg {
            LaunchArg::Memref { operand, shape } => {
                let &(ptr, len) = buffers.get(*operand).ok_or_else(|| {
                    CudaError::Args(format!(
                        "{}: memref over buffer {operand} of {}",
                        launch.entry,
                        buffers.len()
                    ))
                })?;
                let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n.is_none_or(|n| n > len) {
                    return Err(CudaError::Args(format!(
                        "{}: a memref of shape {shape:?} over a buffer of {len} elements",
                        launch.entry
                    )));
                }
                values.extend([
                    ParamValue::B64(ptr),
                    ParamValue::B64(ptr),
                    ParamValue::B64(0),
                ]);
                values.extend(shape.iter().map(|&d| ParamValue::B64(d as u64)));
                values.extend(dense_strides(shape).into_iter().map(ParamValue::B64));
            }
            LaunchArg::I64(v) => values.push(ParamValue::B64(*v as u64)),
        }
    }
    let kinds: Vec<Param> = values
        .iter()
        .map(|v| match v {
            ParamValue::B32(_) => Param::B32,
            ParamValue::B64(_) => Param::B64,
        })
        .collect();
    if kinds != params {
        return Err(CudaError::Args(format!(
            "{}: the arguments make {} parameters {kinds:?}, the PTX declares {} {params:?}",
            launch.entry,
            kinds.len(),
            params.len()
        )));
    }
    Ok(values)
}

/// A provider as a plan uses it: the reasons it did not compute a kind of step (once per
/// kind) and the number of nodes its kernels computed.
pub struct Provider {
    inner: Arc<dyn PtxProvider>,
    log: ProviderLog,
}

impl Provider {
    /// Wraps `inner`; fallbacks go to stderr when `KILN_CODEGEN_LOG` is set.
    pub fn new(inner: Arc<dyn PtxProvider>) -> Arc<Provider> {
        let log = ProviderLog::new(format!("{} CUDA kernels", inner.name()));
        Arc::new(Provider { inner, log })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// Whether a node whose own step is `native` becomes [`Step::External`]: the step is one a
    /// provider may replace (an f32 elementwise body, a norm, softmax, a product of
    /// activations, or attention left to the host) and the provider accepts the node.
    pub fn replaces(&self, native: &Step, op: &Op, operands: &[&TensorType]) -> bool {
        let replaceable = match native {
            Step::Elementwise(_) => {
                matches!(
                    op,
                    Op::FusedElementwise { .. } | Op::Unary(_) | Op::Binary(_)
                )
            }
            Step::RmsNorm { .. } | Step::LayerNorm { .. } | Step::Softmax => true,
            Step::MatMul { .. } => true,
            Step::Host => matches!(op, Op::Attention { .. }),
            _ => false,
        };
        if !replaceable {
            return false;
        }
        match self.inner.accepts(op, operands) {
            Ok(()) => true,
            Err(why) => {
                self.fell_back(native.kind(), why);
                false
            }
        }
    }

    /// The provider's launches for `op` at these shapes; `None` (reason recorded under
    /// `kind`) when it has none.
    pub fn launches(
        &self,
        kind: &str,
        op: &Op,
        shapes: &[&[usize]],
        arch: Arch,
    ) -> Option<Vec<PtxLaunch>> {
        match self.inner.launches(op, shapes, arch) {
            Ok(l) => Some(l),
            Err(why) => {
                self.fell_back(kind, why);
                None
            }
        }
    }

    /// Counts one node computed by the provider's kernels.
    pub fn ran(&self) {
        self.log.ran();
    }

    /// Records (and with the log on, prints) the first reason a kind of step stayed native.
    pub fn fell_back(&self, kind: &str, why: String) {
        self.log.fell_back(kind, why);
    }

    /// Per kind of step, the first reason it was not computed by the provider.
    pub fn fallbacks(&self) -> BTreeMap<String, String> {
        self.log.fallbacks()
    }

    /// How many node evaluations the provider's kernels computed so far.
    pub fn runs(&self) -> usize {
        self.log.runs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter list as `ptxas`-accepted PTX writes it (LLVM's NVPTX printer).
    const PTX: &str = "
.visible .entry other(
\t.param .u64 other_param_0
)
{ ret; }
.visible .entry k(
\t.param .u64 .ptr .align 1 k_param_0,
\t.param .u64 .ptr .align 1 k_param_1,
\t.param .u64 k_param_2,
\t.param .u64 k_param_3,
\t.param .u64 k_param_4,
\t.param .u64 k_param_5,
\t.param .u64 k_param_6,
\t.param .u64 k_param_7
)
{ ret; }
";

    fn launch(args: Vec<LaunchArg>) -> PtxLaunch {
        PtxLaunch {
            ptx: PTX.into(),
            entry: "k".into(),
            grid: [1; 3],
            block: [1; 3],
            args,
        }
    }

    #[test]
    fn params_are_read_per_entry() {
        assert_eq!(entry_params(PTX, "other").unwrap(), vec![Param::B64]);
        assert_eq!(entry_params(PTX, "k").unwrap(), vec![Param::B64; 8]);
        assert!(entry_params(PTX, "missing").is_err());
        assert!(entry_params(".entry k(\n.param .align 4 .b8 s[12]\n)", "k").is_err());
    }

    #[test]
    fn a_memref_is_its_expanded_descriptor() {
        let params = entry_params(PTX, "k").unwrap();
        let l = launch(vec![
            LaunchArg::Memref {
                operand: 1,
                shape: vec![3, 5],
            },
            LaunchArg::I64(-2),
        ]);
        let v = pack(&l, &params, &[(0x100, 1), (0x200, 15)]).unwrap();
        let b: Vec<u64> = v
            .iter()
            .map(|p| match p {
                ParamValue::B64(x) => *x,
                ParamValue::B32(x) => u64::from(*x),
            })
            .collect();
        assert_eq!(b, vec![0x200, 0x200, 0, 3, 5, 5, 1, (-2i64) as u64]);
        // Too small a buffer, a missing buffer, and a count the PTX does not declare.
        assert!(pack(&l, &params, &[(0x100, 1), (0x200, 14)]).is_err());
        assert!(pack(&l, &params, &[(0x100, 1)]).is_err());
        let short = launch(vec![LaunchArg::Memref {
            operand: 0,
            shape: vec![1],
        }]);
        assert!(pack(&short, &params, &[(0x100, 1)]).is_err());
    }
}

//! What the MLIR backend compiles, and how a node's concrete shapes map onto it.
//!
//! A [`KernelSpec`] is one graph node at concrete shapes (what a caller has). A [`KernelKey`]
//! is what is compiled: the op and its memref arguments with only the sizes the lowering needs
//! fixed; every other size is dynamic (`?`) and passed at run time. [`layout`] maps a spec to
//! its key and to the concrete shapes of the key's arguments, so one compiled kernel serves
//! every sequence and cache length of a node (a decode loop compiles each kernel once).

use super::MlirError;
use super::{attention, lower, matmul, norm};
use kiln_ir::{infer, Bindings, DType, Op, TensorType};

/// A kernel to generate: the op and its operands' shapes (all f32, fixed sizes). The result's
/// shape follows from them by the IR's typing rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// The node's op.
    pub op: Op,
    /// The operands' shapes, in order.
    pub inputs: Vec<Vec<usize>>,
}

/// One memref argument of a compiled kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArgType {
    /// Its sizes: `Some` is compiled in, `None` is dynamic (given at each call).
    pub dims: Vec<Option<usize>>,
    /// Its dim 0 is dynamic and the caller may pass any contiguous block of its rows (the
    /// kernel runs on row blocks in parallel).
    pub split: bool,
    /// The kernel reads it through run-time strides (its last axis contiguous), so a view
    /// need not be copied; otherwise it is passed dense.
    pub strided: bool,
}

impl ArgType {
    /// Every size dynamic; `split` as given.
    pub fn dynamic(rank: usize, split: bool) -> Self {
        ArgType {
            dims: vec![None; rank],
            split,
            strided: false,
        }
    }

    /// Every size compiled in, not split.
    pub fn fixed(shape: &[usize]) -> Self {
        ArgType {
            dims: shape.iter().map(|&d| Some(d)).collect(),
            split: false,
            strided: false,
        }
    }
}

/// The unit of compilation and caching: the op, its memref arguments (inputs, then the
/// output) and the lowering's other compiled-in sizes (`params`, e.g. attention's head counts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// The node's op.
    pub op: Op,
    /// The kernel's memref arguments.
    pub args: Vec<ArgType>,
    /// Sizes the lowering compiles in that no argument carries.
    pub params: Vec<usize>,
}

impl KernelKey {
    /// The key as text, stable across runs and builds (the MLIR an artifact carries is filed
    /// under it): the op in the IR text syntax, each memref argument's sizes (`?` dynamic)
    /// with `split`/`strided` when set, then the params, e.g.
    /// `softmax axis=1 | ?x7 split, ?x7 split | params`.
    pub fn text(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                let dims: Vec<String> = a
                    .dims
                    .iter()
                    .map(|d| d.map_or("?".to_string(), |n| n.to_string()))
                    .collect();
                let mut t = dims.join("x");
                if a.split {
                    t.push_str(" split");
                }
                if a.strided {
                    t.push_str(" strided");
                }
                t
            })
            .collect();
        let params: Vec<String> = self.params.iter().map(usize::to_string).collect();
        format!(
            "{} | {} | params {}",
            kiln_ir::text::op_text(&self.op),
            args.join(", "),
            params.join(", ")
        )
    }
}

/// A spec laid out for a kernel: the key's arguments and params, and the concrete shapes of
/// the arguments (the operands reshaped as the kernel views them, then the output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The kernel's memref arguments.
    pub args: Vec<ArgType>,
    /// See [`KernelKey::params`].
    pub params: Vec<usize>,
    /// One concrete shape per argument, agreeing with its fixed sizes.
    pub shapes: Vec<Vec<usize>>,
}

impl Layout {
    /// A layout with no arguments yet.
    pub fn new(params: Vec<usize>) -> Self {
        Layout {
            args: Vec::new(),
            params,
            shapes: Vec::new(),
        }
    }

    /// Appends an argument of concrete `shape` whose sizes are fixed where `fixed` says so.
    pub fn arg(&mut self, shape: Vec<usize>, fixed: &[bool], split: bool) {
        let dims = shape
            .iter()
            .zip(fixed)
            .map(|(&d, &f)| f.then_some(d))
            .collect();
        self.args.push(ArgType {
            dims,
            split,
            strided: false,
        });
        self.shapes.push(shape);
    }

    /// Appends an argument as [`Layout::arg`], read through run-time strides (not split).
    pub fn strided_arg(&mut self, shape: Vec<usize>, fixed: &[bool]) {
        self.arg(shape, fixed, false);
        if let Some(a) = self.args.last_mut() {
            a.strided = true;
        }
    }

    /// The key of `op` laid out this way.
    pub fn key(&self, op: &Op) -> KernelKey {
        KernelKey {
            op: op.clone(),
            args: self.args.clone(),
            params: self.params.clone(),
        }
    }
}

/// How `op` over operands of these shapes runs as a kernel, or why it cannot.
pub fn layout(op: &Op, inputs: &[&[usize]]) -> Result<Layout, MlirError> {
    let out = output_shape(op, inputs)?;
    match op {
        Op::FusedElementwise { .. } | Op::Unary(_) | Op::Binary(_) => {
            Ok(lower::elementwise_layout(inputs, &out))
        }
        Op::Reduce { .. } => {
            let mut l = Layout::new(Vec::new());
            l.arg(inputs[0].to_vec(), &vec![true; inputs[0].len()], false);
            l.arg(out.clone(), &vec![true; out.len()], false);
            Ok(l)
        }
        Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
            norm::layout(op, inputs)
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul::layout(inputs, &out, *transpose_a, *transpose_b),
        Op::Attention {
            merge_heads: false, ..
        } => attention::layout(inputs),
        op => Err(MlirError::Unsupported(format!(
            "no MLIR lowering for {}",
            op.name()
        ))),
    }
}

/// The result's shape of `op` over f32 operands of these shapes, or why it does not type-check
/// or is not f32.
pub fn output_shape(op: &Op, inputs: &[&[usize]]) -> Result<Vec<usize>, MlirError> {
    let tys: Vec<TensorType> = inputs
        .iter()
        .map(|s| TensorType::new(DType::F32, s.iter().copied()))
        .collect();
    let ty = infer(op, &tys.iter().collect::<Vec<_>>()).map_err(MlirError::Unsupported)?;
    if ty.dtype != DType::F32 {
        return Err(MlirError::Unsupported(format!(
            "{} gives {}; only f32 results are lowered",
            op.name(),
            ty.dtype
        )));
    }
    ty.shape
        .iter()
        .map(|d| {
            d.as_fixed()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| MlirError::Unsupported(format!("symbolic result dim {d}")))
        })
        .collect()
}

impl KernelSpec {
    /// A spec for `op` over f32 operands of these shapes.
    pub fn new(op: Op, inputs: &[&[usize]]) -> KernelSpec {
        KernelSpec {
            op,
            inputs: inputs.iter().map(|s| s.to_vec()).collect(),
        }
    }

    /// The spec of a graph node: its op and operand types, symbolic dims evaluated in `env`;
    /// operands other than f32 are [`MlirError::Unsupported`].
    pub fn from_types(
        op: &Op,
        operands: &[&TensorType],
        env: &Bindings,
    ) -> Result<KernelSpec, MlirError> {
        let inputs = operands
            .iter()
            .map(|t| {
                if t.dtype != DType::F32 {
                    return Err(MlirError::Unsupported(format!(
                        "{} on a {} operand; only f32 is lowered",
                        op.name(),
                        t.dtype
                    )));
                }
                t.shape
                    .iter()
                    .map(|d| {
                        d.eval(env)
                            .ok()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| MlirError::Unsupported(format!("dim {d} unbound")))
                    })
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        Ok(KernelSpec {
            op: op.clone(),
            inputs,
        })
    }

    fn shapes(&self) -> Vec<&[usize]> {
        self.inputs.iter().map(Vec::as_slice).collect()
    }

    /// The result's shape, or why the op does not type-check at these shapes or is not f32.
    pub fn output_shape(&self) -> Result<Vec<usize>, MlirError> {
        output_shape(&self.op, &self.shapes())
    }

    /// The kernel this spec runs on (see [`layout`]).
    pub fn key(&self) -> Result<KernelKey, MlirError> {
        Ok(layout(&self.op, &self.shapes())?.key(&self.op))
    }
}

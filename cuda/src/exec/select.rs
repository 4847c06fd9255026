//! Kernel selection for the CUDA backend: one [`Step`] per graph node, from the node's op, its
//! operands' producers and dtypes. Values live on the device in their declared dtype, dense and
//! row-major. A matmul or attention whose operands the precision lowering rounded to bf16/f16
//! (`cast(cast(x, bf16), f32)`) reads the narrow value directly (cuBLAS bf16 GEMM, the bf16
//! flash-attention kernels), so the widening cast is never computed. Anything without a kernel
//! runs the reference executor's op on the host ([`Step::Host`]).

use super::external::Provider;
use kiln_ir::{verify, DType, Expr, Graph, Node, Op, TensorType, ValueId};
use kiln_runtime::reference::ExecError;
use std::fmt;

/// How one node is computed on the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An input (uploaded per run unless already on the device) or a parameter (uploaded once).
    Source,
    /// Not computed: no output depends on it.
    Skip,
    /// A constant, uploaded once at compile time.
    Const,
    /// A reshape: the operand's buffer under a new shape.
    Alias,
    /// A permute, slice or expand: a strided copy.
    Layout,
    /// `concat`: each operand copied into its place.
    Concat,
    /// An elementwise body (fused, or one primitive op, or a cast), generated CUDA C.
    Elementwise(Expr),
    /// `x · Wᵀ` (or `x · W`) with `W` a 2-D parameter.
    Linear {
        /// The weight parameter.
        weight: String,
        /// `W` is stored `[n, k]`.
        transposed: bool,
        /// The operand read: for a bf16/f16 weight, the value of that dtype behind the
        /// matmul's widening cast; else the matmul's own operand.
        input: ValueId,
    },
    /// A batched product of two f32 activations.
    MatMul {
        /// The IR's `transpose_a`.
        ta: bool,
        /// The IR's `transpose_b`.
        tb: bool,
    },
    /// `rmsnorm` over the last axis.
    RmsNorm {
        /// Added to the mean square.
        eps: f32,
    },
    /// `layernorm` over the last axis.
    LayerNorm {
        /// Added to the variance.
        eps: f32,
    },
    /// `softmax` over the last axis.
    Softmax,
    /// bf16 flash attention on the narrow `q`, `k`, `v` behind the widening casts.
    Attention {
        /// `q`, `k`, `v` (bf16 values).
        qkv: [ValueId; 3],
        /// Multiplies `q·k`.
        scale: f32,
        /// Causal mask.
        causal: bool,
        /// Sliding window (0: none).
        window: usize,
    },
    /// Embedding rows of a 2-D parameter by i64 ids.
    Embedding,
    /// The reference executor's op on the host (operands downloaded, result uploaded).
    Host,
    /// A kernel from a [`super::external::Provider`] (`--codegen mlir`), with the step that
    /// runs when the provider has none for the operands' shapes.
    External(Box<Step>),
}

impl Step {
    /// The kind of kernel, e.g. `linear`.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Source => "source",
            Step::Skip => "skip",
            Step::Const => "const",
            Step::Alias => "alias",
            Step::Layout => "layout",
            Step::Concat => "concat",
            Step::Elementwise(_) => "elementwise",
            Step::Linear { .. } => "linear",
            Step::MatMul { .. } => "matmul",
            Step::RmsNorm { .. } => "rmsnorm",
            Step::LayerNorm { .. } => "layernorm",
            Step::Softmax => "softmax",
            Step::Attention { .. } => "attention",
            Step::Embedding => "embedding",
            Step::Host => "host",
            Step::External(_) => "external",
        }
    }

    /// The values the step reads.
    pub fn operands(&self, node: &Node) -> Vec<ValueId> {
        match self {
            Step::Source | Step::Const => vec![],
            Step::Linear { input, .. } => vec![*input],
            Step::Attention { qkv, .. } => {
                let mut v = qkv.to_vec();
                v.extend(node.inputs.get(3));
                v
            }
            _ => node.inputs.clone(),
        }
    }
}

/// The graph this backend plans for `graph`: the composite ops it has no kernel for
/// (`rotary`; `linear`, whose epilogue and head layout cuBLAS does not apply here yet;
/// `swiglu`; attention with merged heads) written as their defining ops
/// ([`kiln_ir::decompose`]), each of which has one.
pub fn legalize(graph: &Graph) -> Result<Graph, ExecError> {
    verify(graph)?;
    // `expand` itself keeps to the composite ops it defines: all of them, here.
    kiln_ir::decompose::expand(graph, |_: &Op| true).map_err(|(node, e)| {
        let op = graph.node(node).map_or("composite", |n| n.op.name());
        ExecError::ShapeMismatch {
            node,
            op,
            detail: e.to_string(),
        }
    })
}

/// The steps of one graph, in node order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One step per node.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Selects a step for every node of `graph` (verified), then marks the nodes no output
    /// depends on as [`Step::Skip`].
    pub fn new(graph: &Graph) -> Plan {
        Plan::with_provider(graph, None)
    }

    /// [`Plan::new`], with the nodes `provider` replaces as [`Step::External`].
    pub fn with_provider(graph: &Graph, provider: Option<&Provider>) -> Plan {
        let nodes = graph.nodes();
        let mut steps: Vec<Step> = graph
            .iter()
            .map(|(_, n)| {
                let step = select(graph, n);
                let Some(p) = provider else { return step };
                let operands: Option<Vec<&TensorType>> = n
                    .inputs
                    .iter()
                    .map(|v| graph.node(*v).map(|o| &o.ty))
                    .collect();
                match operands {
                    Some(ops) if p.replaces(&step, &n.op, &ops) => Step::External(Box::new(step)),
                    _ => step,
                }
            })
            .collect();
        let mut needed = vec![false; nodes.len()];
        for out in graph.outputs() {
            needed[out.value.index()] = true;
        }
        for i in (0..nodes.len()).rev() {
            if needed[i] {
                for v in steps[i].operands(&nodes[i]) {
                    needed[v.index()] = true;
                }
            }
        }
        for (i, step) in steps.iter_mut().enumerate() {
            if !needed[i] && *step != Step::Source {
                *step = Step::Skip;
            }
        }
        Plan { steps }
    }

    /// How many nodes each kind of step computes, e.g. `linear×7 rmsnorm×3`.
    pub fn summary(&self) -> String {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for s in &self.steps {
            if !matches!(s, Step::Source | Step::Skip) {
                *counts.entry(s.kind()).or_default() += 1;
            }
        }
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        parts.join(" ")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            if !matches!(s, Step::Source | Step::Skip) {
                writeln!(f, "%{i}: {}", s.kind())?;
            }
        }
        Ok(())
    }
}

/// The narrow value `y` of dtype `narrow` behind `v = cast(y, f32)`.
fn narrow_value(graph: &Graph, v: ValueId, narrow: DType) -> Option<ValueId> {
    let n = graph.node(v)?;
    match n.op {
        Op::Cast { to: DType::F32 } => {
            let y = *n.inputs.first()?;
            (graph.node(y)?.ty.dtype == narrow).then_some(y)
        }
        _ => None,
    }
}

/// The 2-D parameter behind a matmul's right operand (directly, or widened by a cast).
fn weight_param(graph: &Graph, w: ValueId) -> Option<(String, DType)> {
    let node = graph.node(w)?;
    if node.ty.rank() != 2 {
        return None;
    }
    let p = match node.op {
        Op::Cast { to: DType::F32 } => graph.node(*node.inputs.first()?)?,
        Op::Param { .. } => node,
        _ => return None,
    };
    match &p.op {
        Op::Param { name } => Some((name.clone(), p.ty.dtype)),
        _ => None,
    }
}

fn select(graph: &Graph, node: &Node) -> Step {
    let dtype = node.ty.dtype;
    let input_dtype = |i: usize| {
        node.inputs
            .get(i)
            .and_then(|v| graph.node(*v))
            .map(|n| n.ty.dtype)
    };
    let last_axis = node.ty.rank().checked_sub(1);
    match &node.op {
        Op::Input { .. } | Op::Param { .. } => Step::Source,
        Op::Const { .. } => Step::Const,
        Op::Reshape { .. } => Step::Alias,
        Op::Permute { .. } | Op::Slice { .. } | Op::Expand { .. } => Step::Layout,
        Op::Concat { .. } => Step::Concat,
        Op::FusedElementwise { body } => Step::Elementwise(body.clone()),
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where => {
            let args = (0..node.inputs.len()).map(Expr::Arg).collect();
            Expr::from_op(&node.op, args).map_or(Step::Host, Step::Elementwise)
        }
        Op::Cast { to } => Step::Elementwise(Expr::Cast(*to, Box::new(Expr::Arg(0)))),
        Op::MatMul {
            transpose_a: false,
            transpose_b,
        } if dtype == DType::F32 => {
            let x = node.inputs[0];
            match weight_param(graph, node.inputs[1]) {
                Some((weight, wd)) => {
                    let input = match wd {
                        DType::F32 | DType::F8E4M3 => x,
                        DType::BF16 | DType::F16 => match narrow_value(graph, x, wd) {
                            Some(y) => y,
                            None => return Step::Host,
                        },
                        _ => return Step::Host,
                    };
                    Step::Linear {
                        weight,
                        transposed: *transpose_b,
                        input,
                    }
                }
                None if input_dtype(0) == Some(DType::F32) => Step::MatMul {
                    ta: false,
                    tb: *transpose_b,
                },
                None => Step::Host,
            }
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } if dtype == DType::F32 && input_dtype(0) == Some(DType::F32) => Step::MatMul {
            ta: *transpose_a,
            tb: *transpose_b,
        },
        Op::RmsNorm { eps } if dtype.is_float() && input_dtype(1) == Some(dtype) => {
            Step::RmsNorm { eps: eps.0 as f32 }
        }
        Op::LayerNorm { eps }
            if dtype.is_float()
                && input_dtype(1) == Some(dtype)
                && input_dtype(2) == Some(dtype) =>
        {
            Step::LayerNorm { eps: eps.0 as f32 }
        }
        Op::Softmax { axis } if dtype.is_float() && Some(*axis) == last_axis => Step::Softmax,
        Op::Attention {
            scale,
            causal,
            window,
            merge_heads: false,
        } if dtype == DType::F32 => {
            let narrow: Option<Vec<ValueId>> = node.inputs[..3]
                .iter()
                .map(|v| narrow_value(graph, *v, DType::BF16))
                .collect();
            let d = node.ty.shape.last().and_then(|d| d.as_fixed());
            match (narrow, d) {
                (Some(q), Some(64 | 128)) => Step::Attention {
                    qkv: [q[0], q[1], q[2]],
                    scale: scale.0 as f32,
                    causal: *causal,
                    window: *window,
                },
                _ => Step::Host,
            }
        }
        Op::Gather { axis: 0 }
            if input_dtype(1) == Some(DType::I64)
                && node
                    .inputs
                    .first()
                    .and_then(|v| graph.node(*v))
                    .is_some_and(|t| {
                        t.ty.rank() == 2
                            && matches!(t.op, Op::Param { .. })
                            && t.ty.dtype.is_float()
                    }) =>
        {
            Step::Embedding
        }
        _ => Step::Host,
    }
}

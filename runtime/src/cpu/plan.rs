//! Kernel selection: one [`Step`] per graph node, chosen from the node's op, its operands'
//! producers and dtypes, before any data is seen. A step whose operands turn out not to fit its
//! kernel at run time (say, an f16 input where the kernel reads f32) runs the reference op
//! instead, so selection affects speed, never results beyond kernel tolerances.

use super::external::Provider;
use super::fuse;
use kiln_ir::{BinaryOp, DType, Dim, Expr, Graph, Node, Op, ValueId};
use kiln_kernels::fused::Program;
use kiln_kernels::linear::Activation;
use std::fmt;
use std::sync::Arc;

/// The kind of a step's kernel (its name's first word), e.g. `linear`.
pub fn kind(name: &str) -> &str {
    name.split(' ').next().unwrap_or_default()
}

/// One linear layer of a [`Step::Linear`]: `act((x · Wᵀ) ⊙ scale + bias + add)` (or `x · W`), the value of
/// `node` (a matmul or a `linear` op, whose scale and addend are its epilogue; or the node of a
/// fusion that absorbs it, see [`fuse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearLayer {
    /// The node whose value this layer computes.
    pub node: usize,
    /// The activation `x`.
    pub x: ValueId,
    /// The weight parameter.
    pub weight: String,
    /// `W` is stored `[n, k]` (the matmul's `transpose_b`).
    pub transposed: bool,
    /// The weight is bf16 or fp8 e4m3, so the kernel reads x rounded to bf16 (whatever x is).
    pub rounds_x: bool,
    /// An f32 parameter of `n` elements multiplying the output columns.
    pub scale: Option<String>,
    /// A bias `[n]` added before `add` (the first addend of a fused `(add (add y b) r)`).
    pub bias: Option<ValueId>,
    /// A value added to the result: of the result's shape (a residual) or `[n]` (a bias).
    pub add: Option<ValueId>,
    /// The activation of the sum (a fused `gelu`/`gelu_tanh` of it).
    pub activation: Option<Activation>,
    /// SwiGLU: the result is `silu(gate) · (this layer's result)`, the gate a second layer
    /// over the same x (its matmul and scale not computed on their own).
    pub gate: Option<GateLayer>,
    /// The value is the result `[b, s, h·d]` seen as heads `[b, h, s, d]` (the graph's reshape
    /// and `[0, 2, 1, 3]` permute, not computed): the head size `d`.
    pub heads: Option<usize>,
    /// Rotary embedding of the heads in rotate-half form: the `cos` and `sin` values,
    /// `[b, 1, s, d]`.
    pub rope: Option<(ValueId, ValueId)>,
    /// The result is rounded to bf16 (the node is that cast, or a rotary step's cast).
    pub round_bf16: bool,
    /// The KV-cache `concat(past, value)` (a graph output) this value is appended to by the
    /// same step: that concat's node is [`Step::Grouped`].
    pub append: Option<usize>,
}

/// The gate of a SwiGLU [`LinearLayer`].
#[derive(Debug, Clone, PartialEq)]
pub struct GateLayer {
    /// The weight parameter.
    pub weight: String,
    /// `W` is stored `[n, k]`.
    pub transposed: bool,
    /// An f32 parameter of `n` elements multiplying the gate's columns.
    pub scale: Option<String>,
}

impl LinearLayer {
    /// The weights it reads, `(name, transposed)`: its own and its gate's.
    pub fn weights(&self) -> impl Iterator<Item = (&str, bool)> + '_ {
        let gate = self
            .gate
            .as_ref()
            .map(|g| (g.weight.as_str(), g.transposed));
        [Some((self.weight.as_str(), self.transposed)), gate]
            .into_iter()
            .flatten()
    }

    /// The values the layer reads besides x: its bias, addend and RoPE tables.
    pub fn operands(&self) -> impl Iterator<Item = ValueId> + '_ {
        let rope = self.rope.into_iter().flat_map(|(c, s)| [c, s]);
        self.bias.into_iter().chain(self.add).chain(rope)
    }
}

/// How one node is computed.
/// A weight operand of a [`Step::Moe`] (the router's or an expert's).
#[derive(Debug, Clone, PartialEq)]
pub enum MoeWeight {
    /// An f32 value, read as it is.
    Value(ValueId),
    /// A bf16, f16 or fp8 parameter that precision lowering widens (`cast(p, f32)`) and, for
    /// fp8, multiplies by a per-row scale parameter `[rows, 1]`: the step widens it itself,
    /// for the experts it routes tokens to only, so those nodes are not computed.
    Narrow {
        /// The parameter.
        param: ValueId,
        /// The per-row scale parameter.
        scale: Option<ValueId>,
    },
}

#[derive(Debug, Clone)]
pub enum Step {
    /// An input or parameter, bound by name at run time.
    Source,
    /// Not computed: unused, or folded into its consumers (a weight's cast).
    Skip,
    /// The same f32 elements as operand 0 under the node's shape: a reshape, or a cast to a
    /// wider float of a value already stored widened.
    Alias,
    /// A strided view of operand 0 (permute, slice, expand): no copy; chosen only where every
    /// consumer reads strided operands.
    View,
    /// Operand 0 copied into a dense buffer of the node's shape: a permute, slice or expand
    /// whose consumer needs dense data, or a reshape of a strided view.
    Copy,
    /// `concat`: each operand copied into its place.
    Concat,
    /// An elementwise body (a `fused_elementwise` op, or one primitive elementwise op) compiled
    /// once into a register program over strided, broadcast operands.
    Fused(Arc<Program>),
    /// Linear layers reading the same activation, each with its epilogue (see
    /// [`LinearLayer`]), run as one kernel ([`kiln_kernels::linear`]: one parallel region for
    /// all their output rows in decode). The step sits at the first layer's node; the other
    /// layers' nodes are [`Step::Grouped`].
    Linear(Arc<[LinearLayer]>),
    /// Computed by an earlier [`Step::Linear`] group (a layer, or a KV-cache append).
    Grouped,
    /// Rotary embedding in rotate-half form (the IR's `rotary`), `x · cos + rotate_half(x) ·
    /// sin` with `rotate_half(x) = concat(-x[.., d/2..], x[.., ..d/2])`, reading `x`, `cos` and
    /// `sin` strided.
    Rope {
        /// The rotated value.
        x: ValueId,
        /// Multiplies `x`.
        cos: ValueId,
        /// Multiplies `rotate_half(x)`.
        sin: ValueId,
        /// The result is rounded to bf16 (the step sits at the node of that rounding: a
        /// bf16 graph's attention operand).
        round_bf16: bool,
    },
    /// A batched product of two activations.
    MatMul {
        /// The IR's `transpose_a`.
        ta: bool,
        /// The IR's `transpose_b`.
        tb: bool,
    },
    /// `rmsnorm` over the last axis.
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
    /// `softmax` over the last axis.
    Softmax,
    /// `layernorm` over the last axis.
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// Flash attention on strided `q`, `k`, `v` (and the optional additive mask).
    Attention {
        /// Multiplies `q·k`.
        scale: f64,
        /// Causal mask.
        causal: bool,
        /// Sliding window (0: none).
        window: usize,
        /// The result is stored `[b, s, h, d]` (its only consumer permutes it so), so that
        /// permute is a dense view rather than a copy.
        bshd: bool,
    },
    /// Embedding lookup: rows of a 2-D f32 table by integer ids.
    Embedding,
    /// Mixture of experts: tokens routed, each expert run on its own tokens.
    Moe {
        /// Experts per token.
        top_k: usize,
        /// The operands after `x`: the router's weight, then each expert's three.
        weights: Arc<[MoeWeight]>,
    },
    /// `refine_logits` with an e4m3 residual ([`kiln_kernels::refine`]).
    RefineLogits,
    /// The reference executor's op on this node alone.
    Reference,
    /// A kernel from an external provider ([`crate::cpu::external`]), `native` where it has
    /// none.
    External {
        /// Who makes the kernel.
        provider: Arc<Provider>,
        /// The step it replaces, run when the provider cannot.
        native: Box<Step>,
    },
}

impl Step {
    /// Whether the node's value lives in a buffer of its own (a float or bool value computed
    /// here, [`in_buffer`]).
    pub fn owns_buffer(&self, node: &Node) -> bool {
        match self {
            Step::Source | Step::Skip | Step::Alias | Step::View => false,
            Step::Reference => in_buffer(node.ty.dtype),
            _ => true,
        }
    }

    /// The operands read as values (a linear layer's weight and scale are read prepared, not
    /// as values; a grouped layer reads nothing itself).
    pub fn value_operands(&self, node: &Node) -> Vec<ValueId> {
        match self {
            Step::Source | Step::Grouped => Vec::new(),
            Step::Linear(layers) => {
                let mut v = vec![layers[0].x];
                v.extend(layers.iter().flat_map(LinearLayer::operands));
                v
            }
            Step::Rope { x, cos, sin, .. } => vec![*x, *cos, *sin],
            Step::Moe { weights, .. } => {
                let mut v = node.inputs[..1].to_vec();
                for w in weights.iter() {
                    match w {
                        MoeWeight::Value(w) => v.push(*w),
                        MoeWeight::Narrow { param, scale } => {
                            v.extend([*param].iter().chain(scale))
                        }
                    }
                }
                v
            }
            _ => node.inputs.clone(),
        }
    }

    /// The step's kernel, e.g. `linear model.layers.0.mlp.up_proj.weight`.
    pub fn name(&self) -> String {
        match self {
            Step::Source => "source".into(),
            Step::Skip => "skip".into(),
            Step::Alias => "alias".into(),
            Step::View => "view".into(),
            Step::Copy => "copy".into(),
            Step::Concat => "concat".into(),
            Step::Fused(_) => "fused".into(),
            Step::LayerNorm { .. } => "layernorm".into(),
            Step::Attention { .. } => "attention".into(),
            Step::Linear(layers) => {
                let names: Vec<String> = layers
                    .iter()
                    .map(|l| match &l.gate {
                        Some(g) => format!("silu({}) * {}", g.weight, l.weight),
                        None => l.weight.clone(),
                    })
                    .collect();
                format!("linear {}", names.join(" + "))
            }
            Step::Grouped => "grouped".into(),
            Step::Rope { .. } => "rope".into(),
            Step::MatMul { .. } => "matmul".into(),
            Step::RmsNorm { .. } => "rmsnorm".into(),
            Step::Softmax => "softmax".into(),
            Step::Embedding => "embedding".into(),
            Step::Moe { .. } => "moe".into(),
            Step::RefineLogits => "refine_logits".into(),
            Step::Reference => "reference".into(),
            Step::External { provider, native } => {
                format!("{} {}", provider.name(), native.name())
            }
        }
    }
}

/// The steps of one graph, in node order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One step per node.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Selects a step for every node of `graph` (which must be verified; `linear` ops and
    /// matmuls by a weight parameter become linear layers, with the op's scale and addend in
    /// their epilogue), leaves bf16 operand roundings to the linear kernels and folds head
    /// layouts with their RoPE and bf16 rounding, and SwiGLU into linear layers ([`fuse`]),
    /// marks the nodes no output depends on through a value operand as [`Step::Skip`], turns
    /// each view read by a kernel that needs dense data into a copy (except the permute of an
    /// attention output stored permuted), groups the linear layers reading one activation,
    /// and lets the groups append their KV-cache rows.
    pub fn new(graph: &Graph) -> Plan {
        Plan::with_provider(graph, None)
    }

    /// [`Plan::new`], with the kernels `provider` accepts chosen over the native ones.
    pub fn with_provider(graph: &Graph, provider: Option<&Arc<Provider>>) -> Plan {
        let nodes = graph.nodes();
        let mut steps: Vec<Step> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let native = select(graph, i, n);
                match provider {
                    Some(p) => p.choose(native, &n.op, &operand_types(graph, n)),
                    None => native,
                }
            })
            .collect();
        fuse::rounding_in_kernels(graph, &mut steps);
        fuse::rope_rounding(graph, &mut steps);
        fuse::linear_heads(graph, &mut steps);
        fuse::swiglu(graph, &mut steps);
        fuse::linear_epilogues(graph, &mut steps);
        // Liveness: an output, or a value operand of a needed node.
        let mut needed = vec![false; nodes.len()];
        for out in graph.outputs() {
            needed[out.value.index()] = true;
        }
        for i in (0..nodes.len()).rev() {
            if needed[i] {
                for v in steps[i].value_operands(&nodes[i]) {
                    needed[v.index()] = true;
                }
            }
        }
        for (i, step) in steps.iter_mut().enumerate() {
            if !needed[i] && !matches!(step, Step::Source) {
                *step = Step::Skip;
            }
        }
        // Views read by a kernel that needs dense data become copies; then a reshape of a
        // (still) strided value becomes a copy too.
        for (i, node) in nodes.iter().enumerate() {
            if !reads_strided(&steps[i]) {
                for v in steps[i].value_operands(node) {
                    demote(&mut steps, nodes, v.index());
                }
            }
        }
        fuse::attention_layout(graph, &mut steps);
        // Layers stored as heads hold their value as a permuted view.
        let mut strided = vec![false; nodes.len()];
        for step in &steps {
            if let Step::Linear(layers) = step {
                for l in layers.iter().filter(|l| l.heads.is_some()) {
                    strided[l.node] = true;
                }
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            let source = node.inputs.first().map(|v| v.index());
            strided[i] = match steps[i] {
                Step::View => {
                    !source.is_some_and(|a| matches!(steps[a], Step::Attention { bshd: true, .. }))
                }
                Step::Alias if source.is_some_and(|a| strided[a]) => {
                    if matches!(node.op, Op::Reshape { .. }) {
                        steps[i] = Step::Copy;
                        false
                    } else {
                        true
                    }
                }
                _ => strided[i],
            };
        }
        fuse::linear_groups(&mut steps);
        fuse::cache_appends(graph, &mut steps);
        Plan { steps }
    }

    /// How many nodes each kind of step computes, e.g. `linear×7 rmsnorm×3`.
    pub fn summary(&self) -> String {
        let names: Vec<String> = self
            .steps
            .iter()
            .filter(|s| !matches!(s, Step::Source | Step::Skip | Step::Grouped))
            .map(Step::name)
            .collect();
        kind_counts(names.iter().map(String::as_str))
    }
}

/// How many kernels of each kind `names` (kernel names) holds, e.g. `linear×7 rmsnorm×3`.
pub fn kind_counts<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for name in names {
        *counts.entry(kind(name)).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    parts.join(" ")
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            if !matches!(s, Step::Source | Step::Skip | Step::Grouped) {
                writeln!(f, "%{i}: {}", s.name())?;
            }
        }
        Ok(())
    }
}

/// The step for node `i`.
fn select(graph: &Graph, i: usize, node: &Node) -> Step {
    let operand = |i: usize| node.inputs.get(i).and_then(|v| graph.node(*v));
    let dtype = node.ty.dtype;
    let last_axis = node.ty.rank().checked_sub(1);
    match &node.op {
        Op::Input { .. } | Op::Param { .. } => Step::Source,
        // A reshape is a new shape on the same elements: of a computed value, or of an f32
        // input or parameter (read in place).
        Op::Reshape { .. }
            if produces_buffer(graph, node.inputs[0])
                || operand(0).is_some_and(|x| {
                    x.ty.dtype == DType::F32 && matches!(x.op, Op::Input { .. } | Op::Param { .. })
                }) =>
        {
            Step::Alias
        }
        Op::Permute { .. } | Op::Slice { .. } | Op::Expand { .. } if dtype.is_float() => {
            if produces_buffer(graph, node.inputs[0]) {
                Step::View
            } else {
                Step::Copy
            }
        }
        Op::Concat { .. } if dtype.is_float() => Step::Concat,
        Op::LayerNorm { eps } if dtype == DType::F32 => Step::LayerNorm { eps: eps.0 },
        Op::Attention {
            scale,
            causal,
            window,
            merge_heads: false,
        } if dtype == DType::F32 => Step::Attention {
            scale: scale.0,
            causal: *causal,
            window: *window,
            bshd: false,
        },
        Op::Rotary if dtype == DType::F32 => Step::Rope {
            x: node.inputs[0],
            cos: node.inputs[1],
            sin: node.inputs[2],
            round_bf16: false,
        },
        Op::FusedElementwise { body } if dtype.is_float() => fused(graph, node, body),
        Op::Moe { top_k } if dtype == DType::F32 => Step::Moe {
            top_k: *top_k,
            weights: node.inputs[1..]
                .iter()
                .map(|&w| moe_weight(graph, w))
                .collect(),
        },
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where if dtype.is_float() => {
            let args = (0..node.inputs.len()).map(Expr::Arg).collect();
            match Expr::from_op(&node.op, args) {
                Some(body) => fused(graph, node, &body),
                None => Step::Reference,
            }
        }
        Op::Cast { to } if to.is_float() => match operand(0) {
            Some(_) if produces_buffer(graph, node.inputs[0]) => {
                if *to == DType::F32 {
                    Step::Alias
                } else {
                    // Rounding to a narrower float: a one-node program (vectorized, strided).
                    fused(graph, node, &Expr::Cast(*to, Box::new(Expr::Arg(0))))
                }
            }
            _ => Step::Reference,
        },
        Op::MatMul {
            transpose_a: false,
            transpose_b,
        } if dtype == DType::F32 => {
            linear(graph, i, node, *transpose_b, None, None).unwrap_or(Step::MatMul {
                ta: false,
                tb: *transpose_b,
            })
        }
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads: 0,
            ..
        } if dtype == DType::F32 => {
            // The kernel reads its scale prepared, by name: a parameter (fp8's scales).
            let scale = scaled.then(|| {
                let n = node.ty.shape.last()?;
                column_param(graph, node.inputs[2], n)
            });
            if scale.as_ref().is_some_and(Option::is_none) {
                return Step::Reference;
            }
            let add = added.then(|| node.inputs[node.inputs.len() - 1]);
            linear(graph, i, node, *transpose_b, scale.flatten(), add).unwrap_or(Step::Reference)
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } if dtype == DType::F32 => Step::MatMul {
            ta: *transpose_a,
            tb: *transpose_b,
        },
        Op::RmsNorm { eps } if dtype == DType::F32 => Step::RmsNorm { eps: eps.0 },
        Op::Softmax { axis } if dtype == DType::F32 && Some(*axis) == last_axis => Step::Softmax,
        Op::RefineLogits
            if dtype == DType::F32 && operand(2).is_some_and(|r| r.ty.dtype == DType::F8E4M3) =>
        {
            Step::RefineLogits
        }
        Op::Gather { axis: 0 }
            if dtype == DType::F32
                && operand(0).is_some_and(|d| d.ty.rank() == 2 && is_param(d)) =>
        {
            Step::Embedding
        }
        _ => Step::Reference,
    }
}

/// The declared types of a node's operands.
fn operand_types<'g>(graph: &'g Graph, node: &Node) -> Vec<&'g kiln_ir::TensorType> {
    node.inputs
        .iter()
        .filter_map(|v| graph.node(*v).map(|n| &n.ty))
        .collect()
}

/// The body compiled for the operands' dtypes, or the reference op if it cannot be.
fn fused(graph: &Graph, node: &Node, body: &Expr) -> Step {
    let dtypes: Option<Vec<DType>> = node
        .inputs
        .iter()
        .map(|v| graph.node(*v).map(|n| n.ty.dtype))
        .collect();
    match dtypes.map(|d| Program::compile(body, &d)) {
        Some(Ok(p)) => Step::Fused(Arc::new(p)),
        _ => Step::Reference,
    }
}

/// Whether `step` reads its operands through strides (so a view needs no copy for it).
pub(super) fn reads_strided(step: &Step) -> bool {
    matches!(
        step,
        Step::View
            | Step::Copy
            | Step::Concat
            | Step::Fused(_)
            | Step::Attention { .. }
            | Step::Rope { .. }
            | Step::Alias
            | Step::Skip
            | Step::Reference
    )
}

/// Makes the view `v` (or the view behind the widening cast `v`) a dense copy.
fn demote(steps: &mut [Step], nodes: &[Node], v: usize) {
    match steps[v] {
        Step::View => steps[v] = Step::Copy,
        Step::Alias if matches!(nodes[v].op, Op::Cast { .. }) => {
            demote(steps, nodes, nodes[v].inputs[0].index())
        }
        _ => {}
    }
}

/// Whether `v`'s step stores it in an f32 buffer (any computed float value).
fn produces_buffer(graph: &Graph, v: ValueId) -> bool {
    graph.node(v).is_some_and(|n| {
        in_buffer(n.ty.dtype) && !matches!(n.op, Op::Input { .. } | Op::Param { .. })
    })
}

/// Whether a computed value of `dtype` lives in an f32 buffer: floats widened, bools as 0.0
/// or 1.0 (as the fused elementwise kernel reads them); integers stay host tensors.
pub fn in_buffer(dtype: DType) -> bool {
    dtype.is_float() || dtype == DType::Bool
}

fn is_param(n: &Node) -> bool {
    matches!(n.op, Op::Param { .. })
}

/// How a [`Step::Moe`] reads its weight operand `w`: a narrow parameter behind precision
/// lowering's widening cast (times a per-row scale parameter), or the value itself.
fn moe_weight(graph: &Graph, w: ValueId) -> MoeWeight {
    let widened = |v: ValueId| {
        let cast = graph.node(v)?;
        let param = *cast.inputs.first()?;
        let p = graph.node(param)?;
        let narrow = matches!(
            p.ty.dtype,
            DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2
        );
        (matches!(cast.op, Op::Cast { to: DType::F32 }) && is_param(p) && narrow).then_some(param)
    };
    if let Some(param) = widened(w) {
        return MoeWeight::Narrow { param, scale: None };
    }
    let scaled = graph
        .node(w)
        .and_then(|n| match (&n.op, n.inputs.as_slice()) {
            (Op::Binary(BinaryOp::Mul), &[a, s]) => {
                let param = widened(a)?;
                let (rows, scale) = (graph.ty(param).shape.first()?, graph.node(s)?);
                let per_row = scale.ty.dtype == DType::F32
                    && is_param(scale)
                    && scale.ty.shape.as_slice() == [rows.clone(), kiln_ir::Dim::fixed(1)];
                per_row.then_some(MoeWeight::Narrow {
                    param,
                    scale: Some(s),
                })
            }
            _ => None,
        });
    scaled.unwrap_or(MoeWeight::Value(w))
}

/// The linear layer step for node `i`, `x · w` (operands 0 and 1) then `⊙ scale` (a parameter)
/// and `+ add`, if `w` is a weight parameter ([`weight_param`]).
fn linear(
    graph: &Graph,
    i: usize,
    node: &Node,
    transposed: bool,
    scale: Option<String>,
    add: Option<ValueId>,
) -> Option<Step> {
    let (weight, wdtype) = weight_param(graph, graph.node(node.inputs[1])?)?;
    Some(Step::Linear(Arc::from(vec![LinearLayer {
        node: i,
        x: node.inputs[0],
        weight,
        transposed,
        rounds_x: matches!(wdtype, DType::BF16 | DType::F8E4M3),
        scale,
        bias: None,
        add,
        activation: None,
        gate: None,
        heads: None,
        rope: None,
        round_bf16: false,
        append: None,
    }])))
}

/// The f32 parameter behind `v` if `v` is that parameter, or a reshape of it (precision
/// lowering's fp8 scales), of shape `[n]`.
fn column_param(graph: &Graph, v: ValueId, n: &Dim) -> Option<String> {
    let node = graph.node(v)?;
    if node.ty.shape.as_slice() != std::slice::from_ref(n) {
        return None;
    }
    let param = match &node.op {
        Op::Reshape { .. } => graph.node(node.inputs[0])?,
        _ => node,
    };
    match &param.op {
        Op::Param { name } if param.ty.dtype == DType::F32 => Some(name.clone()),
        _ => None,
    }
}

/// The parameter (and its dtype) behind a matmul's right operand if it is a 2-D weight: an f32
/// parameter, or a bf16 / f16 / fp8 one cast to f32 (precision lowering's form).
fn weight_param(graph: &Graph, w: &Node) -> Option<(String, DType)> {
    if w.ty.rank() != 2 {
        return None;
    }
    match &w.op {
        Op::Param { name } if w.ty.dtype == DType::F32 => Some((name.clone(), DType::F32)),
        Op::Cast { to: DType::F32 } => {
            let p = graph.node(*w.inputs.first()?)?;
            match &p.op {
                Op::Param { name }
                    if matches!(
                        p.ty.dtype,
                        DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2
                    ) =>
                {
                    Some((name.clone(), p.ty.dtype))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

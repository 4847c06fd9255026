//! Precision lowering (rule set 6, first version): `--precision f32|bf16|fp16|fp8` as PyTorch
//! AMP does it, run by [`lower_precision`] after [`crate::optimize`].
//!
//! - **Matmul operands** (and attention's `q`, `k`, `v`) are rounded to the compute dtype
//!   (bf16, f16; bf16 for fp8): `matmul(cast(cast(x, bf16), f32), cast(w_bf16, f32))`, an f32
//!   matmul of bf16 values, so it accumulates in f32 (f64 in the reference executor) and its
//!   result stays f32. This is exactly the CPU bf16 GEMM's contract (`kiln_kernels`'
//!   `matmul_bf16`: `C = bf16(A) · Wᵀ`, packed bf16 `W`, f32 `C`), which a backend matches on
//!   this pattern. A matmul typed bf16 instead rounds its *result* to bf16 too (PyTorch AMP's
//!   bf16 output); measured on the fixtures that rounding creates exact ties among the logits
//!   (gpt2: 93.75 % top-1, distilbert MLM: 90 %), so the result is kept f32. Attention's
//!   additive mask and its softmax stay f32.
//! - **Everything else stays f32**: softmax, norm statistics (`rmsnorm`, `layernorm` and their
//!   primitive forms), reductions, elementwise ops, embeddings and the residual stream.
//! - **Cast pairs cancel**: an operand already exactly representable in the compute dtype (a
//!   narrow weight `y`, seen as `cast(y, f32)`, or an operand rounded once already) is not
//!   rounded again, so no `cast(cast(cast(y, f32), bf16), f32)` chain is emitted, and each value
//!   is rounded once however many matmuls use it.
//! - **Weights**: a parameter consumed only by matmuls (as an operand) and `moe` expert/router
//!   weights changes its declared dtype to the storage dtype (bf16, f16, f8e4m3), so it is bound
//!   converted (`Convert::Cast`) and stored at that width. Parameters with other uses (the
//!   embedding table, tied LM heads, norm weights, biases) stay f32 and are cast where a matmul
//!   uses them.
//! - **`moe`** is weight-only: its weights are stored narrow and cast back to f32 at use, the
//!   block computes in f32 (its op rounds every step to the operand dtype, which in bf16 would
//!   also round the router's partial sums).
//! - **fp8** is e4m3 weight storage with per-channel scales: each narrow weight `W` is declared
//!   `f8e4m3` and gets a companion f32 parameter `W.scale` (`SCALE_SUFFIX`), one scale per
//!   output channel: `[rows, 1]` for a weight every use reads as `x · Wᵀ` (matmul
//!   `transpose_b`, moe experts), `[1, cols]` for one read as `x · W`, a scalar otherwise. The
//!   loader computes `scale = amax(|W|) / 448` over each channel from the checkpoint when
//!   binding (1 for an all-zero channel), stores `W / scale` cast to e4m3 (round to nearest
//!   even, as PyTorch), and binds the scales. The graph casts the e4m3 weight to f32 (exact),
//!   multiplies the matmul's product by the scales reshaped to `[n]` (`(x · W/s) * s`, as fp8
//!   GEMMs apply their scales to the output) and the moe weights before use. Two kinds of
//!   weight stay bf16 ([`kept_wide`]): output projections (the LM head, a classifier: their
//!   errors decide the top-1 token directly; fp8 recipes keep them wide) and key/value
//!   projections (their errors reach every later query through the cache; with grouped-query
//!   attention a few percent of the bytes; GPT-2's fused `c_attn` is a quarter of a layer).
//!   Activations are rounded to bf16 as above. Measured against transformers' f32 logits
//!   (`tests/precision.rs`): 0.8–4.0 % relative error and 178/186 = 95.7 % top-1 agreement over
//!   every causal fixture position (per family 91–100 %); every weight in e4m3 gave 0.9–5.3 %
//!   and 93.0 %, the head alone in bf16 91.9 %. Activation scaling is left for later.
//! - **A refined LM head** (targets with [`Target::refines_logits`], the CPUs): an output
//!   projection `W[n, k]` read as `x · Wᵀ` is stored in e4m3 like the others, plus its residual
//!   `W − e4m3(W / s) · s`, itself in e4m3 with per-row scales (`<name>.residual`,
//!   [`RESIDUAL_SUFFIX`]), and each residual row's L2 norm (`<name>.residual.bound`). The
//!   product is `refine_logits(fp8 product, x, residual, scales, bounds)`
//!   ([`Op::RefineLogits`]): every logit from the e4m3 weight, and the residual's product added
//!   to the candidates only, the columns whose refined value can still be the largest given the
//!   bound (`|x · r_j| ≤ ‖x‖ · ‖r_j‖`). The largest logit and its token are therefore those of
//!   the two-part weight (about 7 significant bits, as bf16), while a decode step reads one
//!   byte per head weight plus the candidates' residual rows (a few hundred of 32,000 on the
//!   125M Llama). The residual doubles the head's memory, not its reads. Elsewhere (CUDA)
//!   the head stays bf16.
//!
//! - **The KV cache is stored in the compute dtype** ([`CacheState`]), as under AMP, where the
//!   K/V projections' outputs are bf16: a graph output used otherwise only as attention's
//!   keys or values (which round it anyway) is output rounded, typed bf16; a decode graph's
//!   cache input concatenated with the new keys into such an output is declared bf16, and the
//!   new keys are rounded *before* the concat. Attention computes the same values as before
//!   (rounding commutes with concat), but the cache is never re-rounded: each step rounds only
//!   its new keys, where rounding the concatenated cache cost O(context) per step.
//!
//! A target that cannot run the precision is refused with the targets that can
//! ([`crate::cost::Target::precisions`]).
//!
//! Matmul epilogues (`linear` ops) are formed after lowering
//! ([`crate::pipeline::lowered_passes`]), so that fp8's scale products join them; a `linear`
//! op met here is kept as it is, in f32.

use crate::cost::{Target, TARGETS};
use kiln_ir::{BinaryOp, DType, Dim, Graph, Node, Op, TensorType, ValueId};
use std::collections::HashMap;

/// Which values of an fp8 weight share one scale: the output channels of every use (rows of a
/// weight used as `x · Wᵀ`, columns of one used as `x · W`), or the whole tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channels {
    Rows,
    Cols,
    Tensor,
}

/// The channels of the 2-D weight parameter `w` over all its uses in `g`.
fn channels(g: &Graph, w: ValueId) -> Channels {
    let mut kind = None;
    for node in g.nodes() {
        for (i, &v) in node.inputs.iter().enumerate() {
            if v != w {
                continue;
            }
            let k = match node.op {
                Op::MatMul { transpose_b, .. } if i == 1 => {
                    if transpose_b {
                        Channels::Rows
                    } else {
                        Channels::Cols
                    }
                }
                Op::Moe { .. } if i > 0 => Channels::Rows,
                _ => Channels::Tensor,
            };
            if kind.is_some_and(|c| c != k) {
                return Channels::Tensor;
            }
            kind = Some(k);
        }
    }
    kind.unwrap_or(Channels::Tensor)
}

/// The suffix of an fp8 weight's scale parameter: `<name>.scale`, an f32 scalar the loader
/// computes and binds (see the module docs).
pub const SCALE_SUFFIX: &str = ".scale";

/// The suffix of a rounded copy of an f32 weight: `<name>.rounded`, declared in the compute
/// dtype, which the loader binds as the weight cast to that dtype. Precision lowering reads a
/// matmul's f32 weight through it when the weight must stay f32 for another reader (a tied
/// embedding and LM head), so the product reads narrow weights stored once, as every other
/// weight, instead of rounding the f32 weight on every run.
pub const ROUNDED_SUFFIX: &str = ".rounded";

/// The suffix of an fp8 LM head's residual: `<name>.residual`, `[n, k]` in e4m3, the part of
/// the weight its e4m3 storage lost (`w − e4m3(w / scale) · scale`), itself stored scaled by
/// `<name>.residual.scale` (`[n]`, per row) and with `<name>.residual.bound` (`[n]`), each
/// scaled residual row's L2 norm; the loader computes all three (see the module docs).
pub const RESIDUAL_SUFFIX: &str = ".residual";

/// The suffix of a residual's per-row norm bound ([`RESIDUAL_SUFFIX`]).
pub const BOUND_SUFFIX: &str = ".bound";

/// The largest finite e4m3 value; fp8 weights are stored as `w / scale` with
/// `scale = amax(|w|) / E4M3_MAX`.
pub const E4M3_MAX: f32 = 448.0;

/// Numeric precision of a compiled model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Everything in f32 (no lowering).
    F32,
    /// bf16 matmul operands and weights, f32 elsewhere.
    Bf16,
    /// IEEE half matmul operands and weights, f32 elsewhere.
    Fp16,
    /// fp8 e4m3 weight storage, bf16 matmul operands, f32 elsewhere.
    Fp8,
}

impl Precision {
    /// Every precision, in `--precision` order.
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::Bf16,
        Precision::Fp16,
        Precision::Fp8,
    ];

    /// The precision spelled `name` (`f32`, `bf16`, `fp16`, `fp8`).
    pub fn from_name(name: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The `--precision` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp8 => "fp8",
        }
    }

    /// The dtype matmul operands are computed in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 | Precision::Fp8 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }

    /// The dtype matmul weights are stored in.
    pub fn storage_dtype(self) -> DType {
        match self {
            Precision::Fp8 => DType::F8E4M3,
            other => other.compute_dtype(),
        }
    }
}

/// Precision lowering failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    /// The target cannot run the precision.
    #[error("--precision {precision} is not supported on target {target}; targets with it: {}", .supported.join(", "))]
    Unsupported {
        /// The precision asked for.
        precision: &'static str,
        /// The target asked for.
        target: &'static str,
        /// The targets that can run it.
        supported: Vec<&'static str>,
    },
    /// A rewritten node failed type inference (a kiln bug).
    #[error("internal: precision lowering built an ill-typed node: {0}")]
    Internal(String),
}

/// Lowers `g` to `precision` for `target` (see the module docs). `f32` returns the graph as it
/// is.
pub fn lower_precision(
    g: &Graph,
    precision: Precision,
    target: &Target,
) -> Result<Graph, PrecisionError> {
    check(precision, target)?;
    if precision == Precision::F32 {
        return Ok(g.clone());
    }
    Lowering::new(g, precision, target.refines_logits).run()
}

/// Refuses a precision the target cannot run, naming the targets that can.
pub fn check(precision: Precision, target: &Target) -> Result<(), PrecisionError> {
    if !target.supports(precision) {
        return Err(PrecisionError::Unsupported {
            precision: precision.name(),
            target: target.name,
            supported: TARGETS
                .iter()
                .filter(|t| t.supports(precision))
                .map(|t| t.name)
                .collect(),
        });
    }
    Ok(())
}

/// Whether node `user` uses `v` as a matmul operand or a moe weight.
fn weight_use(user: &Node, v: ValueId) -> bool {
    match user.op {
        Op::MatMul { .. } => user.ty.dtype == DType::F32,
        Op::Moe { .. } => user.ty.dtype == DType::F32 && user.inputs[0] != v,
        _ => false,
    }
}

struct Lowering<'a> {
    g: &'a Graph,
    compute: DType,
    storage: DType,
    out: Graph,
    map: Vec<ValueId>,
    /// Casts already emitted, by (new value, dtype).
    casts: HashMap<(ValueId, DType), ValueId>,
    /// Parameters whose declared dtype becomes the storage dtype.
    narrow: Vec<bool>,
    /// fp8: parameters stored in the compute dtype instead, or refined ([`kept_wide`]).
    head: Vec<Option<Kept>>,
    /// fp8 on a target that refines logits: an output projection is stored in e4m3 with a
    /// residual read by `refine_logits` instead of in the compute dtype.
    refine: bool,
    /// fp8: each refined weight's residual, its per-row scale and its bound, as new values.
    residuals: HashMap<ValueId, [ValueId; 3]>,
    /// fp8: each narrow parameter's scale parameter and that scale as a matmul product's
    /// factor (per-channel scales reshaped to `[n]`), as new values.
    scales: HashMap<ValueId, (ValueId, ValueId)>,
    /// The KV cache values kept in the compute dtype.
    cache: CacheState,
    /// Per f32 parameter kept f32: its rounded copy ([`ROUNDED_SUFFIX`]) cast to f32, once made.
    rounded_params: HashMap<ValueId, ValueId>,
}

/// The values of a KV cache that precision lowering keeps in the compute dtype (see the module
/// docs), by node of the source graph.
struct CacheState {
    /// A graph output read otherwise only as attention's keys or values: output rounded.
    rounded_output: Vec<bool>,
    /// An f32 input whose only use is a `concat` into such an output: declared narrow.
    narrow_input: Vec<bool>,
    /// That `concat`: computed narrow, its other operands rounded first.
    narrow_concat: Vec<bool>,
}

impl CacheState {
    fn new(g: &Graph, users: &[Vec<usize>]) -> Self {
        let nodes = g.nodes();
        let rounded_output: Vec<bool> = (0..nodes.len())
            .map(|i| {
                let id = ValueId(i as u32);
                nodes[i].ty.dtype == DType::F32
                    && users[i].contains(&usize::MAX)
                    && users[i].iter().any(|&u| u != usize::MAX)
                    && users[i].iter().all(|&u| {
                        u == usize::MAX
                            || (matches!(nodes[u].op, Op::Attention { .. })
                                && nodes[u].ty.dtype == DType::F32
                                && nodes[u].inputs[0] != id
                                && nodes[u].inputs.get(3) != Some(&id))
                    })
            })
            .collect();
        let mut narrow_input = vec![false; nodes.len()];
        let mut narrow_concat = vec![false; nodes.len()];
        for (i, node) in nodes.iter().enumerate() {
            if let (Op::Concat { .. }, Some(&p)) = (&node.op, node.inputs.first()) {
                let past = &nodes[p.index()];
                if rounded_output[i]
                    && matches!(past.op, Op::Input { .. })
                    && past.ty.dtype == DType::F32
                    && users[p.index()] == [i]
                {
                    narrow_input[p.index()] = true;
                    narrow_concat[i] = true;
                }
            }
        }
        CacheState {
            rounded_output,
            narrow_input,
            narrow_concat,
        }
    }
}

impl<'a> Lowering<'a> {
    fn new(g: &'a Graph, precision: Precision, refine: bool) -> Self {
        let n = g.nodes().len();
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in g.nodes().iter().enumerate() {
            for v in &node.inputs {
                users[v.index()].push(i);
            }
        }
        for o in g.outputs() {
            users[o.value.index()].push(usize::MAX);
        }
        let narrow = g
            .iter()
            .map(|(v, node)| {
                matches!(node.op, Op::Param { .. })
                    && node.ty.dtype == DType::F32
                    && !users[v.index()].is_empty()
                    && users[v.index()]
                        .iter()
                        .all(|&u| u != usize::MAX && weight_use(&g.nodes()[u], v))
            })
            .collect();
        Lowering {
            g,
            compute: precision.compute_dtype(),
            storage: precision.storage_dtype(),
            out: Graph::new(),
            map: Vec::with_capacity(n),
            casts: HashMap::new(),
            head: kept_wide(g, &users),
            refine,
            residuals: HashMap::new(),
            cache: CacheState::new(g, &users),
            narrow,
            scales: HashMap::new(),
            rounded_params: HashMap::new(),
        }
    }

    fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, PrecisionError> {
        self.out
            .add(op, inputs)
            .map_err(|e| PrecisionError::Internal(e.to_string()))
    }

    /// `v` (a new value) as `to`, reusing casts already emitted.
    fn cast(&mut self, v: ValueId, to: DType) -> Result<ValueId, PrecisionError> {
        if self.out.ty(v).dtype == to {
            return Ok(v);
        }
        if let Some(&c) = self.casts.get(&(v, to)) {
            return Ok(c);
        }
        let c = self.add(Op::Cast { to }, &[v])?;
        self.casts.insert((v, to), c);
        Ok(c)
    }

    /// `v` (a new float value) as an f32 value whose elements are rounded to the compute dtype:
    /// `cast(cast(v, compute), f32)`, except that a pair cancels when `v` is already exactly
    /// representable in the compute dtype (a narrow parameter, or `cast(y, f32)` of one), where
    /// it is `cast(y, f32)` alone.
    fn rounded(&mut self, v: ValueId) -> Result<ValueId, PrecisionError> {
        let dtype = self.out.ty(v).dtype;
        if dtype != DType::F32 {
            if exact_in(dtype, self.compute) {
                return self.cast(v, DType::F32);
            }
            let c = self.cast(v, self.compute)?;
            return self.cast(c, DType::F32);
        }
        let node = &self.out.nodes()[v.index()];
        if let (Op::Cast { to: DType::F32 }, [y]) = (&node.op, node.inputs.as_slice()) {
            if exact_in(self.out.ty(*y).dtype, self.compute) {
                return Ok(v);
            }
        }
        let c = self.cast(v, self.compute)?;
        self.cast(c, DType::F32)
    }

    /// For an f32 2-D parameter `w` of the original graph that stays f32 (another reader needs
    /// it), its rounded copy as an f32 value: `cast(p, f32)` with `p` the parameter
    /// `<name>.rounded` declared in the compute dtype (made once).
    fn rounded_param(&mut self, w: ValueId) -> Option<Result<ValueId, PrecisionError>> {
        let node = self.g.node(w)?;
        let Op::Param { name } = &node.op else {
            return None;
        };
        if node.ty.dtype != DType::F32 || node.ty.rank() != 2 || self.narrow[w.index()] {
            return None;
        }
        if let Some(&r) = self.rounded_params.get(&w) {
            return Some(Ok(r));
        }
        let p = self.out.param(
            &format!("{name}{ROUNDED_SUFFIX}"),
            TensorType {
                dtype: self.compute,
                shape: node.ty.shape.clone(),
            },
        );
        let r = self.cast(p, DType::F32);
        if let Ok(r) = r {
            self.rounded_params.insert(w, r);
        }
        Some(r)
    }

    fn run(mut self) -> Result<Graph, PrecisionError> {
        let g = self.g;
        for (v, node) in g.iter() {
            let ins: Vec<ValueId> = node.inputs.iter().map(|i| self.map[i.index()]).collect();
            let new = match &node.op {
                Op::Param { name } if self.narrow[v.index()] => {
                    let refined = self.storage == DType::F8E4M3
                        && self.refine
                        && self.head[v.index()] == Some(Kept::Output)
                        && channels(g, v) == Channels::Rows
                        && node.ty.rank() == 2;
                    let storage = match self.head[v.index()] {
                        Some(_) if !refined => self.compute,
                        _ => self.storage,
                    };
                    let p = self.out.param(
                        name,
                        TensorType {
                            dtype: storage,
                            shape: node.ty.shape.clone(),
                        },
                    );
                    if storage == DType::F8E4M3 {
                        let channels = channels(g, v);
                        let dims = &node.ty.shape;
                        let shape = match (channels, dims.as_slice()) {
                            (Channels::Rows, [rows, _]) => vec![rows.clone(), Dim::fixed(1)],
                            (Channels::Cols, [_, cols]) => vec![Dim::fixed(1), cols.clone()],
                            _ => Vec::new(),
                        };
                        let scale = self.out.param(
                            &format!("{name}{SCALE_SUFFIX}"),
                            TensorType {
                                dtype: DType::F32,
                                shape,
                            },
                        );
                        // A matmul's product `[.., n]` takes per-channel scales as `[n]`.
                        let per_product = match (channels, dims.as_slice()) {
                            (Channels::Rows, [n, _]) | (Channels::Cols, [_, n]) => self.add(
                                Op::Reshape {
                                    shape: vec![n.clone()],
                                },
                                &[scale],
                            )?,
                            _ => scale,
                        };
                        self.scales.insert(p, (scale, per_product));
                    }
                    if refined {
                        let residual = self.out.param(
                            &format!("{name}{RESIDUAL_SUFFIX}"),
                            TensorType {
                                dtype: DType::F8E4M3,
                                shape: node.ty.shape.clone(),
                            },
                        );
                        let rows = TensorType {
                            dtype: DType::F32,
                            shape: node.ty.shape[..1].to_vec(),
                        };
                        let residual_name = format!("{name}{RESIDUAL_SUFFIX}");
                        let scale = self
                            .out
                            .param(&format!("{residual_name}{SCALE_SUFFIX}"), rows.clone());
                        let bound = self
                            .out
                            .param(&format!("{residual_name}{BOUND_SUFFIX}"), rows);
                        self.residuals.insert(p, [residual, scale, bound]);
                    }
                    p
                }
                Op::MatMul { .. } | Op::Attention { .. } if node.ty.dtype == DType::F32 => {
                    // Matmul operands, attention's q, k, v (not its additive mask); a matmul's
                    // f32 weight kept f32 for another reader through its rounded copy.
                    let low = ins
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| match (i, &node.op) {
                            (1, Op::MatMul { .. }) => match self.rounded_param(node.inputs[1]) {
                                Some(r) => r,
                                None => self.rounded(x),
                            },
                            (0..3, _) => self.rounded(x),
                            _ => Ok(x),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut r = self.add(node.op.clone(), &low)?;
                    // fp8: the weight's scales multiply the product; a refined output
                    // projection's residual refines it.
                    for x in &ins {
                        if let Some(&(_, scale)) = self.scales.get(x) {
                            r = self.add(Op::Binary(BinaryOp::Mul), &[r, scale])?;
                        }
                    }
                    if let Some(&[residual, scale, bound]) =
                        ins.get(1).and_then(|w| self.residuals.get(w))
                    {
                        r = self.add(Op::RefineLogits, &[r, low[0], residual, scale, bound])?;
                    }
                    r
                }
                Op::Moe { .. } if node.ty.dtype == DType::F32 => {
                    let wide = ins
                        .iter()
                        .map(|&i| {
                            let w = self.cast(i, DType::F32)?;
                            match self.scales.get(&i) {
                                Some(&(scale, _)) => {
                                    self.add(Op::Binary(BinaryOp::Mul), &[w, scale])
                                }
                                None => Ok(w),
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    self.add(node.op.clone(), &wide)?
                }
                Op::Input { .. } if self.cache.narrow_input[v.index()] => {
                    let mut narrow = node.clone();
                    narrow.ty.dtype = self.compute;
                    self.out.push(narrow)
                }
                Op::Concat { .. } if self.cache.narrow_concat[v.index()] => {
                    let low = ins
                        .iter()
                        .map(|&x| self.cast(x, self.compute))
                        .collect::<Result<Vec<_>, _>>()?;
                    self.add(node.op.clone(), &low)?
                }
                Op::Input { .. } | Op::Param { .. } => self.out.push(node.clone()),
                _ => self.add(node.op.clone(), &ins)?,
            };
            self.map.push(new);
        }
        for o in g.outputs() {
            let mut v = self.map[o.value.index()];
            if self.cache.rounded_output[o.value.index()] {
                v = self.cast(v, self.compute)?;
            }
            self.out.add_output(&o.name, v);
        }
        Ok(crate::dce::eliminate(&self.out))
    }
}

/// Per node: a parameter fp8 keeps in the compute dtype (bf16), the weight of a matmul whose
/// product either goes only to graph outputs (the LM head, a classifier: its per-logit errors
/// decide the top-1 token directly, and fp8 recipes keep it in bf16) or becomes attention's
/// keys or values (the K/V projections: their errors reach every later query through the
/// cache; with grouped-query attention they are a few percent of the weights). Both found
/// through layout and elementwise ops. Measured on the fixtures (`tests/precision.rs`).
fn kept_wide(g: &Graph, users: &[Vec<usize>]) -> Vec<Option<Kept>> {
    let nodes = g.nodes();
    let passes = |n: &Node| {
        matches!(
            n.op,
            Op::Reshape { .. }
                | Op::Permute { .. }
                | Op::Slice { .. }
                | Op::Expand { .. }
                | Op::Concat { .. }
                | Op::Cast { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Rotary
                | Op::FusedElementwise { .. }
        )
    };
    // Whether every use of the node leads, through pass-through ops, to outputs only; whether
    // some use leads to attention's keys or values.
    let (mut only_outputs, mut kv) = (vec![false; nodes.len()], vec![false; nodes.len()]);
    for i in (0..nodes.len()).rev() {
        only_outputs[i] = !users[i].is_empty()
            && users[i].iter().all(|&u| {
                u == usize::MAX
                    || (passes(&nodes[u])
                        && !matches!(nodes[u].op, Op::Concat { .. })
                        && only_outputs[u])
            });
        let id = ValueId(i as u32);
        kv[i] = users[i].iter().any(|&u| {
            u != usize::MAX
                && match nodes[u].op {
                    Op::Attention { .. } => nodes[u].inputs[1..3].contains(&id),
                    _ => passes(&nodes[u]) && kv[u],
                }
        });
    }
    (0..nodes.len())
        .map(|i| {
            if !matches!(nodes[i].op, Op::Param { .. }) {
                return None;
            }
            let products = || {
                users[i]
                    .iter()
                    .filter(|&&u| u != usize::MAX && matches!(nodes[u].op, Op::MatMul { .. }))
            };
            if products().any(|&u| kv[u]) {
                Some(Kept::KeyValue)
            } else if products().any(|&u| only_outputs[u]) {
                Some(Kept::Output)
            } else {
                None
            }
        })
        .collect()
}

/// Why fp8 keeps a weight out of plain e4m3 storage ([`kept_wide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// An output projection: bf16, or e4m3 with a residual where the target refines logits.
    Output,
    /// A key or value projection: bf16.
    KeyValue,
}

/// Whether every value of `from` is exactly a value of `to`.
fn exact_in(from: DType, to: DType) -> bool {
    from == to
        || matches!(
            (from, to),
            (
                DType::F8E4M3 | DType::F8E5M2,
                DType::BF16 | DType::F16 | DType::F32
            ) | (DType::BF16 | DType::F16, DType::F32)
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Dim, Shape, F64};
    use kiln_runtime::reference::{self, NoParams};
    use kiln_runtime::Tensor;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn ty(dtype: DType, dims: &[i64]) -> TensorType {
        TensorType {
            dtype,
            shape: dims.iter().map(|&d| Dim::fixed(d)).collect::<Shape>(),
        }
    }

    fn count(g: &Graph, f: impl Fn(&Node) -> bool) -> usize {
        g.nodes().iter().filter(|n| f(n)).count()
    }

    /// x → rmsnorm → q·wᵀ → (·w2ᵀ directly) → softmax → + x; w also used by nothing else, the
    /// norm weight stays f32.
    fn block() -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", ty(DType::F32, &[4, 8]));
        let nw = g.param("norm.weight", ty(DType::F32, &[8]));
        let w1 = g.param("w1", ty(DType::F32, &[8, 8]));
        let w2 = g.param("w2", ty(DType::F32, &[8, 8]));
        let n = g.add(Op::RmsNorm { eps: F64(1e-6) }, &[x, nw]).unwrap();
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let h = g.add(mm.clone(), &[n, w1]).unwrap();
        let h2 = g.add(mm, &[h, w2]).unwrap();
        let s = g.add(Op::Softmax { axis: 1 }, &[h2]).unwrap();
        let y = g.add(Op::Binary(kiln_ir::BinaryOp::Add), &[s, x]).unwrap();
        g.add_output("y", y);
        g
    }

    /// A tied embedding: the f32 table is gathered and is the head's weight. The gather reads
    /// the f32 parameter; the head reads `<name>.rounded`, declared bf16, through one cast.
    #[test]
    fn a_tied_weight_is_read_through_its_rounded_copy() {
        let mut g = Graph::new();
        let ids = g.input("ids", ty(DType::I64, &[4]));
        let table = g.param("embed", ty(DType::F32, &[16, 8]));
        let e = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let logits = g.add(mm, &[e, table]).unwrap();
        g.add_output("logits", logits);
        for p in [Precision::Bf16, Precision::Fp8] {
            let low = lower_precision(&g, p, &Target::cpu()).unwrap();
            kiln_ir::verify(&low).unwrap();
            let params: Vec<(String, DType)> = low
                .params()
                .map(|(n, _, t)| (n.to_string(), t.dtype))
                .collect();
            assert_eq!(
                params,
                [
                    ("embed".to_string(), DType::F32),
                    (format!("embed{ROUNDED_SUFFIX}"), DType::BF16)
                ],
                "{p:?}"
            );
            let head = low.node(low.outputs()[0].value).unwrap();
            let w = low.node(head.inputs[1]).unwrap();
            assert_eq!(w.op, Op::Cast { to: DType::F32 }, "{p:?}");
            assert!(
                matches!(&low.node(w.inputs[0]).unwrap().op, Op::Param { name } if name.ends_with(ROUNDED_SUFFIX))
            );
        }
    }

    /// The dtype `v`'s elements are exactly representable in: `v`'s own, or `y`'s for
    /// `cast(y, f32)`.
    fn rounded_to(g: &Graph, v: ValueId) -> DType {
        let n = &g.nodes()[v.index()];
        match n.op {
            Op::Cast { to: DType::F32 } => g.ty(n.inputs[0]).dtype,
            _ => n.ty.dtype,
        }
    }

    #[test]
    fn matmul_operands_and_weights_go_to_bf16_the_rest_stays_f32() {
        let g = lower_precision(&block(), Precision::Bf16, &Target::cpu()).unwrap();
        kiln_ir::verify(&g).unwrap();
        for n in g.nodes() {
            match &n.op {
                Op::MatMul { .. } => {
                    // An f32 matmul (f32 accumulation and result) of bf16 values.
                    assert_eq!(n.ty.dtype, DType::F32);
                    for i in &n.inputs {
                        assert_eq!(g.ty(*i).dtype, DType::F32);
                        assert_eq!(rounded_to(&g, *i), DType::BF16);
                    }
                }
                Op::Param { name } if name.starts_with('w') => {
                    assert_eq!(n.ty.dtype, DType::BF16, "{name}")
                }
                Op::Param { .. } | Op::RmsNorm { .. } | Op::Softmax { .. } | Op::Binary(_) => {
                    assert_eq!(n.ty.dtype, DType::F32, "{:?}", n.op)
                }
                _ => {}
            }
        }
        // Rounded to bf16: the norm's output and the first matmul's (one cast pair each);
        // the weights are only widened (their pair cancels).
        assert_eq!(
            count(&g, |n| matches!(n.op, Op::Cast { to: DType::BF16 })),
            2
        );
        assert_eq!(
            count(&g, |n| matches!(n.op, Op::Cast { to: DType::F32 })),
            4
        );
        // No cast(cast(cast(..))) chain: every cast to bf16 reads an f32 value that is not
        // itself a widened bf16 value.
        for n in g.nodes() {
            if let Op::Cast { to: DType::BF16 } = n.op {
                assert_eq!(rounded_to(&g, n.inputs[0]), DType::F32);
            }
        }
        assert_eq!(g.ty(g.outputs()[0].value).dtype, DType::F32);
    }

    #[test]
    fn an_operand_used_twice_is_rounded_once() {
        let mut g = Graph::new();
        let x = g.input("x", ty(DType::F32, &[4, 8]));
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let s = g.add(mm, &[x, x]).unwrap();
        let plain = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        };
        let y = g.add(plain, &[s, x]).unwrap();
        g.add_output("y", y);
        let l = lower_precision(&g, Precision::Bf16, &Target::cpu()).unwrap();
        kiln_ir::verify(&l).unwrap();
        // x once, s once.
        assert_eq!(
            count(&l, |n| matches!(n.op, Op::Cast { to: DType::BF16 })),
            2
        );
    }

    #[test]
    fn fp8_stores_scaled_e4m3_weights_and_rounds_operands_to_bf16() {
        let g = lower_precision(&block(), Precision::Fp8, &Target::cpu()).unwrap();
        kiln_ir::verify(&g).unwrap();
        let dtype = |name: &str| {
            g.params()
                .find(|(n, _, _)| *n == name)
                .map(|(_, _, t)| (t.dtype, t.shape.len()))
        };
        assert_eq!(dtype("w1"), Some((DType::F8E4M3, 2)));
        // One scale per output channel, as the weight's uses read it.
        let scale = g.params().find(|(n, ..)| *n == "w1.scale").unwrap().2;
        let w1 = g.params().find(|(n, ..)| *n == "w1").unwrap().2;
        let transposed = g.nodes().iter().any(|n| {
            matches!(
                n.op,
                Op::MatMul {
                    transpose_b: true,
                    ..
                }
            ) && n
                .inputs
                .get(1)
                .is_some_and(|&i| rounded_to(&g, i) == DType::F8E4M3)
        });
        let want = if transposed {
            vec![w1.shape[0].clone(), kiln_ir::Dim::fixed(1)]
        } else {
            vec![kiln_ir::Dim::fixed(1), w1.shape[1].clone()]
        };
        assert_eq!((scale.dtype, &scale.shape), (DType::F32, &want));
        assert_eq!(dtype("norm.weight"), Some((DType::F32, 1)));
        for n in g.nodes() {
            if let Op::MatMul { .. } = n.op {
                assert_eq!(n.ty.dtype, DType::F32);
                let kinds: Vec<DType> = n.inputs.iter().map(|&i| rounded_to(&g, i)).collect();
                assert!(kinds.contains(&DType::F8E4M3), "{kinds:?}");
            }
        }
        // Each product is multiplied by its weight's scale.
        assert_eq!(count(&g, |n| matches!(n.op, Op::Binary(BinaryOp::Mul))), 2);
    }

    #[test]
    fn attention_rounds_q_k_v_but_not_the_mask() {
        let mut g = Graph::new();
        let q = g.input("q", ty(DType::F32, &[1, 2, 4, 8]));
        let mask = g.input("mask", ty(DType::F32, &[1, 1, 4, 4]));
        let a = g
            .add(
                Op::Attention {
                    scale: F64(0.5),
                    causal: true,
                    window: 0,
                    merge_heads: false,
                },
                &[q, q, q, mask],
            )
            .unwrap();
        g.add_output("a", a);
        let l = lower_precision(&g, Precision::Bf16, &Target::cpu()).unwrap();
        kiln_ir::verify(&l).unwrap();
        let att = l
            .nodes()
            .iter()
            .find(|n| matches!(n.op, Op::Attention { .. }))
            .unwrap();
        assert_eq!(att.ty.dtype, DType::F32);
        let kinds: Vec<DType> = att.inputs.iter().map(|&i| rounded_to(&l, i)).collect();
        assert_eq!(kinds, [DType::BF16, DType::BF16, DType::BF16, DType::F32]);
    }

    #[test]
    fn f32_is_the_identity() {
        let g = block();
        assert_eq!(
            lower_precision(&g, Precision::F32, &Target::cpu()).unwrap(),
            g
        );
    }

    #[test]
    fn unsupported_precision_names_the_targets_that_have_it() {
        let err = lower_precision(&block(), Precision::Fp16, &Target::cpu()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fp16"), "{msg}");
        assert!(msg.contains("cpu"), "{msg}");
        assert!(msg.contains("cuda-sm80, cuda-sm90"), "{msg}");
        assert!(lower_precision(
            &block(),
            Precision::Fp16,
            &Target::by_name("cuda-sm90").unwrap()
        )
        .is_ok());
    }

    /// fp8 keeps an output projection's weight (here `head`, whose product is the output after a
    /// reshape) in bf16 without a scale, and the weights inside the block in e4m3 with scales.
    #[test]
    fn fp8_keeps_the_output_projection_in_bf16() {
        let mut g = block();
        let h = g.param("head", ty(DType::F32, &[3, 8]));
        let y = g.outputs()[0].value;
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let logits = g.add(mm, &[y, h]).unwrap();
        let flat = g
            .add(
                Op::Reshape {
                    shape: vec![Dim::fixed(12)],
                },
                &[logits],
            )
            .unwrap();
        g.add_output("logits", flat);
        let low =
            lower_precision(&g, Precision::Fp8, &Target::by_name("cuda-sm90").unwrap()).unwrap();
        let dtype = |name: &str| low.params().find(|(n, _, _)| *n == name).map(|p| p.2.dtype);
        assert_eq!(dtype("head"), Some(DType::BF16));
        assert_eq!(dtype("head.scale"), None);
        assert_eq!(dtype("w1"), Some(DType::F8E4M3));
        assert_eq!(dtype("w1.scale"), Some(DType::F32));
    }

    /// On a CPU target fp8 stores the output projection in e4m3 too, with a residual, its
    /// scales and bounds, and refines the product with `refine_logits`.
    #[test]
    fn fp8_refines_the_output_projection_on_the_cpu() {
        let mut g = block();
        let h = g.param("head", ty(DType::F32, &[3, 8]));
        let y = g.outputs()[0].value;
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let logits = g.add(mm, &[y, h]).unwrap();
        g.add_output("logits", logits);
        let low = lower_precision(&g, Precision::Fp8, &Target::cpu()).unwrap();
        let param = |name: &str| {
            low.params()
                .find(|(n, _, _)| *n == name)
                .map(|p| p.2.clone())
        };
        assert_eq!(param("head").unwrap(), ty(DType::F8E4M3, &[3, 8]));
        assert_eq!(param("head.scale").unwrap(), ty(DType::F32, &[3, 1]));
        assert_eq!(param("head.residual").unwrap(), ty(DType::F8E4M3, &[3, 8]));
        assert_eq!(param("head.residual.scale").unwrap(), ty(DType::F32, &[3]));
        assert_eq!(param("head.residual.bound").unwrap(), ty(DType::F32, &[3]));
        let out = low
            .outputs()
            .iter()
            .find(|o| o.name == "logits")
            .unwrap()
            .value;
        let node = low.node(out).unwrap();
        assert_eq!(node.op, Op::RefineLogits);
        assert_eq!(low.node(node.inputs[2]).unwrap().op.name(), "param");
        // x is the product's own (rounded) operand.
        let product = low
            .node(low.node(node.inputs[0]).unwrap().inputs[0])
            .unwrap();
        assert_eq!(product.inputs[0], node.inputs[1]);
    }

    /// fp8 keeps the key and value projections in bf16 (their products become attention's
    /// keys and values, here through a reshape) and stores the query projection in e4m3.
    #[test]
    fn fp8_keeps_key_and_value_projections_in_bf16() {
        let mut g = Graph::new();
        let x = g.input("x", ty(DType::F32, &[4, 8]));
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let heads = |g: &mut Graph, name: &str| {
            let w = g.param(name, ty(DType::F32, &[8, 8]));
            let p = g.add(mm.clone(), &[x, w]).unwrap();
            g.add(
                Op::Reshape {
                    shape: [1, 1, 4, 8].iter().map(|&d| Dim::fixed(d)).collect(),
                },
                &[p],
            )
            .unwrap()
        };
        let (q, k, v) = (
            heads(&mut g, "wq"),
            heads(&mut g, "wk"),
            heads(&mut g, "wv"),
        );
        let attn = Op::Attention {
            scale: F64(0.5),
            causal: true,
            window: 0,
            merge_heads: false,
        };
        let a = g.add(attn, &[q, k, v]).unwrap();
        g.add_output("a", a);
        let low =
            lower_precision(&g, Precision::Fp8, &Target::by_name("cuda-sm90").unwrap()).unwrap();
        let dtype = |name: &str| low.params().find(|(n, _, _)| *n == name).map(|p| p.2.dtype);
        assert_eq!(dtype("wq"), Some(DType::F8E4M3));
        assert_eq!(dtype("wk"), Some(DType::BF16));
        assert_eq!(dtype("wv"), Some(DType::BF16));
    }

    /// A decode step's cache: `present = concat(past, k_new)`, an output read otherwise only
    /// as attention's keys (and a prefill-like output `v`, read only as its values).
    fn cached_attention() -> Graph {
        let mut g = Graph::new();
        let q = g.input("q", ty(DType::F32, &[1, 2, 1, 8]));
        let past = g.input("past", ty(DType::F32, &[1, 2, 3, 8]));
        let k = g.input("k", ty(DType::F32, &[1, 2, 1, 8]));
        let v = g.input("v", ty(DType::F32, &[1, 2, 4, 8]));
        let present = g.add(Op::Concat { axis: 2 }, &[past, k]).unwrap();
        let attn = Op::Attention {
            scale: F64(0.5),
            causal: false,
            window: 0,
            merge_heads: false,
        };
        let a = g.add(attn, &[q, present, v]).unwrap();
        g.add_output("a", a);
        g.add_output("present", present);
        g.add_output("v", v);
        g
    }

    #[test]
    fn the_kv_cache_is_kept_in_the_compute_dtype_and_rounded_once_at_append() {
        let g = cached_attention();
        let low = lower_precision(&g, Precision::Bf16, &Target::cpu()).unwrap();
        kiln_ir::verify(&low).unwrap();
        let input = |name: &str| low.inputs().find(|i| i.0 == name).unwrap().2.dtype;
        let output = |name: &str| {
            let o = low.outputs().iter().find(|o| o.name == name).unwrap();
            low.ty(o.value).dtype
        };
        // The cache comes in and goes out narrow; other inputs and the result stay f32.
        assert_eq!(input("past"), DType::BF16);
        assert_eq!(
            (input("q"), input("k"), input("v")),
            (DType::F32, DType::F32, DType::F32)
        );
        assert_eq!(
            (output("present"), output("v"), output("a")),
            (DType::BF16, DType::BF16, DType::F32)
        );
        // Only the new keys are rounded before the concat; the concat itself is never rounded.
        let concat = low
            .nodes()
            .iter()
            .find(|n| matches!(n.op, Op::Concat { .. }))
            .unwrap();
        assert_eq!(concat.ty.dtype, DType::BF16);
        let rounded: Vec<&Node> = low
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Cast { to: DType::BF16 }))
            .collect();
        assert_eq!(rounded.len(), 3, "q, the new keys and v: {low:?}");
        // The same values as the f32 graph on inputs rounded to bf16 (what rounding at use
        // computes), with the cache passed narrow.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut rounded, mut narrow) = (HashMap::new(), HashMap::new());
        for (name, _, t) in g.inputs() {
            let shape: Vec<usize> = t
                .shape
                .iter()
                .map(|d| d.as_fixed().unwrap() as usize)
                .collect();
            let data = (0..shape.iter().product())
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let x = Tensor::from_f32(shape, data).unwrap();
            let x16 = x.cast(DType::BF16);
            rounded.insert(name.to_string(), x16.cast(DType::F32));
            narrow.insert(name.to_string(), if name == "past" { x16 } else { x });
        }
        let before = reference::run(&g, &rounded, &NoParams).unwrap();
        let after = reference::run(&low, &narrow, &NoParams).unwrap();
        assert_eq!(before["a"], after["a"]);
        assert_eq!(before["present"].cast(DType::BF16), after["present"]);
    }
}

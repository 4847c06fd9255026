//! The roofline cost model used by extraction: every op is a kernel costing
//! `max(flops / peak(dtype), bytes / bandwidth) + launch` on a [`Target`]; layout views
//! (reshape, permute, expand, which later fold into their consumers) and sources (inputs,
//! parameters, constants) cost next to nothing. Composite ops (`rmsnorm`, `layernorm`,
//! `linear` with its epilogue, head layout and RoPE, `swiglu`, `attention`,
//! `fused_elementwise`) read their operands and write their result
//! once, so they cost less than their decompositions, which make a round trip through memory
//! per op; `moe` also does the FLOPs of
//! only the `top_k` experts each token is routed to, where its dense form runs every expert.
//!
//! Symbolic sizes are costed at [`NOMINAL_SYMBOL`] (a moderate batch × sequence).

use crate::egraph::{ENode, EG};
use crate::precision::Precision;
use egg::{CostFunction, Id};
use kiln_ir::{DType, Dim, Op, TensorType};

/// The value every size symbol takes when costing.
pub const NOMINAL_SYMBOL: f64 = 64.0;

/// The cost of a node that is only a view or a source: tiny but positive, so that fewer such
/// nodes still win ties.
pub const VIEW_COST: f64 = 1e-12;

/// A machine's roofline numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// The target's name (`cpu`, `cpu-avx512-bf16`, `cuda-sm80`, `cuda-sm90`).
    pub name: &'static str,
    /// Peak FLOP/s for f32 operands.
    pub f32_flops: f64,
    /// Peak FLOP/s for f16/bf16 operands.
    pub half_flops: f64,
    /// Peak FLOP/s for fp8 operands.
    pub fp8_flops: f64,
    /// Peak operations/s for integer and bool operands.
    pub int_ops: f64,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Fixed cost of one kernel launch (or one parallel loop on a CPU), seconds.
    pub launch: f64,
    /// The `--precision` modes the target can run (see [`crate::precision`]). CPUs do f32,
    /// bf16 (bf16 matmul operands, f32 elsewhere) and fp8 as e4m3 weight *storage* with bf16
    /// arithmetic; fp16 is refused there (no fp16 arithmetic worth having on a CPU, and AMP on
    /// CPU uses bf16). GPUs also do fp16.
    pub precisions: &'static [Precision],
    /// fp8 stores an LM head in e4m3 with an e4m3 residual that `refine_logits` reads for the
    /// candidate columns only (see [`crate::precision`]); where false the head stays bf16.
    pub refines_logits: bool,
}

const CPU_PRECISIONS: &[Precision] = &[Precision::F32, Precision::Bf16, Precision::Fp8];
const GPU_PRECISIONS: &[Precision] = &[
    Precision::F32,
    Precision::Bf16,
    Precision::Fp16,
    Precision::Fp8,
];

/// Every target, in one table. CPU figures are for a small multi-core part; GPU figures are
/// dense tensor-core peaks (A100 SXM for sm_80, H100 SXM for sm_90; sm_80 has no fp8, which
/// runs at the bf16 rate there).
pub const TARGETS: [Target; 4] = [
    Target {
        name: "cpu",
        f32_flops: 2e11,
        half_flops: 1e11,
        fp8_flops: 5e10,
        int_ops: 1e11,
        bandwidth: 4e10,
        launch: 2e-6,
        precisions: CPU_PRECISIONS,
        refines_logits: true,
    },
    Target {
        name: "cpu-avx512-bf16",
        f32_flops: 1e12,
        half_flops: 2e12,
        fp8_flops: 1e12,
        int_ops: 5e11,
        bandwidth: 1e11,
        launch: 2e-6,
        precisions: CPU_PRECISIONS,
        refines_logits: true,
    },
    Target {
        name: "cuda-sm80",
        f32_flops: 19.5e12,
        half_flops: 312e12,
        fp8_flops: 312e12,
        int_ops: 19.5e12,
        bandwidth: 2.0e12,
        launch: 5e-6,
        precisions: GPU_PRECISIONS,
        refines_logits: false,
    },
    Target {
        name: "cuda-sm90",
        f32_flops: 67e12,
        half_flops: 989e12,
        fp8_flops: 1979e12,
        int_ops: 33e12,
        bandwidth: 3.35e12,
        launch: 4e-6,
        precisions: GPU_PRECISIONS,
        refines_logits: false,
    },
];

impl Target {
    /// The target called `name` in [`TARGETS`].
    pub fn by_name(name: &str) -> Option<Target> {
        TARGETS.iter().copied().find(|t| t.name == name)
    }

    /// The generic CPU target.
    pub fn cpu() -> Target {
        TARGETS[0]
    }

    /// Whether the target can run `precision`.
    pub fn supports(&self, precision: Precision) -> bool {
        self.precisions.contains(&precision)
    }

    /// Peak rate for arithmetic on `dtype`.
    pub fn peak(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F32 => self.f32_flops,
            DType::F16 | DType::BF16 => self.half_flops,
            DType::F8E4M3 | DType::F8E5M2 => self.fp8_flops,
            DType::I64 | DType::I32 | DType::U8 | DType::Bool => self.int_ops,
        }
    }

    /// Roofline time of a kernel doing `flops` on `dtype` and moving `bytes`.
    pub fn kernel(&self, flops: f64, dtype: DType, bytes: f64) -> f64 {
        (flops / self.peak(dtype)).max(bytes / self.bandwidth) + self.launch
    }
}

/// A dim's size with every symbol at [`NOMINAL_SYMBOL`].
fn size(d: &Dim) -> f64 {
    d.terms()
        .iter()
        .map(|t| t.coeff as f64 * NOMINAL_SYMBOL.powi(t.syms.len() as i32))
        .sum::<f64>()
        .max(1.0)
}

fn numel(ty: &TensorType) -> f64 {
    ty.shape.iter().map(size).product()
}

fn bytes(ty: &TensorType) -> f64 {
    numel(ty) * ty.dtype.size_bytes() as f64
}

/// FLOPs per element of the result for elementwise-like ops (transcendentals count more).
fn flops_per_element(op: &Op) -> f64 {
    use kiln_ir::UnaryOp as U;
    match op {
        Op::Unary(U::Exp | U::Log | U::Tanh | U::Erf | U::Sigmoid | U::Gelu | U::GeluTanh)
        | Op::Unary(U::Silu | U::Sin | U::Cos | U::Rsqrt | U::Sqrt) => 8.0,
        Op::Softmax { .. } | Op::LogSoftmax { .. } => 12.0,
        Op::RmsNorm { .. } => 4.0,
        Op::LayerNorm { .. } => 8.0,
        Op::Rotary => 3.0,
        _ => 1.0,
    }
}

/// The roofline time of `op` with operand types `ins` and result type `out` on `target`.
pub fn op_cost(target: &Target, op: &Op, ins: &[&TensorType], out: &TensorType) -> f64 {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => VIEW_COST,
        Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } => VIEW_COST,
        Op::Moe { top_k } => moe_cost(target, *top_k, ins, out),
        // A pass over the coarse logits, scales and bounds; the residual rows of the few
        // candidates are not counted.
        Op::RefineLogits => {
            let moved = [0, 1, 3, 4]
                .iter()
                .map(|&i| ins.get(i).map_or(0.0, |t| bytes(t)));
            target.kernel(4.0 * numel(out), out.dtype, moved.sum::<f64>() + bytes(out))
        }
        _ => {
            let moved = ins.iter().map(|t| bytes(t)).sum::<f64>() + bytes(out);
            let flops = match op {
                Op::MatMul { transpose_a, .. } => {
                    let a = ins[0];
                    let k = a.shape[a.rank() - if *transpose_a { 2 } else { 1 }].clone();
                    2.0 * numel(out) * size(&k)
                }
                // The product, then one operation per element for each epilogue operand.
                Op::Linear { .. } => {
                    let k = ins[0].shape.last().map_or(1.0, size);
                    (2.0 * k + (ins.len() - 2) as f64) * numel(out)
                }
                // Each group's product and epilogue (x read once), then RoPE's three per
                // element of the rotated groups' heads.
                Op::PackedLinear { heads, rotary, .. } => {
                    let k = ins[0].shape.last().map_or(1.0, size);
                    let groups = heads.len();
                    let tables = 2 * usize::from(*rotary > 0);
                    let epilogue = (ins.len() - 1 - groups - tables) as f64 / groups as f64;
                    let total: usize = heads.iter().sum();
                    let rotated: usize = heads[..*rotary].iter().sum();
                    let share = rotated as f64 / total as f64;
                    (2.0 * k + epilogue + 3.0 * share) * numel(out)
                }
                // Two products sharing x, their scales, then silu and the gate product.
                Op::SwiGlu { .. } => {
                    let k = ins[0].shape.last().map_or(1.0, size);
                    (4.0 * k + (ins.len() - 3) as f64 + 9.0) * numel(out)
                }
                Op::Attention { .. } => {
                    // q·k, softmax over the scores, then p·v.
                    let (q, k) = (ins[0], ins[1]);
                    let sk = size(&k.shape[2]);
                    let scores = numel(q) / size(&q.shape[3]) * sk;
                    2.0 * numel(q) * sk + 8.0 * scores + 2.0 * numel(out) * sk
                }
                Op::Reduce { .. } | Op::ArgMax { .. } | Op::TopK { .. } => numel(ins[0]),
                // One pass: every body node's FLOPs per element, operands read once.
                Op::FusedElementwise { body } => {
                    let mut per = 0.0;
                    body.visit(&mut |e| {
                        if let Some((op, _)) = e.op() {
                            if !matches!(op, Op::Const { .. }) {
                                per += flops_per_element(&op);
                            }
                        }
                    });
                    per * numel(out)
                }
                _ => flops_per_element(op) * numel(out),
            };
            let dtype = ins.first().map_or(out.dtype, |t| t.dtype);
            target.kernel(flops, dtype, moved)
        }
    }
}

/// A `moe` dispatch: the router GEMM and softmax over all experts, then only `top_k` experts'
/// SwiGLU MLPs per token (grouped GEMMs over the routed tokens) and the weighted scatter. Of the
/// expert weights it reads only the experts that can receive a token: all of them once
/// `tokens * top_k >= experts`, that fraction before (decode of one token reads `top_k`).
fn moe_cost(target: &Target, top_k: usize, ins: &[&TensorType], out: &TensorType) -> f64 {
    let (Some(x), Some(gate), Some(w1)) = (ins.first(), ins.get(1), ins.get(2)) else {
        return f64::INFINITY;
    };
    let experts = (ins.len().saturating_sub(2) / 3).max(1) as f64;
    let h = x.shape.last().map_or(1.0, size);
    let inter = w1.shape.first().map_or(1.0, size);
    let tokens = numel(x) / h;
    let k = top_k as f64;
    let router = 2.0 * tokens * experts * h + 12.0 * tokens * experts;
    let mlps = k * tokens * (6.0 * h * inter + 10.0 * inter + 3.0 * h);
    let touched = (tokens * k / experts).min(1.0);
    let weights: f64 = ins[2..].iter().map(|t| bytes(t)).sum();
    let moved = bytes(x) + bytes(gate) + touched * weights + bytes(out);
    target.kernel(router + mlps, x.dtype, moved)
}

/// The roofline [`CostFunction`] over an e-graph: a node's cost is its own kernel time plus its
/// children's costs (egg's tree cost; [`crate::egraph::extract()`] evaluates it with zero-cost
/// children to get local costs and accounts for sharing itself).
pub struct Roofline<'a> {
    /// The e-graph whose class types size the nodes.
    pub egraph: &'a EG,
    /// The machine.
    pub target: Target,
}

impl CostFunction<ENode> for Roofline<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &ENode, mut costs: C) -> f64 {
        let eg = self.egraph;
        let ins: Vec<&TensorType> = enode.children.iter().map(|&c| &eg[c].data.ty).collect();
        let out = match eg.lookup(enode.clone()) {
            Some(id) => eg[id].data.ty.clone(),
            None => match kiln_ir::infer(&enode.op, &ins) {
                Ok(ty) => ty,
                Err(_) => return f64::INFINITY,
            },
        };
        let own = op_cost(&self.target, &enode.op, &ins, &out);
        own + enode.children.iter().map(|&c| costs(c)).sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{BinaryOp, ReduceOp, UnaryOp, F64};

    #[test]
    fn targets_by_name() {
        for t in TARGETS {
            assert_eq!(Target::by_name(t.name), Some(t));
            assert!(t.peak(DType::BF16) >= t.peak(DType::F32) || t.name == "cpu");
        }
        assert_eq!(Target::by_name("tpu"), None);
    }

    #[test]
    fn views_are_free_and_matmuls_are_compute_bound_on_gpus() {
        let x = TensorType::new(DType::F32, [4096, 4096]);
        let t = Target::by_name("cuda-sm90").unwrap();
        let p = Op::Permute { perm: vec![1, 0] };
        assert_eq!(op_cost(&t, &p, &[&x], &x), VIEW_COST);
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        };
        let time = op_cost(&t, &mm, &[&x, &x], &x);
        assert!((time - (2.0 * 4096f64.powi(3) / t.f32_flops + t.launch)).abs() < 1e-9);
    }

    #[test]
    fn composite_norms_cost_less_than_their_decompositions() {
        let x = TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(4096)]);
        let w = TensorType::new(DType::F32, [4096]);
        let s = TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(1)]);
        let one = TensorType::new(DType::F32, Vec::<usize>::new());
        for t in TARGETS {
            let fused = op_cost(&t, &Op::RmsNorm { eps: F64(1e-6) }, &[&x, &w], &x);
            let mul = Op::Binary(BinaryOp::Mul);
            let mean = Op::Reduce {
                op: ReduceOp::Mean,
                axes: vec![1],
                keepdim: true,
            };
            let parts = [
                op_cost(&t, &mul, &[&x, &x], &x),
                op_cost(&t, &mean, &[&x], &s),
                op_cost(&t, &Op::Binary(BinaryOp::Add), &[&s, &one], &s),
                op_cost(&t, &Op::Unary(UnaryOp::Rsqrt), &[&s], &s),
                op_cost(&t, &mul, &[&x, &s], &x),
                op_cost(&t, &mul, &[&w, &x], &x),
            ];
            assert!(fused < parts.iter().sum::<f64>(), "{}", t.name);
        }
    }

    #[test]
    fn linear_costs_less_than_its_decomposition() {
        for seq in [Dim::sym("seq"), Dim::fixed(1)] {
            let x = TensorType::new(DType::F32, [seq.clone(), Dim::fixed(4096)]);
            let y = TensorType::new(DType::F32, [seq, Dim::fixed(11008)]);
            let w = TensorType::new(DType::F32, [11008, 4096]);
            let n = TensorType::new(DType::F32, [11008]);
            let mm = Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            };
            let linear = Op::Linear {
                transpose_b: true,
                scaled: true,
                added: true,
                heads: 0,
                rotary: false,
            };
            for t in TARGETS {
                let fused = op_cost(&t, &linear, &[&x, &w, &n, &y], &y);
                let parts = op_cost(&t, &mm, &[&x, &w], &y)
                    + op_cost(&t, &Op::Binary(BinaryOp::Mul), &[&y, &n], &y)
                    + op_cost(&t, &Op::Binary(BinaryOp::Add), &[&y, &y], &y);
                assert!(fused < parts, "{}: {fused} vs {parts}", t.name);
            }
        }
    }

    #[test]
    fn moe_costs_less_than_its_dense_form() {
        // Mixtral-like: 8 experts, top-2; prefill (seq tokens) and decode (one token).
        for tokens in [Dim::sym("seq"), Dim::fixed(1)] {
            let (h, i) = (4096usize, 14336usize);
            let x = TensorType::new(DType::BF16, [tokens.clone(), Dim::fixed(h as i64)]);
            let gate = TensorType::new(DType::BF16, [8, h]);
            let (up, down) = (
                TensorType::new(DType::BF16, [i, h]),
                TensorType::new(DType::BF16, [h, i]),
            );
            let mid = TensorType::new(DType::BF16, [tokens.clone(), Dim::fixed(i as i64)]);
            let mut ins = vec![&x, &gate];
            for _ in 0..8 {
                ins.extend([&up, &up, &down]);
            }
            let mm = Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            };
            for t in TARGETS {
                let fused = op_cost(&t, &Op::Moe { top_k: 2 }, &ins, &x);
                // Only the experts' matmuls of the dense form, already dearer.
                let expert =
                    2.0 * op_cost(&t, &mm, &[&x, &up], &mid) + op_cost(&t, &mm, &[&mid, &down], &x);
                assert!(
                    fused < 8.0 * expert,
                    "{}: {fused} vs {}",
                    t.name,
                    8.0 * expert
                );
                assert!(fused > 2.0 * expert * 0.5, "{}", t.name);
            }
        }
    }

    #[test]
    fn attention_costs_less_than_its_decomposition() {
        let (seq, d) = (Dim::sym("seq"), Dim::fixed(128));
        let q = TensorType::new(DType::BF16, [1.into(), 32.into(), seq.clone(), d.clone()]);
        let kt = TensorType::new(DType::BF16, [1.into(), 32.into(), d, seq.clone()]);
        let s = TensorType::new(DType::BF16, [1.into(), 32.into(), seq.clone(), seq]);
        let attn = Op::Attention {
            scale: F64(0.1),
            causal: true,
            window: 0,
            merge_heads: false,
        };
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        };
        for t in TARGETS {
            let fused = op_cost(&t, &attn, &[&q, &q, &q], &q);
            let parts = op_cost(&t, &mm, &[&q, &kt], &s)
                + op_cost(&t, &Op::Binary(BinaryOp::Mul), &[&s, &s], &s)
                + op_cost(&t, &Op::Softmax { axis: 3 }, &[&s], &s)
                + op_cost(&t, &mm, &[&s, &q], &q);
            assert!(fused < parts, "{}: {fused} vs {parts}", t.name);
        }
    }
}

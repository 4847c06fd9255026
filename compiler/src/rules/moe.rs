//! Mixture-of-experts dispatch: the dense traced form of a sparse MoE block (as
//! `kiln_models::moe::sparse_moe` writes it, for any number of experts and of experts per
//! token) becomes one composite `moe` op, which computes each expert only on the tokens routed
//! to it.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `moe` | `Σ_{e<E} y_e * slice(route, -1, e, e+1)` summed left to right, with `y_e = (silu(x·w1_eᵀ) * (x·w3_eᵀ))·w2_eᵀ` and `route = Σ_{k<K} where(iota(-1) == slice(chosen, -1, k, k+1), slice(w, -1, k, k+1), 0)`, `w = cast(p / sum(p, -1, keepdim), d)`, `p = gather_along(probs, chosen, -1)`, `chosen = topk(probs, K, -1)`, `probs = softmax(cast(x·gateᵀ, f32), -1)` (casts absent when `x` is f32) | `moe(x, gate, w1_0, w3_0, w2_0, ..) top_k=K` |
//!
//! Multiplications and the comparison match in either operand order; the silu may sit on either
//! factor's side of the product (the silu'd projection is `w1`). `E` is the routing tensor's
//! last size and `K` the top-k's. Every expert must read the same `x` as the router, and the
//! weights stay the graph's own values (no stacked copies). The rewrite drops the unchosen
//! experts' `0 * y_e` terms, which [`kiln_ir::Op::Moe`] documents.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{infer, BinaryOp, CmpOp, DType, Dim, Op, ReduceOp, TensorType, UnaryOp};

/// The MoE rule.
pub fn rules() -> Vec<Rewrite> {
    vec![FnRule::rewrite("moe", moe)]
}

fn ty(eg: &EG, id: Id) -> &TensorType {
    &eg[id].data.ty
}

fn last_axis(eg: &EG, id: Id) -> Option<usize> {
    ty(eg, id).rank().checked_sub(1)
}

/// The operands of `slice(x, last axis, k, k+1)` nodes in `id`'s class, with `k`.
fn last_slices(eg: &EG, id: Id) -> Vec<(Id, usize)> {
    find::unary(eg, id, |o| matches!(o, Op::Slice { .. }))
        .filter_map(|(op, x)| {
            let Op::Slice { axis, start, end } = op else {
                return None;
            };
            let k = usize::try_from(start.as_fixed()?).ok()?;
            let last = Some(*axis) == last_axis(eg, x);
            (last && end.as_fixed() == Some(k as i64 + 1)).then_some((x, k))
        })
        .collect()
}

/// The operands `(a, b)` of `matmul(a, b) transpose_b` nodes in `id`'s class.
fn linear(eg: &EG, id: Id) -> Vec<(Id, Id)> {
    let op = Op::MatMul {
        transpose_a: false,
        transpose_b: true,
    };
    find::nodes(eg, id, |o| *o == op)
        .map(|n| (eg.find(n.children[0]), eg.find(n.children[1])))
        .collect()
}

/// The operands `x` of `cast(x, to)` nodes in `id`'s class with `x` of dtype `from`; `id`
/// itself when `from == to` (the tracer emits no cast then).
fn cast_from(eg: &EG, id: Id, from: DType, to: DType) -> Vec<Id> {
    if from == to {
        return vec![id];
    }
    find::unary(eg, id, |o| *o == Op::Cast { to })
        .filter(|(_, x)| ty(eg, *x).dtype == from)
        .map(|(_, x)| x)
        .collect()
}

/// `(x, w1, w3, w2)` where `id`'s class is `(silu(x·w1ᵀ) * (x·w3ᵀ))·w2ᵀ`.
fn expert(eg: &EG, id: Id) -> Vec<(Id, Id, Id, Id)> {
    let mut out = vec![];
    for (hid, w2) in linear(eg, id) {
        for (act, up) in find::binary(eg, hid, BinaryOp::Mul) {
            for (_, g) in find::unary(eg, act, |o| *o == Op::Unary(UnaryOp::Silu)) {
                for (x, w1) in linear(eg, g) {
                    for (x3, w3) in linear(eg, up) {
                        if x3 == x {
                            out.push((x, w1, w3, w2));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `(y, route)` where `id`'s class is `y * slice(route, -1, e, e+1)` (either order).
fn weighted(eg: &EG, id: Id, e: usize) -> Vec<(Id, Id)> {
    let mut out = vec![];
    for (y, s) in find::binary(eg, id, BinaryOp::Mul) {
        for (route, k) in last_slices(eg, s) {
            if k == e {
                out.push((y, route));
            }
        }
    }
    out
}

/// The expert outputs `y_0..=y_e` of `id`'s class written `((y_0 r_0 + y_1 r_1) + ..) + y_e r_e`
/// over one `route`.
fn expert_sum(eg: &EG, id: Id, e: usize, route: Id) -> Option<Vec<Id>> {
    if e == 0 {
        return weighted(eg, id, 0)
            .into_iter()
            .find(|&(_, r)| r == route)
            .map(|(y, _)| vec![y]);
    }
    for (rest, last) in find::binary(eg, id, BinaryOp::Add) {
        for (y, r) in weighted(eg, last, e) {
            if r != route {
                continue;
            }
            if let Some(mut ys) = expert_sum(eg, rest, e - 1, route) {
                ys.push(y);
                return Some(ys);
            }
        }
    }
    None
}

/// `(chosen, w)` where `id`'s class is
/// `where(iota(-1) == slice(chosen, -1, k, k+1), slice(w, -1, k, k+1), 0)`.
fn route_part(eg: &EG, id: Id, k: usize) -> Vec<(Id, Id)> {
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| *o == Op::Where) {
        let [c, a, z] = [0, 1, 2].map(|i| eg.find(n.children[i]));
        if !find::is_splat(eg, z, 0.0) {
            continue;
        }
        let Some(ws) = last_slices(eg, a).into_iter().find(|s| s.1 == k) else {
            continue;
        };
        for cmp in find::nodes(eg, c, |o| *o == Op::Compare(CmpOp::Eq)) {
            let [p, q] = [0, 1].map(|i| eg.find(cmp.children[i]));
            for (iota, idx) in [(p, q), (q, p)] {
                let counts = find::nodes(eg, iota, |o| {
                    matches!(o, Op::Iota { dtype, axis, shape } if dtype.is_int() && *axis + 1 == shape.len())
                })
                .next()
                .is_some();
                if !counts {
                    continue;
                }
                for (chosen, j) in last_slices(eg, idx) {
                    if j == k {
                        out.push((chosen, ws.0));
                    }
                }
            }
        }
    }
    out
}

/// The `(chosen, w)` of `id`'s class written `((part_0 + part_1) + ..) + part_k`.
fn route_sum(eg: &EG, id: Id, k: usize) -> Vec<(Id, Id)> {
    if k == 0 {
        return route_part(eg, id, 0);
    }
    let mut out = vec![];
    for (rest, last) in find::binary(eg, id, BinaryOp::Add) {
        for cw in route_part(eg, last, k) {
            if route_sum(eg, rest, k - 1).contains(&cw) {
                out.push(cw);
            }
        }
    }
    out
}

/// `(x, gate, top_k)` where `chosen` is `topk(probs, top_k, -1)` and `w` is the renormalized
/// routing weight of dtype `d`, both from `probs = softmax(cast(x·gateᵀ, f32), -1)`.
fn router(eg: &EG, chosen: Id, w: Id, d: DType) -> Vec<(Id, Id, usize)> {
    let mut out = vec![];
    let Some(last) = last_axis(eg, chosen) else {
        return out;
    };
    for (op, probs) in find::unary(eg, chosen, |o| matches!(o, Op::TopK { .. })) {
        let Op::TopK { k, axis } = *op else { continue };
        if axis != last {
            continue;
        }
        // w = cast(p / sum(p, -1, keepdim), d) with p = gather_along(probs, chosen, -1).
        let mut renormalized = false;
        for q in cast_from(eg, w, DType::F32, d) {
            for div in find::nodes(eg, q, |o| *o == Op::Binary(BinaryOp::Div)) {
                let [p, s] = [0, 1].map(|i| eg.find(div.children[i]));
                let sums = find::unary(eg, s, |o| {
                    matches!(o, Op::Reduce { op: ReduceOp::Sum, axes, keepdim: true } if *axes == [last])
                })
                .any(|(_, a)| a == p);
                let gathered = find::nodes(eg, p, |o| *o == Op::GatherAlong { axis: last })
                    .any(|n| eg.find(n.children[0]) == probs && eg.find(n.children[1]) == chosen);
                renormalized |= sums && gathered;
            }
        }
        if !renormalized {
            continue;
        }
        for (_, l32) in find::unary(eg, probs, |o| *o == Op::Softmax { axis: last }) {
            for logits in cast_from(eg, l32, d, DType::F32) {
                for (x, gate) in linear(eg, logits) {
                    out.push((x, gate, k));
                }
            }
        }
    }
    out
}

fn moe(eg: &EG, id: Id) -> Vec<Term> {
    let want = ty(eg, id);
    // Cheap first test: the top is a sum or (one expert) a product.
    if !eg[id]
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::Binary(BinaryOp::Add) | Op::Binary(BinaryOp::Mul)))
        || !want.dtype.is_float()
    {
        return vec![];
    }
    let mut candidates: Vec<(Id, usize)> = vec![];
    let mut tops: Vec<Id> = vec![id];
    tops.extend(
        find::binary(eg, id, BinaryOp::Add)
            .into_iter()
            .map(|(_, b)| b),
    );
    for t in tops {
        for (_, s) in find::binary(eg, t, BinaryOp::Mul) {
            for (route, e) in last_slices(eg, s) {
                let experts = ty(eg, route).shape.last().and_then(Dim::as_fixed);
                if experts == Some(e as i64 + 1) && !candidates.contains(&(route, e + 1)) {
                    candidates.push((route, e + 1));
                }
            }
        }
    }
    let mut out = vec![];
    for (route, experts) in candidates {
        let Some(ys) = expert_sum(eg, id, experts - 1, route) else {
            continue;
        };
        // One expert MLP per output, all on one x.
        let mut weights = vec![];
        let mut xs = vec![];
        for &y in &ys {
            let Some((x, w1, w3, w2)) = expert(eg, y).into_iter().next() else {
                break;
            };
            xs.push(x);
            weights.extend([w1, w3, w2]);
        }
        if xs.len() != experts || xs.iter().any(|&x| x != xs[0]) {
            continue;
        }
        let x = xs[0];
        for k in 0..experts {
            for (chosen, w) in route_sum(eg, route, k) {
                if ty(eg, chosen).shape.last().and_then(Dim::as_fixed) != Some(k as i64 + 1) {
                    continue;
                }
                for (rx, gate, top_k) in router(eg, chosen, w, want.dtype) {
                    if rx != x || top_k != k + 1 {
                        continue;
                    }
                    let mut operands = vec![x, gate];
                    operands.extend(&weights);
                    let op = Op::Moe { top_k };
                    let tys: Vec<&TensorType> = operands.iter().map(|&o| ty(eg, o)).collect();
                    if infer(&op, &tys).as_ref() == Ok(want) {
                        out.push(Term::node(op, &operands));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rules;
    use crate::rules::check::{ops, rewrite, rewrite_same};
    use kiln_ir::trace::Tracer;
    use kiln_ir::{DType, Dim, Op};
    use kiln_models::llama::LayerConfig;
    use kiln_models::moe::{sparse_moe, MoeConfig};

    fn layer(hidden: usize, inter: usize) -> LayerConfig {
        LayerConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: hidden,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            moe: None,
        }
    }

    fn traced(dtype: DType, shape: Vec<Dim>, experts: usize, top_k: usize) -> kiln_ir::Graph {
        let t = Tracer::new();
        let x = t.input("x", dtype, shape);
        let m = MoeConfig {
            num_local_experts: experts,
            num_experts_per_tok: top_k,
        };
        let y = sparse_moe(&t, &x, "moe", &layer(8, 6), &m).unwrap();
        t.output("y", &y);
        t.finish().unwrap()
    }

    #[test]
    fn mixtral_block_becomes_one_moe() {
        for (experts, top_k) in [(4, 2), (8, 2), (1, 1), (3, 3), (5, 1)] {
            let g = traced(
                DType::F32,
                vec![2.into(), 3.into(), 8.into()],
                experts,
                top_k,
            );
            let h = rewrite_same(&g, rules);
            assert_eq!(ops(&h), ["moe"], "{experts}/{top_k}");
            let moe = h.nodes().iter().find(|n| n.op.name() == "moe").unwrap();
            assert_eq!(moe.op, Op::Moe { top_k });
            assert_eq!(moe.inputs.len(), 2 + 3 * experts);
        }
    }

    #[test]
    fn bf16_and_symbolic_shapes() {
        let seq = vec![Dim::sym("batch"), Dim::sym("seq"), 8.into()];
        let g = traced(DType::BF16, seq, 4, 2);
        assert_eq!(ops(&rewrite(&g, rules)), ["moe"]);
        let g = traced(DType::F32, vec![5.into(), 8.into()], 3, 2);
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["moe"]);
        let g = traced(DType::F32, vec![Dim::sym("tokens"), 8.into()], 2, 1);
        assert_eq!(ops(&rewrite(&g, rules)), ["moe"]);
    }

    /// Router, routing weights and two experts written out, with knobs that break the pattern.
    fn variant(other_x: bool, no_renorm: bool, gelu: bool) -> kiln_ir::Graph {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [3, 4]);
        let x2 = t.input("x2", DType::F32, [3, 4]);
        let p = |n: &str, s: [usize; 2]| t.param(n, DType::F32, s);
        let probs = x.matmul_t(&p("gate", [2, 4]), false, true).unwrap();
        let probs = probs.softmax(-1).unwrap();
        let chosen = probs.topk(1, -1).unwrap();
        let w = probs.gather_along(-1, &chosen).unwrap();
        let w = if no_renorm {
            w
        } else {
            w.div(&w.sum(&[-1], true).unwrap()).unwrap()
        };
        let ids = t.iota(DType::I64, [3, 2], 1).unwrap();
        let zero = t.scalar(DType::F32, 0.0);
        let idx = chosen.slice(-1, 0, 1).unwrap();
        let route = ids
            .eq(&idx)
            .unwrap()
            .where_(&w.slice(-1, 0, 1).unwrap(), &zero)
            .unwrap();
        let mut out: Option<kiln_ir::trace::Tensor> = None;
        for e in 0..2 {
            let xe = if other_x && e == 1 { &x2 } else { &x };
            let g = xe
                .matmul_t(&p(&format!("w1.{e}"), [6, 4]), false, true)
                .unwrap();
            let u = xe
                .matmul_t(&p(&format!("w3.{e}"), [6, 4]), false, true)
                .unwrap();
            let a = if gelu {
                g.gelu().unwrap()
            } else {
                g.silu().unwrap()
            };
            let y = u.mul(&a).unwrap();
            let y = y
                .matmul_t(&p(&format!("w2.{e}"), [4, 6]), false, true)
                .unwrap();
            let y = route.slice(-1, e, e + 1).unwrap().mul(&y).unwrap();
            out = Some(match out {
                Some(acc) => acc.add(&y).unwrap(),
                None => y,
            });
        }
        t.output("y", &out.unwrap());
        t.finish().unwrap()
    }

    #[test]
    fn operand_order_does_not_matter_but_the_pattern_does() {
        // Products written the other way round still match.
        let h = rewrite_same(&variant(false, false, false), rules);
        assert_eq!(ops(&h), ["moe"]);
        for g in [
            variant(true, false, false),
            variant(false, true, false),
            variant(false, false, true),
        ] {
            let h = rewrite_same(&g, rules);
            assert!(!ops(&h).contains(&"moe"), "{:?}", ops(&h));
        }
    }
}

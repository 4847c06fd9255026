//! Attention fusion: the traced form of scaled-dot-product attention (as `kiln_models` writes
//! it for llama/mistral/qwen2/mixtral, gpt2, bert and distilbert) becomes the IR's composite
//! `attention` op, which then takes the key/value heads before their grouped-query repetition
//! and turns the causal and sliding-window parts of a traced mask into its flags.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `attention` | `matmul(softmax(s · c + m, -1), v)` with `s = matmul(q, k, transpose_b)`; the scale as `s * c`, `c * s`, `s / c` or absent (`c = 1`); the mask `m` as `+ m`, `m +` or absent | `attention(q, k, v[, m]) scale=c causal=false window=0` |
//! | `attention-gqa` | `attention(q, repeat(k, n), repeat(v, n)[, m])` with `repeat(x, n) = reshape(expand(reshape(x) to [b, hkv, 1, s, d]) to [b, hkv, n, s, d]) to [b, hkv·n, s, d]` (transformers' `repeat_kv`) | `attention(q, k, v[, m])` |
//! | `attention-causal` | `attention(q, k, v, where(vis, 0, h)) causal=false window=0` with `h <= -1e30` and `vis = [pad &] (kp <= qp) [& (kp > qp - w)]`, `kp = iota(sk)`, `qp = kp[sk - sq ..]` as a column (`nn::attention_mask`) | `attention(q, k, v[, where(pad, 0, h)]) causal=true window=w` (`w = 0` without the window part) |
//!
//! Conditions: `q`, `k`, `v` are rank 4 with equal batch and head axes (`q[b, h, sq, d]`,
//! `k[b, h, sk, d]`, `v[b, h, sk, dv]`: no batch broadcasting in the matmuls), the softmax is
//! over the last axis, `c` is a one-element float constant (read from the analysis), and the
//! mask has the scores' dtype, rank at most 4 and broadcasts to the scores without enlarging
//! them (the addition's result is the scores' type). Every fused term is checked with the IR's
//! shape inference before it is offered. `repeat` heads `x[:, g]` become heads `g·n .. g·n+n`,
//! which is exactly the op's grouping (query head `h` uses key/value head `h / n`). For
//! `attention-causal` the key positions count the op's keys (`sk`) and the query positions
//! start at `sk - sq`, the op's position of query 0; the `and`s match in either operand order.
//!
//! Semantics: the fused op computes `softmax(scale · q·k + m)·v` as the traced form does, in
//! whatever precision its kernel accumulates (the traced form rounds the scores to the element
//! type after each step; the reference executor's fused op works in f64). A key the traced mask
//! hides gets `h <= -1e30` added, so its weight is exactly 0 whenever the query has a visible
//! key; `attention-causal` leaves such keys out instead, which is the same. Every query keeps a
//! key under `causal`/`window` (its own position), so the op never yields its all-hidden zeros
//! here, and the families' masks use the f32 minimum, never `-inf`, so no row is all `-inf` and
//! no NaN appears that the unfused form would not also produce. One difference remains, for a
//! query whose every key is hidden (a padding query under left padding): the f32 traced form
//! rounds every score to the mask's minimum and averages `v` over all keys, while the fused op
//! averages over the causally visible keys only, or, computing the scores wider, keeps the dot
//! products' differences. Such rows are padding queries: their keys are hidden from every other
//! query, so no output at a real position reads them.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{infer, BinaryOp, CmpOp, Dim, Op, TensorType, F64};

/// The three attention rules.
pub fn rules() -> Vec<Rewrite> {
    vec![
        FnRule::rewrite("attention", attention),
        FnRule::rewrite("attention-gqa", attention_gqa),
        FnRule::rewrite("attention-causal", attention_causal),
    ]
}

/// True for a rank-4 float class.
fn rank4(eg: &EG, id: Id) -> bool {
    let ty = &eg[id].data.ty;
    ty.rank() == 4 && ty.dtype.is_float()
}

/// True when the rank-4 classes `a` and `b` agree on the batch and head axes.
fn same_batch_heads(eg: &EG, a: Id, b: Id) -> bool {
    eg[a].data.ty.shape[..2] == eg[b].data.ty.shape[..2]
}

/// `(q, k)` for `matmul(q, k, transpose_b)` nodes of `id`'s class, rank 4, no batch broadcast.
fn qk(eg: &EG, id: Id) -> Vec<(Id, Id)> {
    let qkt = Op::MatMul {
        transpose_a: false,
        transpose_b: true,
    };
    find::nodes(eg, id, |o| *o == qkt)
        .map(|n| (eg.find(n.children[0]), eg.find(n.children[1])))
        .filter(|&(q, k)| rank4(eg, q) && rank4(eg, k) && same_batch_heads(eg, q, k))
        .collect()
}

/// `(q, k, scale)` for `id`'s class as `q·kᵀ * c`, `c * q·kᵀ`, `q·kᵀ / c` (`c` a one-element
/// float constant that does not enlarge the scores) or `q·kᵀ` itself (scale 1).
fn scaled_scores(eg: &EG, id: Id) -> Vec<(Id, Id, f64)> {
    let ty = &eg[id].data.ty;
    let mut out: Vec<(Id, Id, f64)> = qk(eg, id).into_iter().map(|(q, k)| (q, k, 1.0)).collect();
    for (s, c) in find::binary(eg, id, BinaryOp::Mul) {
        if let Some(c) = find::scalar(eg, c) {
            if eg[s].data.ty == *ty {
                out.extend(qk(eg, s).into_iter().map(|(q, k)| (q, k, c)));
            }
        }
    }
    for n in find::nodes(eg, id, |o| *o == Op::Binary(BinaryOp::Div)) {
        let (s, c) = (eg.find(n.children[0]), eg.find(n.children[1]));
        if let Some(c) = find::scalar(eg, c) {
            if eg[s].data.ty == *ty && c != 0.0 {
                out.extend(qk(eg, s).into_iter().map(|(q, k)| (q, k, 1.0 / c)));
            }
        }
    }
    out
}

/// `(q, k, scale, mask)` for `id`'s class as scaled scores plus an additive mask (either
/// order, the sum of the scores' type) or the scaled scores alone.
fn masked_scores(eg: &EG, id: Id) -> Vec<(Id, Id, f64, Option<Id>)> {
    let ty = &eg[id].data.ty;
    let mut out: Vec<_> = scaled_scores(eg, id)
        .into_iter()
        .map(|(q, k, c)| (q, k, c, None))
        .collect();
    for (s, m) in find::binary(eg, id, BinaryOp::Add) {
        if eg[s].data.ty == *ty && eg[m].data.ty.dtype == ty.dtype {
            out.extend(
                scaled_scores(eg, s)
                    .into_iter()
                    .map(|(q, k, c)| (q, k, c, Some(m))),
            );
        }
    }
    out
}

/// `attention(q, k, v[, mask])` if the IR's inference gives it `id`'s type.
fn fused(eg: &EG, id: Id, op: Op, q: Id, k: Id, v: Id, mask: Option<Id>) -> Option<Term> {
    let mut children = vec![q, k, v];
    children.extend(mask);
    let tys: Vec<_> = children.iter().map(|&c| &eg[c].data.ty).collect();
    (infer(&op, &tys).ok()? == eg[id].data.ty).then(|| Term::node(op, &children))
}

fn attention(eg: &EG, id: Id) -> Vec<Term> {
    let pv = Op::MatMul {
        transpose_a: false,
        transpose_b: false,
    };
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| *o == pv) {
        let (p, v) = (eg.find(n.children[0]), eg.find(n.children[1]));
        if !rank4(eg, p) || !rank4(eg, v) || !same_batch_heads(eg, p, v) {
            continue;
        }
        for (_, logits) in find::unary(eg, p, |o| matches!(o, Op::Softmax { axis: 3 })) {
            for (q, k, scale, mask) in masked_scores(eg, logits) {
                let op = Op::Attention {
                    scale: F64(scale),
                    causal: false,
                    window: 0,
                    merge_heads: false,
                };
                out.extend(fused(eg, id, op, q, k, v, mask));
            }
        }
    }
    out
}

/// `(x, n)` for `id`'s class as `repeat_kv(x, n)`: `x[b, hkv, s, d]` unsqueezed at axis 2,
/// expanded to `n` there and merged into `hkv·n` heads.
fn unrepeat(eg: &EG, id: Id) -> Vec<(Id, Dim)> {
    let is_reshape = |o: &Op| matches!(o, Op::Reshape { .. });
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    if ty.rank() != 4 {
        return out;
    }
    for (_, e) in find::unary(eg, id, is_reshape) {
        for (_, u) in find::unary(eg, e, |o| matches!(o, Op::Expand { .. })) {
            for (_, x) in find::unary(eg, u, is_reshape) {
                let (xt, ut, et) = (&eg[x].data.ty, &eg[u].data.ty, &eg[e].data.ty);
                if xt.rank() != 4 || xt.dtype != ty.dtype {
                    continue;
                }
                let [b, h, s, d] = [0, 1, 2, 3].map(|i| xt.shape[i].clone());
                let n = et.shape.get(2).cloned().unwrap_or(Dim::fixed(1));
                let unsqueezed = [&b, &h, &Dim::fixed(1), &s, &d];
                let expanded = [&b, &h, &n, &s, &d];
                let merged = [&b, &(&h * &n), &s, &d];
                if ut.shape.iter().eq(unsqueezed)
                    && et.shape.iter().eq(expanded)
                    && ty.shape.iter().eq(merged)
                {
                    out.push((x, n));
                }
            }
        }
    }
    out
}

fn attention_gqa(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| matches!(o, Op::Attention { .. })) {
        let c: Vec<Id> = n.children.iter().map(|&c| eg.find(c)).collect();
        if !(3..=4).contains(&c.len()) {
            continue;
        }
        for (k, nk) in unrepeat(eg, c[1]) {
            for (v, nv) in unrepeat(eg, c[2]) {
                if nk == nv {
                    out.extend(fused(eg, id, n.op.clone(), c[0], k, v, c.get(3).copied()));
                }
            }
        }
    }
    out
}

/// A mask value at or below this hides a key as surely as leaving it out: `exp` of it
/// relative to any visible score is 0 in every float type.
const HIDDEN: f64 = -1e30;

/// True when `id`'s class holds `iota` counting `0 .. sk` (an integer vector).
fn is_key_pos(eg: &EG, id: Id, sk: &Dim) -> bool {
    find::nodes(eg, id, |o| {
        matches!(o, Op::Iota { dtype, shape, axis: 0 } if dtype.is_int() && shape.len() == 1 && shape[0] == *sk)
    })
    .next()
    .is_some()
}

/// True when `id`'s class is the query positions `key_pos[sk - sq ..]` as a column `[sq, 1]`.
fn is_query_pos(eg: &EG, id: Id, kp: Id, sq: &Dim, sk: &Dim) -> bool {
    if eg[id].data.ty.shape != [sq.clone(), Dim::fixed(1)] {
        return false;
    }
    let past = sk - sq;
    find::unary(eg, id, |o| matches!(o, Op::Reshape { .. })).any(|(_, x)| {
        (x == kp && past == Dim::fixed(0))
            || find::unary(eg, x, |o| matches!(o, Op::Slice { axis: 0, .. })).any(|(op, y)| {
                y == kp && matches!(op, Op::Slice { start, end, .. } if *start == past && end == sk)
            })
    })
}

/// `(key_pos, query_pos)` for `id`'s class as `key_pos <= query_pos` (the causal part).
fn causal_le(eg: &EG, id: Id, sq: &Dim, sk: &Dim) -> Vec<(Id, Id)> {
    find::nodes(eg, id, |o| *o == Op::Compare(CmpOp::Le))
        .map(|n| (eg.find(n.children[0]), eg.find(n.children[1])))
        .filter(|&(kp, qp)| is_key_pos(eg, kp, sk) && is_query_pos(eg, qp, kp, sq, sk))
        .collect()
}

/// The value of a one-element integer constant class (integer constants are not folded into
/// the analysis; the `const` node is read).
fn int_scalar(eg: &EG, id: Id) -> Option<i64> {
    find::nodes(eg, id, |o| matches!(o, Op::Const { .. })).find_map(|n| match &n.op {
        Op::Const { value } if value.dtype().is_int() && value.len() == 1 => {
            Some(value.values()[0].as_i64())
        }
        _ => None,
    })
}

/// `w` for `id`'s class as `key_pos > query_pos - w` with `w >= 1` (the sliding window).
fn window_gt(eg: &EG, id: Id, kp: Id, qp: Id) -> Option<usize> {
    find::nodes(eg, id, |o| *o == Op::Compare(CmpOp::Gt))
        .filter(|n| eg.find(n.children[0]) == kp)
        .flat_map(|n| {
            find::nodes(eg, eg.find(n.children[1]), |o| {
                *o == Op::Binary(BinaryOp::Sub)
            })
        })
        .filter(|s| eg.find(s.children[0]) == qp)
        .find_map(|s| int_scalar(eg, eg.find(s.children[1])))
        .and_then(|w| usize::try_from(w).ok())
        .filter(|&w| w >= 1)
}

/// `(pad, window)` for `id`'s class as the visibility `nn::attention_mask` builds: the causal
/// part, and-ed with a padding part `pad` (either order; absent allowed), then optionally with
/// the sliding window (`window` 0 when absent).
fn visibility(eg: &EG, id: Id, sq: &Dim, sk: &Dim) -> Vec<(Option<Id>, usize)> {
    // `(pad, key_pos, query_pos)` for the causal part with an optional padding part.
    let causal = |id: Id| -> Vec<(Option<Id>, Id, Id)> {
        let mut out: Vec<_> = causal_le(eg, id, sq, sk)
            .into_iter()
            .map(|(kp, qp)| (None, kp, qp))
            .collect();
        for (pad, c) in find::binary(eg, id, BinaryOp::And) {
            out.extend(
                causal_le(eg, c, sq, sk)
                    .into_iter()
                    .map(|(kp, qp)| (Some(pad), kp, qp)),
            );
        }
        out
    };
    let mut out: Vec<_> = causal(id).into_iter().map(|(pad, ..)| (pad, 0)).collect();
    for (c, win) in find::binary(eg, id, BinaryOp::And) {
        for (pad, kp, qp) in causal(c) {
            out.extend(window_gt(eg, win, kp, qp).map(|w| (pad, w)));
        }
    }
    out
}

fn attention_causal(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| {
        matches!(
            o,
            Op::Attention {
                causal: false,
                window: 0,
                ..
            }
        )
    }) {
        let Op::Attention { scale, .. } = n.op else {
            continue;
        };
        let c: Vec<Id> = n.children.iter().map(|&c| eg.find(c)).collect();
        let [q, k, v, mask] = c[..] else {
            continue;
        };
        let (sq, sk) = (&eg[q].data.ty.shape[2], &eg[k].data.ty.shape[2]);
        for w in find::nodes(eg, mask, |o| *o == Op::Where) {
            let [cond, zero, hidden] = [0, 1, 2].map(|i| eg.find(w.children[i]));
            let hides = find::scalar(eg, hidden).is_some_and(|m| m <= HIDDEN);
            if !find::is_splat(eg, zero, 0.0) || !hides {
                continue;
            }
            for (pad, window) in visibility(eg, cond, sq, sk) {
                let op = Op::Attention {
                    scale,
                    causal: true,
                    window,
                    merge_heads: false,
                };
                let qkv = [q, k, v].map(Term::Class);
                let mut children = qkv.to_vec();
                let mut tys: Vec<TensorType> = [q, k, v].map(|c| eg[c].data.ty.clone()).to_vec();
                if let Some(pad) = pad {
                    let parts = [pad, zero, hidden];
                    let part_tys = parts.map(|c| &eg[c].data.ty);
                    let Ok(mty) = infer(&Op::Where, &part_tys) else {
                        continue;
                    };
                    tys.push(mty);
                    children.push(Term::node(Op::Where, &parts));
                }
                let refs: Vec<&TensorType> = tys.iter().collect();
                if infer(&op, &refs).is_ok_and(|t| t == *ty) {
                    out.push(Term::Node(op, children));
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
    use crate::testutil::assert_close;
    use kiln_ir::trace::{Tensor, Tracer};
    use kiln_ir::{DType, Dim, Graph, Op, F64};
    use kiln_models::{llama::repeat_kv, nn};
    use kiln_runtime::{reference, Tensor as Value};
    use std::collections::HashMap;

    /// `softmax(q·kᵀ * scale + mask)·v` as the families trace it (`scale` absent when 1).
    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Tensor {
        let mut s = q.matmul_t(k, false, true).unwrap();
        if scale != 1.0 {
            s = (&s * scale).unwrap();
        }
        if let Some(m) = mask {
            s = s.add(m).unwrap();
        }
        s.softmax(-1).unwrap().matmul(v).unwrap()
    }

    /// The attention node of `h` and its operands' source names (`?` for a computed value).
    fn attention_of(h: &Graph) -> (Op, Vec<String>) {
        let n = h
            .nodes()
            .iter()
            .find(|n| matches!(n.op, Op::Attention { .. }))
            .expect("an attention node");
        let names = n
            .inputs
            .iter()
            .map(|v| match &h.nodes()[v.index()].op {
                Op::Input { name } | Op::Param { name } => name.clone(),
                _ => "?".to_string(),
            })
            .collect();
        (n.op.clone(), names)
    }

    #[test]
    fn llama_form_with_grouped_query_heads() {
        // 4 query heads over 2 key/value heads, repeated as transformers' `repeat_kv`.
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 4, 3, 8]);
        let k = t.input("k", DType::F32, [2, 2, 5, 8]);
        let v = t.input("v", DType::F32, [2, 2, 5, 6]);
        let m = t.input("mask", DType::F32, [2, 1, 3, 5]);
        let (kr, vr) = (repeat_kv(&k, 2).unwrap(), repeat_kv(&v, 2).unwrap());
        let y = sdpa(&q, &kr, &vr, 8f64.powf(-0.5), Some(&m));
        t.output("y", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["attention"]);
        let (op, names) = attention_of(&h);
        assert_eq!(names, ["q", "k", "v", "mask"]);
        assert_eq!(
            op,
            Op::Attention {
                scale: F64(f64::from(8f32.powf(-0.5))),
                causal: false,
                window: 0,
                merge_heads: false,
            }
        );
    }

    #[test]
    fn traced_causal_sliding_window_mask() {
        // The mask built from a 0/1 attention_mask (mistral's sliding window), with 2 cached
        // keys: it stays the additive operand.
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 4, 3, 8]);
        let k = t.input("k", DType::F32, [2, 2, 5, 8]);
        let v = t.input("v", DType::F32, [2, 2, 5, 8]);
        let am = t.input("attention_mask", DType::I64, [2, 5]);
        let mask = nn::attention_mask(&t, &am, &Dim::fixed(3), true, Some(2)).unwrap();
        let (kr, vr) = (repeat_kv(&k, 2).unwrap(), repeat_kv(&v, 2).unwrap());
        let y = sdpa(&q, &kr, &vr, 0.125, Some(&mask));
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite(&g, rules);
        let ops = ops(&h);
        assert_eq!(ops.iter().filter(|o| **o == "attention").count(), 1);
        // The causal and window comparisons become the op's flags; the padding stays a mask.
        for gone in [
            "softmax", "matmul", "expand", "mul", "iota", "le", "gt", "and",
        ] {
            assert!(!ops.contains(&gone), "{ops:?}");
        }
        let (op, names) = attention_of(&h);
        assert_eq!(names, ["q", "k", "v", "?"]);
        assert_eq!(
            op,
            Op::Attention {
                scale: F64(0.125),
                causal: true,
                window: 2,
                merge_heads: false,
            }
        );
        // Padding at the first key of one row; every query keeps a visible key.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let mut feeds: HashMap<String, Value> = ["q", "k", "v"]
            .iter()
            .map(|n| {
                let ty = &g.inputs().find(|i| i.0 == *n).unwrap().2;
                (n.to_string(), crate::testutil::random_tensor(&mut rng, ty))
            })
            .collect();
        let am = Value::from_i64(vec![2, 5], vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1]).unwrap();
        feeds.insert("attention_mask".into(), am);
        let none = HashMap::new();
        let want = reference::run(&g, &feeds, &none).unwrap();
        let got = reference::run(&h, &feeds, &none).unwrap();
        assert_close(&got, &want);
    }

    /// `where(key_pos <= query_pos, 0, hidden)` for `sq` queries at `key_pos[start ..]` over
    /// `sk` keys, as `nn::attention_mask` writes its causal part (no padding) with `start` the
    /// number of cached keys, `sk - sq`.
    fn causal_mask(t: &Tracer, start: usize, sq: usize, sk: usize, hidden: f64) -> Tensor {
        let key_pos = t.iota(DType::I64, [sk], 0).unwrap();
        let query_pos = key_pos.slice(0, start, start + sq).unwrap();
        let query_pos = query_pos.unsqueeze(1).unwrap();
        let visible = key_pos.le(&query_pos).unwrap();
        let (zero, hidden) = (t.scalar(DType::F32, 0.0), t.scalar(DType::F32, hidden));
        visible.where_(&zero, &hidden).unwrap()
    }

    #[test]
    fn causal_mask_without_padding_becomes_the_flag() {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [1, 2, 3, 4]);
        let k = t.input("k", DType::F32, [1, 2, 5, 4]);
        let v = t.input("v", DType::F32, [1, 2, 5, 4]);
        let m = causal_mask(&t, 2, 3, 5, f32::MIN.into());
        t.output("y", &sdpa(&q, &k, &v, 0.5, Some(&m)));
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["attention"]);
        let (op, names) = attention_of(&h);
        assert_eq!(names, ["q", "k", "v"]);
        assert!(matches!(
            op,
            Op::Attention {
                causal: true,
                window: 0,
                ..
            }
        ));
    }

    #[test]
    fn a_mild_or_misplaced_mask_stays_additive() {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [1, 2, 3, 4]);
        let k = t.input("k", DType::F32, [1, 2, 5, 4]);
        let v = t.input("v", DType::F32, [1, 2, 5, 4]);
        // -1 only lowers the hidden keys' weights: not causal.
        let mild = causal_mask(&t, 2, 3, 5, -1.0);
        t.output("mild", &sdpa(&q, &k, &v, 0.5, Some(&mild)));
        // Query positions from the start of the keys (no cache offset) are not the op's.
        let shifted = causal_mask(&t, 0, 3, 5, f32::MIN.into());
        t.output("shifted", &sdpa(&q, &k, &v, 0.5, Some(&shifted)));
        let h = rewrite_same(&t.finish().unwrap(), rules);
        let flags: Vec<Op> = h
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Attention { .. }))
            .map(|n| n.op.clone())
            .collect();
        assert_eq!(flags.len(), 2);
        assert!(flags
            .iter()
            .all(|o| matches!(o, Op::Attention { causal: false, .. })));
    }

    #[test]
    fn gpt2_forms_unscaled_and_divided() {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 3, 4, 8]);
        let k = t.input("k", DType::F32, [2, 3, 6, 8]);
        let v = t.input("v", DType::F32, [2, 3, 6, 8]);
        let m = t.input("mask", DType::F32, [2, 1, 4, 6]);
        // `scale_attn_weights = false`: no scale at all.
        t.output("plain", &sdpa(&q, &k, &v, 1.0, Some(&m)));
        // The scale as a division, the mask added on the left.
        let s = q.matmul_t(&k, false, true).unwrap();
        let s = (&s / 8f64.sqrt()).unwrap();
        let y = m.add(&s).unwrap().softmax(-1).unwrap().matmul(&v).unwrap();
        t.output("divided", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["attention", "attention"]);
        let scales: Vec<Op> = h
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Attention { .. }))
            .map(|n| n.op.clone())
            .collect();
        let attn = |s: f64| Op::Attention {
            scale: F64(s),
            causal: false,
            window: 0,
            merge_heads: false,
        };
        assert_eq!(scales, [attn(1.0), attn(1.0 / f64::from(8f32.sqrt()))]);
    }

    #[test]
    fn encoder_form_and_no_mask() {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 2, 5, 4]);
        let k = t.input("k", DType::F32, [2, 2, 5, 4]);
        let v = t.input("v", DType::F32, [2, 2, 5, 4]);
        // BERT's padding mask [b, 1, 1, s], and a mask-free attention.
        let m = t.input("mask", DType::F32, [2, 1, 1, 5]);
        t.output("masked", &sdpa(&q, &k, &v, 0.5, Some(&m)));
        t.output("unmasked", &sdpa(&q, &k, &v, 0.5, None));
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["attention", "attention"]);
        let arity: Vec<usize> = h
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Attention { .. }))
            .map(|n| n.inputs.len())
            .collect();
        assert_eq!(arity, [4, 3]);
    }

    #[test]
    fn near_misses_stay() {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [1, 2, 3, 4]);
        let k = t.input("k", DType::F32, [1, 2, 3, 4]);
        let v = t.input("v", DType::F32, [1, 2, 3, 4]);
        let s = q.matmul_t(&k, false, true).unwrap();
        // Softmax over the query axis is not attention.
        let y = s.softmax(2).unwrap().matmul(&v).unwrap();
        t.output("cols", &y);
        // A mask that broadcasts the scores up to batch 2.
        let m = t.input("mask", DType::F32, [2, 1, 3, 3]);
        let y = s.add(&m).unwrap().softmax(-1).unwrap().matmul(&v).unwrap();
        t.output("bigger", &y);
        // A non-constant scale.
        let c = t.input("c", DType::F32, [1]);
        let y = s.mul(&c).unwrap().softmax(-1).unwrap().matmul(&v).unwrap();
        t.output("scaled", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert!(!ops(&h).contains(&"attention"), "{:?}", ops(&h));
    }

    #[test]
    fn repeated_keys_with_unrepeated_values_keep_the_repeat() {
        // k is repeated but v already has every head: fused without un-repeating.
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [1, 4, 3, 4]);
        let k = t.input("k", DType::F32, [1, 2, 3, 4]);
        let v = t.input("v", DType::F32, [1, 4, 3, 4]);
        let y = sdpa(&q, &repeat_kv(&k, 2).unwrap(), &v, 0.5, None);
        t.output("y", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["reshape", "expand", "reshape", "attention"]);
    }
}

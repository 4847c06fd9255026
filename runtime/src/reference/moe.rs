//! The composite `moe` op (sparse mixture of experts), exactly as documented on
//! [`kiln_ir::Op::Moe`], computed the way backends do it: route every token, then run each
//! expert only on the tokens routed to it (token permutation), and scatter the weighted results
//! back in ascending expert order. Every step is the executor's own kernel for the primitive op
//! the traced dense form uses, so each value is rounded exactly as there.

use super::{composite, elementwise, layout, matmul, reduce, Ctx, ExecError};
use crate::{Storage, Tensor};
use kiln_ir::{BinaryOp, DType, ReduceOp, UnaryOp};

/// `moe(x, gate, w1_0, w3_0, w2_0, ..)` choosing `top_k` experts per token.
pub(crate) fn moe(ctx: &Ctx<'_>, top_k: usize, args: &[&Tensor]) -> Result<Tensor, ExecError> {
    if args.len() < 5 || !(args.len() - 2).is_multiple_of(3) {
        return Err(ctx.mismatch(format!(
            "moe takes x, gate and three weights per expert, got {} operands",
            args.len()
        )));
    }
    let (x, gate) = (args[0], args[1]);
    let experts = (args.len() - 2) / 3;
    let dt = x.dtype();
    if !dt.is_float() {
        return Err(ctx.unsupported(dt));
    }
    let Some((&h, lead)) = x.shape().split_last() else {
        return Err(ctx.mismatch("moe needs x of rank >= 1"));
    };
    if top_k == 0 || top_k > experts || gate.shape() != [experts, h] {
        return Err(ctx.mismatch(format!(
            "moe top_k = {top_k} with gate {:?} for {experts} experts and x {:?}",
            gate.shape(),
            x.shape()
        )));
    }
    let tokens: usize = lead.iter().product();
    let x2 = ctx.tensor(vec![tokens, h], x.storage().clone())?;

    // Routing: softmax over the router logits in f32, the top_k experts, their renormalized
    // probabilities in x's dtype.
    let logits = matmul::matmul(ctx, false, true, &x2, gate)?;
    let probs = composite::softmax(ctx, 1, false, &logits.cast(DType::F32))?;
    let chosen = reduce::topk(ctx, top_k, 1, &probs)?;
    let picked = layout::gather_along(ctx, 1, &probs, &chosen)?;
    let total = reduce::reduce(ctx, ReduceOp::Sum, &[1], true, &picked)?;
    let weights = elementwise::binary(ctx, BinaryOp::Div, &picked, &total)?.cast(dt);
    let ids = chosen
        .as_i64()
        .ok_or_else(|| ctx.mismatch("topk gave no i64 indices"))?;

    // Token permutation: each expert's (token, slot) pairs, tokens ascending.
    let mut routed: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
    for t in 0..tokens {
        for slot in 0..top_k {
            let e = usize::try_from(ids[t * top_k + slot])
                .map_err(|_| ctx.mismatch("negative expert index"))?;
            routed[e].push((t, slot));
        }
    }

    // Each expert on its tokens only; the weighted results accumulate per token in ascending
    // expert order, each partial sum rounded to `dt` as the traced sum's adds are.
    let mut acc = vec![0.0f64; tokens * h];
    let mut started = vec![false; tokens];
    for (e, pairs) in routed.iter().enumerate() {
        if pairs.is_empty() {
            continue;
        }
        let [w1, w3, w2] = [args[2 + 3 * e], args[3 + 3 * e], args[4 + 3 * e]];
        let rows: Vec<usize> = pairs.iter().map(|&(t, _)| t).collect();
        let xe = x2
            .select_rows(&rows)
            .ok_or_else(|| ctx.mismatch("routed token out of range"))?;
        let g = matmul::matmul(ctx, false, true, &xe, w1)?;
        let u = matmul::matmul(ctx, false, true, &xe, w3)?;
        let act = elementwise::unary(ctx, UnaryOp::Silu, &g)?;
        let hid = elementwise::binary(ctx, BinaryOp::Mul, &act, &u)?;
        let y = matmul::matmul(ctx, false, true, &hid, w2)?;
        if y.shape() != [rows.len(), h] {
            return Err(ctx.mismatch(format!("expert {e} gave {:?}", y.shape())));
        }
        let w = Storage::from_scalars(
            dt,
            pairs.iter().map(|&(t, slot)| weights.get(t * top_k + slot)),
        );
        let w = ctx.tensor(vec![rows.len(), 1], w)?;
        let part = elementwise::binary(ctx, BinaryOp::Mul, &y, &w)?.to_f64_vec();
        for (r, &t) in rows.iter().enumerate() {
            let (dst, src) = (&mut acc[t * h..(t + 1) * h], &part[r * h..(r + 1) * h]);
            if started[t] {
                let sums = Storage::from_scalars(
                    dt,
                    dst.iter()
                        .zip(src)
                        .map(|(a, b)| kiln_ir::Scalar::Float(a + b)),
                );
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = sums.get(i).as_f64();
                }
            } else {
                dst.copy_from_slice(src);
                started[t] = true;
            }
        }
    }
    let out = Storage::from_scalars(dt, acc.into_iter().map(kiln_ir::Scalar::Float));
    ctx.tensor(x.shape().to_vec(), out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{run, NoParams};
    use crate::Tensor;
    use kiln_ir::trace::{Tensor as T, Tracer};
    use kiln_ir::{DType, Dim, Graph, Op};
    use std::collections::HashMap;

    /// The dense traced form of `models/src/moe.rs` over inputs `x`, `gate`, `w1_e`, `w3_e`,
    /// `w2_e` (every expert computes on every token; unchosen ones are weighted by 0).
    fn dense(t: &Tracer, x: &T, w: &[T], experts: usize, top_k: usize) -> T {
        let logits = x.matmul_t(&w[0], false, true).unwrap();
        let probs = logits.cast(DType::F32).unwrap().softmax(-1).unwrap();
        let chosen = probs.topk(top_k, -1).unwrap();
        let weights = probs.gather_along(-1, &chosen).unwrap();
        let weights = weights
            .div(&weights.sum(&[-1], true).unwrap())
            .unwrap()
            .cast(x.dtype())
            .unwrap();
        let mut shape: Vec<Dim> = x.shape()[..x.rank() - 1].to_vec();
        shape.push(Dim::from(experts));
        let ids = t.iota(DType::I64, shape, x.rank() - 1).unwrap();
        let zero = t.scalar(x.dtype(), 0.0);
        let mut route: Option<T> = None;
        for k in 0..top_k {
            let idx = chosen.slice(-1, k, k + 1).unwrap();
            let wk = weights.slice(-1, k, k + 1).unwrap();
            let part = ids.eq(&idx).unwrap().where_(&wk, &zero).unwrap();
            route = Some(route.map_or(part.clone(), |d| d.add(&part).unwrap()));
        }
        let route = route.unwrap();
        let mut out: Option<T> = None;
        for e in 0..experts {
            let [w1, w3, w2] = [&w[1 + 3 * e], &w[2 + 3 * e], &w[3 + 3 * e]];
            let g = x.matmul_t(w1, false, true).unwrap();
            let u = x.matmul_t(w3, false, true).unwrap();
            let y = g.silu().unwrap().mul(&u).unwrap();
            let y = y.matmul_t(w2, false, true).unwrap();
            let y = y.mul(&route.slice(-1, e, e + 1).unwrap()).unwrap();
            out = Some(out.map_or(y.clone(), |acc| acc.add(&y).unwrap()));
        }
        out.unwrap()
    }

    /// Operands `x[2, 3, h]`, `gate[E, h]` and per-expert weights, seeded pseudo-random.
    fn operands(experts: usize, h: usize, i: usize, seed: u64) -> Vec<Tensor> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rand = |n: usize| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
                })
                .collect();
            v
        };
        let mut ts = vec![
            f32t(&[2, 3, h], &rand(6 * h)),
            f32t(&[experts, h], &rand(experts * h)),
        ];
        for _ in 0..experts {
            ts.push(f32t(&[i, h], &rand(i * h)));
            ts.push(f32t(&[i, h], &rand(i * h)));
            ts.push(f32t(&[h, i], &rand(h * i)));
        }
        ts
    }

    /// The dense graph and the one-`moe` graph over the same inputs `x0, x1, ..`.
    fn both(args: &[Tensor], top_k: usize) -> (Graph, Graph) {
        let experts = (args.len() - 2) / 3;
        let t = Tracer::new();
        let ins: Vec<T> = args
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let ty = ty_of(a);
                t.input(&format!("x{i}"), ty.dtype, ty.shape)
            })
            .collect();
        let y = dense(&t, &ins[0], &ins[1..], experts, top_k);
        t.output("y", &y);
        let mut g = Graph::new();
        let ids: Vec<_> = args
            .iter()
            .enumerate()
            .map(|(i, a)| g.input(&format!("x{i}"), ty_of(a)))
            .collect();
        let y = g.add(Op::Moe { top_k }, &ids).unwrap();
        g.add_output("y", y);
        (t.finish().unwrap(), g)
    }

    fn feeds(args: &[Tensor]) -> HashMap<String, Tensor> {
        args.iter()
            .enumerate()
            .map(|(i, a)| (format!("x{i}"), a.clone()))
            .collect()
    }

    #[test]
    fn equals_the_dense_traced_form_bit_for_bit() {
        for (experts, top_k, seed) in [(4, 2, 1), (1, 1, 2), (3, 3, 3), (8, 2, 4), (5, 1, 5)] {
            let args = operands(experts, 6, 5, seed);
            let (dense, sparse) = both(&args, top_k);
            let want = &run(&dense, &feeds(&args), &NoParams).unwrap()["y"];
            let got = eval_op(Op::Moe { top_k }, &args);
            assert_eq!(got.shape(), [2, 3, 6]);
            assert_eq!(
                got.as_f32().unwrap(),
                want.as_f32().unwrap(),
                "{experts}/{top_k}"
            );
            let via_graph = &run(&sparse, &feeds(&args), &NoParams).unwrap()["y"];
            assert_eq!(via_graph, &got);
        }
    }

    #[test]
    fn equals_the_dense_form_in_bf16() {
        let args: Vec<Tensor> = operands(4, 8, 6, 9)
            .iter()
            .map(|a| a.cast(DType::BF16))
            .collect();
        let (dense, _) = both(&args, 2);
        let want = &run(&dense, &feeds(&args), &NoParams).unwrap()["y"];
        let got = eval_op(Op::Moe { top_k: 2 }, &args);
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_f64_vec(), want.to_f64_vec());
    }

    #[test]
    fn hand_checked_single_token() {
        // h = 1, i = 1, two experts; gate logits 0 and ln 3: probs 1/4, 3/4; top-1 picks
        // expert 1 with weight 1. Expert 1: silu(2x) * (x) * 1, at x = 1: silu(2) = 1.7616.
        let x = f32t(&[1, 1], &[1.0]);
        let gate = f32t(&[2, 1], &[0.0, 3f32.ln()]);
        let one = f32t(&[1, 1], &[1.0]);
        let two = f32t(&[1, 1], &[2.0]);
        let args = [
            x,
            gate,
            one.clone(),
            one.clone(),
            one.clone(),
            two,
            one.clone(),
            one,
        ];
        let got = eval_op(Op::Moe { top_k: 1 }, &args);
        assert_close(&got, &[1, 1], &[2.0 / (1.0 + (-2f64).exp())], 1e-6);
        // Top-2: weights 1/4 and 3/4 of silu(1) and silu(2).
        let got = eval_op(Op::Moe { top_k: 2 }, &args);
        let silu = |v: f64| v / (1.0 + (-v).exp());
        assert_close(&got, &[1, 1], &[0.25 * silu(1.0) + 0.75 * silu(2.0)], 1e-6);
    }

    #[test]
    fn experts_never_see_tokens_not_routed_to_them() {
        // Expert 2's router row makes it lose every token; its weights are NaN. The dense form
        // multiplies its NaN output by 0 and is NaN; the dispatch never runs it.
        let mut args = operands(3, 4, 3, 7);
        let gate: Vec<f32> = (0..12)
            .map(|j| if j / 4 == 2 { -1e4 } else { 0.1 * j as f32 })
            .collect();
        args[1] = f32t(&[3, 4], &gate);
        args[2 + 3 * 2] = f32t(&[3, 4], &[f32::NAN; 12]);
        let x = f32t(&[2, 3, 4], &[1.0; 24]);
        args[0] = x;
        let (dense, _) = both(&args, 2);
        let want = &run(&dense, &feeds(&args), &NoParams).unwrap()["y"];
        assert!(want.as_f32().unwrap().iter().all(|v| v.is_nan()));
        let got = eval_op(Op::Moe { top_k: 2 }, &args);
        assert!(got.as_f32().unwrap().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_operands_are_rejected_by_inference() {
        let args = operands(2, 4, 3, 1);
        let tys: Vec<_> = args.iter().map(ty_of).collect();
        let refs: Vec<_> = tys.iter().collect();
        let e = kiln_ir::infer(&Op::Moe { top_k: 2 }, &refs[..4]).unwrap_err();
        assert!(e.contains("moe takes x, gate and three"), "{e}");
        let e = kiln_ir::infer(&Op::Moe { top_k: 3 }, &refs).unwrap_err();
        assert!(e.contains("top_k = 3 must be in 1..=2"), "{e}");
        let gate1 = kiln_ir::TensorType::new(DType::F32, [1, 4]);
        let bad = [refs[0], &gate1, refs[2], refs[3], refs[2]];
        let e = kiln_ir::infer(&Op::Moe { top_k: 1 }, &bad).unwrap_err();
        assert!(e.contains("expert 0 w2"), "{e}");
        assert_eq!(
            kiln_ir::infer(&Op::Moe { top_k: 2 }, &refs),
            Ok(tys[0].clone())
        );
    }
}

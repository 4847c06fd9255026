//! Normalization rules: the traced forms of RMSNorm and LayerNorm (as `kiln_models::nn`
//! writes them) become the IR's composite `rmsnorm` and `layernorm` ops. `eps` is read from the
//! folded scalar constant. Multiplications match in either operand order.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `rmsnorm` | `w * cast(x32 * rsqrt(mean(x32 * x32, -1, keepdim) + eps), d)` with `x32 = cast(x, f32)` (both casts absent when `x` is f32) | `rmsnorm(x, w)` |
//! | `layernorm` | `(c * rsqrt(mean(c * c, -1, keepdim) + eps)) * w + b` with `c = x - mean(x, -1, keepdim)` | `layernorm(x, w, b)` |
//!
//! `w` and `b` must be vectors of the last axis's size, so the composite's result type is the
//! matched value's. For f16/bf16 `x` the composite rounds once, at the end, where the traced
//! form also rounds the normalized value before the weight multiply (as fused kernels do).

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{BinaryOp, DType, Op, ReduceOp, UnaryOp, F64};

/// Both normalization rules.
pub fn rules() -> Vec<Rewrite> {
    vec![
        FnRule::rewrite("rmsnorm", rmsnorm),
        FnRule::rewrite("layernorm", layernorm),
    ]
}

/// True when `v`'s class is a vector as long as `id`'s last axis, of `id`'s dtype.
fn is_row_vector(eg: &EG, v: Id, id: Id) -> bool {
    let (t, x) = (&eg[v].data.ty, &eg[id].data.ty);
    t.dtype == x.dtype && t.rank() == 1 && x.shape.last() == Some(&t.shape[0])
}

/// The operands `a` of `mean(a, last axis, keepdim)` nodes in `id`'s class.
fn mean_last(eg: &EG, id: Id) -> Vec<Id> {
    find::unary(
        eg,
        id,
        |o| matches!(o, Op::Reduce { op: ReduceOp::Mean, axes, keepdim: true } if axes.len() == 1),
    )
    .filter(|(op, a)| matches!(op, Op::Reduce { axes, .. } if axes[0] + 1 == eg[*a].data.ty.rank()))
    .map(|(_, a)| a)
    .collect()
}

/// `(v, eps)` for `rsqrt(v + eps)` nodes in `id`'s class, `eps` a one-element constant.
fn rsqrt_plus_eps(eg: &EG, id: Id) -> Vec<(Id, f64)> {
    let mut out = vec![];
    for (_, s) in find::unary(eg, id, |o| *o == Op::Unary(UnaryOp::Rsqrt)) {
        for (v, e) in find::binary(eg, s, BinaryOp::Add) {
            if let Some(eps) = find::scalar(eg, e) {
                if eg[s].data.ty == eg[v].data.ty {
                    out.push((v, eps));
                }
            }
        }
    }
    out
}

/// `(x, eps)` where `id`'s class is `x * rsqrt(mean(x * x, -1, keepdim) + eps)`.
fn normalized(eg: &EG, id: Id) -> Vec<(Id, f64)> {
    let mut out = vec![];
    for (x, inv) in find::binary(eg, id, BinaryOp::Mul) {
        for (v, eps) in rsqrt_plus_eps(eg, inv) {
            for sq in mean_last(eg, v) {
                if find::binary(eg, sq, BinaryOp::Mul).contains(&(x, x)) {
                    out.push((x, eps));
                }
            }
        }
    }
    out
}

/// The operands `x` of `cast(x, to)` nodes in `id`'s class with `x` of dtype `from`; `id`
/// itself when `from == to` (the tracer emits no cast then).
fn cast_from(eg: &EG, id: Id, from: DType, to: DType) -> Vec<Id> {
    if from == to {
        return vec![id];
    }
    find::unary(eg, id, |o| *o == Op::Cast { to })
        .filter(|(_, x)| eg[*x].data.ty.dtype == from)
        .map(|(_, x)| x)
        .collect()
}

fn rmsnorm(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    for (w, n) in find::binary(eg, id, BinaryOp::Mul) {
        if !is_row_vector(eg, w, id) {
            continue;
        }
        for m in cast_from(eg, n, DType::F32, ty.dtype) {
            for (x32, eps) in normalized(eg, m) {
                for x in cast_from(eg, x32, ty.dtype, DType::F32) {
                    if eg[x].data.ty == *ty {
                        out.push(Term::node(Op::RmsNorm { eps: F64(eps) }, &[x, w]));
                    }
                }
            }
        }
    }
    out
}

fn layernorm(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    for (p, b) in find::binary(eg, id, BinaryOp::Add) {
        if !is_row_vector(eg, b, id) {
            continue;
        }
        for (n, w) in find::binary(eg, p, BinaryOp::Mul) {
            if !is_row_vector(eg, w, id) {
                continue;
            }
            for (c, eps) in normalized(eg, n) {
                for sub in find::nodes(eg, c, |o| *o == Op::Binary(BinaryOp::Sub)) {
                    let (x, mu) = (eg.find(sub.children[0]), eg.find(sub.children[1]));
                    if eg[x].data.ty == *ty && mean_last(eg, mu).contains(&x) {
                        out.push(Term::node(Op::LayerNorm { eps: F64(eps) }, &[x, w, b]));
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
    use kiln_ir::{DType, Op, F64};
    use kiln_models::nn;

    #[test]
    fn rmsnorm_from_the_traced_form() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let y = nn::rms_norm(&t, &x, "norm.weight", 1e-6).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["rmsnorm"]);
        let Op::RmsNorm { eps } = h.nodes()[2].op else {
            panic!()
        };
        assert_eq!(eps, F64(f64::from(1e-6f32)));
    }

    #[test]
    fn rmsnorm_in_bf16() {
        let t = Tracer::new();
        let x = t.input("x", DType::BF16, [2, 8]);
        let y = nn::rms_norm(&t, &x, "norm.weight", 1e-5).unwrap();
        t.output("y", &y);
        assert_eq!(ops(&rewrite(&t.finish().unwrap(), rules)), ["rmsnorm"]);
    }

    #[test]
    fn layernorm_from_the_traced_form() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [3, 16]);
        let y = nn::layer_norm(&t, &x, "ln", 1e-12).unwrap();
        t.output("y", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["layernorm"]);
    }

    #[test]
    fn other_axes_do_not_match() {
        // Statistics over the first axis are not a norm over the last.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [4, 8]);
        let w = t.param("w", DType::F32, [8]);
        let ms = x.mul(&x).unwrap().mean(&[0], true).unwrap();
        let inv = (&ms + 1e-6).unwrap().rsqrt().unwrap();
        let y = w.mul(&x.mul(&inv).unwrap()).unwrap();
        t.output("y", &y);
        let h = rewrite_same(&t.finish().unwrap(), rules);
        assert!(!ops(&h).contains(&"rmsnorm"), "{:?}", ops(&h));
    }
}

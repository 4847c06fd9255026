//! Rotary position embedding: the traced rotate-half form (`kiln_models::rope::apply`) becomes
//! the IR's composite `rotary` op, which backends compute in one pass over `x` (no slices,
//! negation or concat materialized). Products and the sum match in either operand order.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `rotary` | `x * cos + concat(-x[.., h..d], x[.., 0..h]) * sin` over the last axis, `d = 2h` | `rotary(x, cos, sin)` |
//!
//! `x` must have the sum's type, so `cos` and `sin` broadcast to `x` (the composite's
//! contract); the composite is defined as exactly these primitive ops, so the rewrite is exact.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{BinaryOp, Dim, Op, UnaryOp};

/// The rotary rule.
pub fn rules() -> Vec<Rewrite> {
    vec![FnRule::rewrite("rotary", rotary)]
}

/// The slice `x[.., start..end]` over the last axis in `id`'s class.
fn is_last_axis_slice(eg: &EG, id: Id, x: Id, start: i64, end: i64) -> bool {
    let last = eg[x].data.ty.rank() - 1;
    let (start, end) = (Dim::fixed(start), Dim::fixed(end));
    let found = find::unary(eg, id, move |o| {
        matches!(o, Op::Slice { axis, start: s, end: e } if *axis == last && *s == start && *e == end)
    })
    .any(|(_, y)| y == x);
    found
}

/// True when `id`'s class holds `concat(-x[.., h..d], x[.., 0..h])` over the last axis.
fn is_rotate_half_of(eg: &EG, id: Id, x: Id) -> bool {
    let ty = &eg[x].data.ty;
    let Some(d) = ty.shape.last().and_then(Dim::as_fixed) else {
        return false;
    };
    if ty.rank() == 0 || d % 2 != 0 {
        return false;
    }
    let last = ty.rank() - 1;
    find::nodes(eg, id, move |o| *o == Op::Concat { axis: last })
        .filter(|n| n.children.len() == 2)
        .any(|n| {
            let (neg, low) = (eg.find(n.children[0]), eg.find(n.children[1]));
            is_last_axis_slice(eg, low, x, 0, d / 2)
                && find::unary(eg, neg, |o| *o == Op::Unary(UnaryOp::Neg))
                    .any(|(_, high)| is_last_axis_slice(eg, high, x, d / 2, d))
        })
}

fn rotary(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    for (p, q) in find::binary(eg, id, BinaryOp::Add) {
        for (x, cos) in find::binary(eg, p, BinaryOp::Mul) {
            if eg[x].data.ty != *ty {
                continue;
            }
            for (r, sin) in find::binary(eg, q, BinaryOp::Mul) {
                if is_rotate_half_of(eg, r, x) {
                    out.push(Term::node(Op::Rotary, &[x, cos, sin]));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rules;
    use crate::rules::check::{ops, rewrite_exact};
    use kiln_ir::trace::Tracer;
    use kiln_ir::{DType, Dim};
    use kiln_models::rope;

    #[test]
    fn rotary_from_the_traced_form() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 5, 8]);
        let cos = t.input("cos", DType::F32, [2, 5, 8]);
        let sin = t.input("sin", DType::F32, [2, 5, 8]);
        let y = rope::apply(&x, &cos, &sin).unwrap();
        t.output("y", &y);
        let h = rewrite_exact(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["reshape", "reshape", "rotary"]);
    }

    #[test]
    fn operand_orders_match() {
        // sin · rotate_half(x) + cos · x, the products and the sum commuted.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [3, 6]);
        let cos = t.input("cos", DType::F32, [6]);
        let sin = t.input("sin", DType::F32, [3, 6]);
        let x1 = x.slice(-1, Dim::fixed(0), Dim::fixed(3)).unwrap();
        let x2 = x.slice(-1, Dim::fixed(3), Dim::fixed(6)).unwrap();
        let rot = kiln_ir::trace::Tensor::cat(&[&x2.neg().unwrap(), &x1], -1).unwrap();
        let y = sin.mul(&rot).unwrap().add(&cos.mul(&x).unwrap()).unwrap();
        t.output("y", &y);
        let h = rewrite_exact(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["rotary"]);
    }

    #[test]
    fn other_rotations_do_not_match() {
        // Halves swapped without the negation, a negated low half, or a table that
        // broadcasts `x` to a larger shape: not rotate-half over `x`.
        let build = |negate_low: bool, neg: bool, cos_shape: &[usize]| {
            let t = Tracer::new();
            let x = t.input("x", DType::F32, [3, 6]);
            let cos = t.input("cos", DType::F32, cos_shape.to_vec());
            let sin = t.input("sin", DType::F32, [3, 6]);
            let x1 = x.slice(-1, Dim::fixed(0), Dim::fixed(3)).unwrap();
            let x2 = x.slice(-1, Dim::fixed(3), Dim::fixed(6)).unwrap();
            let (a, b) = if negate_low {
                (x1.neg().unwrap(), x2)
            } else {
                (x2.clone(), x1)
            };
            let a = if neg && !negate_low {
                a.neg().unwrap()
            } else {
                a
            };
            let rot = kiln_ir::trace::Tensor::cat(&[&a, &b], -1).unwrap();
            let y = x.mul(&cos).unwrap().add(&rot.mul(&sin).unwrap()).unwrap();
            t.output("y", &y);
            ops(&rewrite_exact(&t.finish().unwrap(), rules))
        };
        assert!(build(false, true, &[6]).contains(&"rotary"));
        assert!(!build(false, false, &[6]).contains(&"rotary"));
        assert!(!build(true, false, &[6]).contains(&"rotary"));
        assert!(!build(false, true, &[2, 3, 6]).contains(&"rotary"));
    }
}

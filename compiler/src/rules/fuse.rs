//! Kernel fusion, the elementwise part: an elementwise node (unary, binary, compare, where,
//! cast, or an existing `fused_elementwise`) whose operand is itself computed by an elementwise
//! node of the *same result shape* becomes one [`Op::FusedElementwise`] computing both; applied
//! repeatedly, chains and trees of elementwise ops become one kernel.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `fuse-elementwise` | `f(.., g(ys), ..)` with `f`, `g` elementwise and `g(ys)` shaped like the result | `fused_elementwise(.., ys, ..) body="(f .. (g ..) ..)"` |
//!
//! Operands are numbered in order of first use in the body, an e-class used twice is one
//! operand, and rank-0 constants move into the body, so that every way of reaching one fusion
//! gives the same e-node. A producer of a smaller shape is never inlined (it would be
//! recomputed for every broadcast element). Both forms stay in the e-class; the cost model
//! ([`crate::cost`]) prices a fused node as one pass over its operands and result, and the
//! extractor counts a producer that other consumers still need once, so fusing a shared
//! producer is chosen only when the recomputation pays. Bodies are limited to [`MAX_BODY`]
//! nodes and [`MAX_OPERANDS`] operands, which bounds the e-graph's growth.

use crate::egraph::{FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{Expr, Literal, Op};

/// The most nodes a fused body may have.
pub const MAX_BODY: usize = 24;

/// The most operands a fused node may have.
pub const MAX_OPERANDS: usize = 8;

/// The fusion rule.
pub fn rules() -> Vec<Rewrite> {
    vec![FnRule::rewrite("fuse-elementwise", fuse)]
}

/// The node as a body over its children: a fused node's own body, or a primitive elementwise
/// op over `$0..$n`. `None` for every other op (constants included: they are inlined instead).
fn as_body(op: &Op, arity: usize) -> Option<Expr> {
    match op {
        Op::FusedElementwise { body } => Some(body.clone()),
        Op::Const { .. } => None,
        op => Expr::from_op(op, (0..arity).map(Expr::Arg).collect()),
    }
}

/// The rank-0 constant in `id`'s class, if any.
fn scalar_const(eg: &EG, id: Id) -> Option<Literal> {
    eg[id].nodes.iter().find_map(|n| match &n.op {
        Op::Const { value } if value.shape().is_empty() => Some(value.clone()),
        _ => None,
    })
}

/// `body` over `operands` in canonical form: constants inlined, operands renumbered by first
/// use and deduplicated. `None` when no operand is left.
fn canonical(eg: &EG, body: &Expr, operands: &[Id]) -> Option<(Expr, Vec<Id>)> {
    let mut used: Vec<Id> = vec![];
    let body = body.substitute(&mut |i| {
        let c = eg.find(operands[i]);
        if let Some(lit) = scalar_const(eg, c) {
            return Expr::Const(lit);
        }
        let k = used.iter().position(|&u| u == c).unwrap_or_else(|| {
            used.push(c);
            used.len() - 1
        });
        Expr::Arg(k)
    });
    (!used.is_empty()).then_some((body, used))
}

fn fuse(eg: &EG, id: Id) -> Vec<Term> {
    let want = &eg[id].data.ty;
    let mut out: Vec<Term> = vec![];
    for node in &eg[id].nodes {
        let Some(body) = as_body(&node.op, node.children.len()) else {
            continue;
        };
        let n = node.children.len();
        for (slot, &child) in node.children.iter().enumerate() {
            let child = eg.find(child);
            if child == id || eg[child].data.ty.shape != want.shape {
                continue;
            }
            for inner in &eg[child].nodes {
                let Some(inner_body) = as_body(&inner.op, inner.children.len()) else {
                    continue;
                };
                let inlined = inner_body.substitute(&mut |k| Expr::Arg(n + k));
                let merged = body.substitute(&mut |j| {
                    if j == slot {
                        inlined.clone()
                    } else {
                        Expr::Arg(j)
                    }
                });
                let mut operands = node.children.clone();
                operands.extend(&inner.children);
                let Some((body, operands)) = canonical(eg, &merged, &operands) else {
                    continue;
                };
                if body.size() > MAX_BODY || operands.len() > MAX_OPERANDS || operands.contains(&id)
                {
                    continue;
                }
                let term = Term::node(Op::FusedElementwise { body }, &operands);
                if !out.contains(&term) {
                    out.push(term);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rules;
    use crate::rules::check::{ops, rewrite_exact as rewrite_same};
    use kiln_ir::trace::Tracer;
    use kiln_ir::{DType, Op};

    #[test]
    fn swiglu_and_a_chain_become_one_kernel() {
        let t = Tracer::new();
        let g = t.input("g", DType::F32, [2, 3, 8]);
        let u = t.input("u", DType::F32, [2, 3, 8]);
        let r = t.input("r", DType::F32, [2, 3, 8]);
        let y = g.silu().unwrap().mul(&u).unwrap();
        let y = y.mul(&t.scalar(DType::F32, 0.5)).unwrap().add(&r).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["fused_elementwise"]);
        let fused = h.nodes().last().unwrap();
        let Op::FusedElementwise { body } = &fused.op else {
            panic!("{h}")
        };
        assert_eq!(
            body.to_string(),
            "(add (mul (mul (silu $0) $1) (const f32 0.5)) $2)"
        );
    }

    #[test]
    fn a_smaller_producer_is_not_recomputed_per_element() {
        // cos(f) is [8] and feeds a [2, 3, 8] product: it stays its own kernel.
        let t = Tracer::new();
        let f = t.input("f", DType::F32, [8]);
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let y = x.mul(&f.cos().unwrap()).unwrap().neg().unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["cos", "fused_elementwise"]);
    }

    #[test]
    fn a_shared_producer_is_kept_when_recomputing_it_costs_more() {
        // s = a + b is an output too: fusing it into s * c would read a and b again.
        let t = Tracer::new();
        let a = t.input("a", DType::F32, [64, 64]);
        let b = t.input("b", DType::F32, [64, 64]);
        let c = t.input("c", DType::F32, [64, 64]);
        let s = a.add(&b).unwrap();
        let y = s.mul(&c).unwrap().exp().unwrap();
        t.output("s", &s);
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["add", "fused_elementwise"]);
    }

    #[test]
    fn mixed_dtypes_compare_and_where_fuse_bit_exactly() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [4, 8]).cast(DType::BF16).unwrap();
        let m = t.input("m", DType::F32, [4, 8]);
        let x32 = x.exp().unwrap().cast(DType::F32).unwrap();
        let keep = m.gt(&x32).unwrap();
        let y = keep.where_(&x32.tanh().unwrap(), &m).unwrap();
        let y = y.cast(DType::BF16).unwrap().cast(DType::F32).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["fused_elementwise"]);
    }
}

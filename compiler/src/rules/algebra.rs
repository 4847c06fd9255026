//! Algebra and layout rules: each removes a view, a cast or an arithmetic identity, or moves a
//! transpose into a matmul flag. Constant folding itself is the e-class analysis's job
//! ([`crate::egraph::analysis`]); these rules read the folded constants.
//!
//! | rule | rewrite | condition |
//! |---|---|---|
//! | `permute-permute` | `permute(permute(x, p), q)` → `permute(x, p∘q)` (or `x`) | — |
//! | `permute-identity` | `permute(x, [0, 1, ..])` → `x` | — |
//! | `reshape-reshape` | `reshape(reshape(x))` → `reshape(x)` | — |
//! | `reshape-identity` | `reshape(x, shape(x))` → `x` | — |
//! | `expand-expand` | `expand(expand(x), s)` → `expand(x, s)` | — |
//! | `expand-identity` | `expand(x, shape(x))` → `x` | — |
//! | `broadcast-expand` | `f(.., expand(x), ..)` → `f(.., x, ..)` for binary, compare, where | same broadcast shape |
//! | `mul-one`, `div-one` | `x * 1`, `1 * x`, `x / 1` → `x` | constant of ones; result shape = `x`'s |
//! | `add-zero`, `sub-zero` | `x + 0`, `0 + x`, `x - 0` → `x` | as above with zeros |
//! | `cast-identity` | `cast(x, dtype(x))` → `x` | — |
//! | `cast-cast` | `cast(cast(x, b), c)` → `cast(x, c)` (or `x`) | `x` → `b` exact |
//! | `matmul-transpose` | `matmul(permute(a, swap), b)` → `matmul(a, b)` with the flag flipped | the permute swaps the last two axes only |

//!
//! `x + 0` → `x` keeps a `-0.0` that the addition would have turned into `+0.0`; the two
//! compare equal, and no op of the IR tells them apart except division by them.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{broadcast_shapes, BinaryOp, DType, Op};

/// Every algebra and layout rule.
pub fn rules() -> Vec<Rewrite> {
    vec![
        FnRule::rewrite("permute-permute", permute_permute),
        FnRule::rewrite("permute-identity", permute_identity),
        FnRule::rewrite("reshape-reshape", reshape_reshape),
        FnRule::rewrite("reshape-identity", reshape_identity),
        FnRule::rewrite("expand-expand", expand_expand),
        FnRule::rewrite("expand-identity", expand_identity),
        FnRule::rewrite("broadcast-expand", broadcast_expand),
        FnRule::rewrite("mul-one", |eg, id| {
            neutral(eg, id, BinaryOp::Mul, 1.0, true)
        }),
        FnRule::rewrite("div-one", |eg, id| {
            neutral(eg, id, BinaryOp::Div, 1.0, false)
        }),
        FnRule::rewrite("add-zero", |eg, id| {
            neutral(eg, id, BinaryOp::Add, 0.0, true)
        }),
        FnRule::rewrite("sub-zero", |eg, id| {
            neutral(eg, id, BinaryOp::Sub, 0.0, false)
        }),
        FnRule::rewrite("cast-identity", cast_identity),
        FnRule::rewrite("cast-cast", cast_cast),
        FnRule::rewrite("matmul-transpose", matmul_transpose),
    ]
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

fn permute_permute(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for (outer, a) in find::unary(eg, id, |o| matches!(o, Op::Permute { .. })) {
        let Op::Permute { perm: q } = outer else {
            continue;
        };
        for (inner, x) in find::unary(eg, a, |o| matches!(o, Op::Permute { .. })) {
            let Op::Permute { perm: p } = inner else {
                continue;
            };
            let perm: Vec<usize> = q.iter().map(|&i| p[i]).collect();
            out.push(if is_identity(&perm) {
                Term::Class(x)
            } else {
                Term::node(Op::Permute { perm }, &[x])
            });
        }
    }
    out
}

fn permute_identity(eg: &EG, id: Id) -> Vec<Term> {
    find::unary(
        eg,
        id,
        |o| matches!(o, Op::Permute { perm } if is_identity(perm)),
    )
    .map(|(_, x)| Term::Class(x))
    .collect()
}

fn reshape_reshape(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for (outer, a) in find::unary(eg, id, |o| matches!(o, Op::Reshape { .. })) {
        for (_, x) in find::unary(eg, a, |o| matches!(o, Op::Reshape { .. })) {
            out.push(Term::node(outer.clone(), &[x]));
        }
    }
    out
}

/// `op(x)` → `x` for the class's views whose result type is `x`'s.
fn view_identity(eg: &EG, id: Id, is_view: fn(&Op) -> bool) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    find::unary(eg, id, is_view)
        .filter(|(_, x)| eg[*x].data.ty == *ty)
        .map(|(_, x)| Term::Class(x))
        .collect()
}

fn reshape_identity(eg: &EG, id: Id) -> Vec<Term> {
    view_identity(eg, id, |o| matches!(o, Op::Reshape { .. }))
}

fn expand_identity(eg: &EG, id: Id) -> Vec<Term> {
    view_identity(eg, id, |o| matches!(o, Op::Expand { .. }))
}

fn expand_expand(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for (outer, a) in find::unary(eg, id, |o| matches!(o, Op::Expand { .. })) {
        for (_, x) in find::unary(eg, a, |o| matches!(o, Op::Expand { .. })) {
            out.push(Term::node(outer.clone(), &[x]));
        }
    }
    out
}

fn broadcast_expand(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    let elementwise = |o: &Op| matches!(o, Op::Binary(_) | Op::Compare(_) | Op::Where);
    for node in find::nodes(eg, id, elementwise) {
        for (i, &child) in node.children.iter().enumerate() {
            for (_, x) in find::unary(eg, child, |o| matches!(o, Op::Expand { .. })) {
                let mut children = node.children.clone();
                children[i] = x;
                let shape = children
                    .iter()
                    .try_fold(vec![], |s, &c| broadcast_shapes(&s, &eg[c].data.ty.shape));
                if shape.as_ref() == Ok(&ty.shape) {
                    out.push(Term::node(node.op.clone(), &children));
                }
            }
        }
    }
    out
}

/// `x op c` (and `c op x` when `commutes`) → `x` where `c` is all `value` and the result has
/// `x`'s type (the constant does not broadcast `x` up).
fn neutral(eg: &EG, id: Id, op: BinaryOp, value: f64, commutes: bool) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let pairs = find::binary(eg, id, op);
    // `find::binary` lists each node's operands in order, then swapped.
    pairs
        .iter()
        .enumerate()
        .filter(|(i, _)| commutes || i % 2 == 0)
        .filter(|(_, (x, c))| find::is_splat(eg, *c, value) && eg[*x].data.ty == *ty)
        .map(|(_, (x, _))| Term::Class(*x))
        .collect()
}

fn cast_identity(eg: &EG, id: Id) -> Vec<Term> {
    let dtype = eg[id].data.ty.dtype;
    find::unary(eg, id, |o| matches!(o, Op::Cast { .. }))
        .filter(|(_, x)| eg[*x].data.ty.dtype == dtype)
        .map(|(_, x)| Term::Class(x))
        .collect()
}

/// True when every value of `from` is exactly a value of `to`.
pub fn exact_cast(from: DType, to: DType) -> bool {
    use DType::*;
    from == to
        || matches!(
            (from, to),
            (F16 | BF16 | F8E4M3 | F8E5M2 | U8, F32)
                | (F8E4M3 | F8E5M2 | U8, F16 | BF16)
                | (I32 | U8, I64)
                | (U8, I32)
        )
}

fn cast_cast(eg: &EG, id: Id) -> Vec<Term> {
    let to = eg[id].data.ty.dtype;
    let mut out = vec![];
    for (_, a) in find::unary(eg, id, |o| matches!(o, Op::Cast { .. })) {
        for (_, x) in find::unary(eg, a, |o| matches!(o, Op::Cast { .. })) {
            let from = eg[x].data.ty.dtype;
            if !exact_cast(from, eg[a].data.ty.dtype) {
                continue;
            }
            out.push(if from == to {
                Term::Class(x)
            } else {
                Term::node(Op::Cast { to }, &[x])
            });
        }
    }
    out
}

/// True for a permutation that swaps the last two axes and keeps the rest.
fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2 && is_identity(&perm[..r - 2]) && perm[r - 2] == r - 1 && perm[r - 1] == r - 2
}

fn matmul_transpose(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for node in find::nodes(eg, id, |o| matches!(o, Op::MatMul { .. })) {
        let Op::MatMul {
            transpose_a,
            transpose_b,
        } = node.op
        else {
            continue;
        };
        let (a, b) = (node.children[0], node.children[1]);
        let swapped = |c| {
            find::unary(
                eg,
                c,
                |o| matches!(o, Op::Permute { perm } if swaps_last_two(perm)),
            )
        };
        for (_, y) in swapped(a) {
            let op = Op::MatMul {
                transpose_a: !transpose_a,
                transpose_b,
            };
            out.push(Term::node(op, &[y, b]));
        }
        for (_, y) in swapped(b) {
            let op = Op::MatMul {
                transpose_a,
                transpose_b: !transpose_b,
            };
            out.push(Term::node(op, &[a, y]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rules;
    use crate::rules::check::{ops, rewrite_same};
    use kiln_ir::trace::{Tensor, Tracer};
    use kiln_ir::{DType, Dim, Graph, Literal, Op};

    fn graph(build: impl FnOnce(&Tracer) -> Tensor) -> Graph {
        let t = Tracer::new();
        let y = build(&t);
        t.output("y", &y);
        t.finish().unwrap()
    }

    fn dims(d: &[usize]) -> Vec<Dim> {
        d.iter().map(|&n| Dim::from(n)).collect()
    }

    #[test]
    fn permute_permute_and_identity() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 3, 4]);
            let p = x.permute(&[1, 0, 2]).unwrap().permute(&[1, 0, 2]).unwrap();
            p.exp().unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["exp"]);
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 3, 4]);
            x.permute(&[1, 0, 2]).unwrap().permute(&[0, 2, 1]).unwrap()
        });
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["permute"]);
        assert_eq!(
            h.nodes()[1].op,
            Op::Permute {
                perm: vec![1, 2, 0]
            }
        );
        let g = graph(|t| {
            t.input("x", DType::F32, [2, 3])
                .permute(&[0, 1])
                .unwrap()
                .exp()
                .unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["exp"]);
    }

    #[test]
    fn reshape_chains_and_identity() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 6]);
            x.reshape(&dims(&[3, 4]))
                .unwrap()
                .reshape(&dims(&[12]))
                .unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["reshape"]);
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 6]);
            let r = x
                .reshape(&dims(&[12]))
                .unwrap()
                .reshape(&dims(&[2, 6]))
                .unwrap();
            r.exp().unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["exp"]);
    }

    #[test]
    fn expand_chains_identity_and_broadcast() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [3]);
            let e = x
                .expand(&dims(&[2, 3]))
                .unwrap()
                .expand(&dims(&[4, 2, 3]))
                .unwrap();
            e.expand(&dims(&[4, 2, 3])).unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["expand"]);
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 3]);
            let b = t.input("b", DType::F32, [3]);
            x.add(&b.expand(&dims(&[2, 3])).unwrap()).unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["add"]);
        // Here the expand makes the result larger than either operand: it stays.
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [1, 3]);
            let b = t.input("b", DType::F32, [3]);
            x.add(&b.expand(&dims(&[2, 3])).unwrap()).unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["expand", "add"]);
    }

    #[test]
    fn neutral_elements() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2, 3]);
            let (one, zero) = (t.scalar(DType::F32, 1.0), t.scalar(DType::F32, 0.0));
            let y = one.mul(&x.mul(&one).unwrap()).unwrap();
            let y = zero.add(&y.add(&zero).unwrap()).unwrap();
            let y = y.sub(&zero).unwrap().div(&one).unwrap();
            y.exp().unwrap()
        });
        assert_eq!(ops(&rewrite_same(&g, rules)), ["exp"]);
        // Ones of a larger shape broadcast `x` up; `0 - x` is not `x`.
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [3]);
            let ones = Literal::from_bytes(DType::F32, vec![2, 3], 1f32.to_le_bytes().repeat(6));
            let y = x.mul(&t.constant(ones.unwrap())).unwrap();
            t.scalar(DType::F32, 0.0).sub(&y).unwrap()
        });
        assert_eq!(
            ops(&rewrite_same(&g, rules)),
            ["const", "mul", "const", "sub"]
        );
    }

    #[test]
    fn constant_folding() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [2]);
            let c = t.scalar(DType::F32, 4.0).sqrt().unwrap();
            let c = c.add(&t.scalar(DType::F32, 3.0)).unwrap();
            x.mul(&c).unwrap()
        });
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["const", "mul"]);
        let Op::Const { value } = &h.nodes()[1].op else {
            panic!()
        };
        assert_eq!(value.values()[0].as_f64(), 5.0);
    }

    #[test]
    fn casts() {
        let g = graph(|t| {
            let x = t.input("x", DType::F32, [4]);
            let same = t.apply(Op::Cast { to: DType::F32 }, &[&x]).unwrap();
            let b = same.cast(DType::BF16).unwrap();
            b.cast(DType::F32)
                .unwrap()
                .cast(DType::F16)
                .unwrap()
                .cast(DType::F32)
                .unwrap()
        });
        // f32 -> bf16 rounds and f16 -> f32 is the output: both stay; bf16 -> f32 -> f16 folds.
        let h = rewrite_same(&g, rules);
        let casts: Vec<String> = h
            .nodes()
            .iter()
            .skip(1)
            .map(|n| format!("{:?}", n.op))
            .collect();
        assert_eq!(
            casts,
            ["Cast { to: BF16 }", "Cast { to: F16 }", "Cast { to: F32 }"]
        );
    }

    #[test]
    fn transposes_become_matmul_flags() {
        let g = graph(|t| {
            let a = t.input("a", DType::F32, [2, 5, 3]);
            let b = t.input("b", DType::F32, [4, 3]);
            let at = a.transpose(-1, -2).unwrap();
            at.transpose(-1, -2)
                .unwrap()
                .matmul(&b.transpose(0, 1).unwrap())
                .unwrap()
        });
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["matmul"]);
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        assert_eq!(h.nodes()[2].op, mm);
        let g = graph(|t| {
            let a = t.input("a", DType::F32, [3, 5, 2]);
            let b = t.input("b", DType::F32, [2, 4]);
            let a = a
                .transpose(-1, -2)
                .unwrap()
                .permute(&[0, 2, 1])
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            a.matmul(&b).unwrap()
        });
        // Only the swap of the last two axes folds into the flag.
        let h = rewrite_same(&g, rules);
        assert_eq!(ops(&h), ["permute", "matmul"]);
    }
}

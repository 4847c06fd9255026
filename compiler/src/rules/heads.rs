//! Attention head layouts in the kernels that produce them: a projection whose result is split
//! into heads (and rotated) becomes one `linear` op with a head epilogue, and attention whose
//! result is merged back into rows writes those rows itself. Runs after [`super::epilogue`]
//! ([`crate::pipeline::lowered_passes`]), so the projection may already carry fp8's scale or
//! a bias.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `linear-heads` | `permute(reshape(p, [.., s, h, d]), [0, .., r-1, r-2, r])` with `p = matmul(x, w)` or `linear(x, w, ..)` of shape `[.., s, h·d]` | `linear(x, w, ..) heads=h` |
//! | `linear-rotary` | `rotary(linear(..) heads=h, cos, sin)` | `linear(.., cos, sin) heads=h rotary=true` |
//! | `attention-merge-heads` | `reshape(permute(attention(..), [0, 2, 1, 3]), [b, s, h·d])` | `attention(..) merge_heads=true` |
//!
//! The matmul must not read `x` transposed; the reshape must split only the last axis, the
//! permute swap only the two axes before the last; and every intermediate value (the product,
//! the split heads, the unrotated heads, the attention result, its permute) must be read by
//! the next op of the chain alone and not be a graph output, so nothing is computed twice or
//! stored in a layout a reader other than the chain sees. The ops are defined as exactly these
//! chains, so the rewrites are exact.
//!
//! A permute a backend would run is a copy, so these rules remove real kernels: with them the
//! q, k and v projections of a Llama layer are one kernel each, and the attention output needs
//! no transpose before the output projection.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{Dim, Op};

/// The head-layout rules.
pub fn rules() -> Vec<Rewrite> {
    vec![
        FnRule::rewrite("linear-heads", linear_heads),
        FnRule::rewrite("linear-rotary", linear_rotary),
        FnRule::rewrite("attention-merge-heads", merge_heads),
    ]
}

/// The permutation of a rank-`r` tensor swapping the two axes before the last.
fn swap_before_last(r: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 3, r - 2);
    perm
}

/// A linear layer without heads so far, as the `linear` op with heads added: a matmul not
/// reading `x` transposed, or a `linear` op without heads.
fn with_heads(op: &Op, h: usize) -> Option<Op> {
    let (transpose_b, scaled, added) = match *op {
        Op::MatMul {
            transpose_a: false,
            transpose_b,
        } => (transpose_b, false, false),
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads: 0,
            ..
        } => (transpose_b, scaled, added),
        _ => return None,
    };
    Some(Op::Linear {
        transpose_b,
        scaled,
        added,
        heads: h,
        rotary: false,
    })
}

fn linear_heads(eg: &EG, id: Id) -> Vec<Term> {
    let r = eg[id].data.ty.rank();
    if r < 3 {
        return vec![];
    }
    let perm = swap_before_last(r);
    let mut out = vec![];
    let permutes = find::unary(
        eg,
        id,
        |o| matches!(o, Op::Permute { perm: p } if *p == perm),
    );
    for (_, split) in permutes {
        if !find::only_read_by(eg, split, id) {
            continue;
        }
        for (op, p) in find::unary(eg, split, |o| matches!(o, Op::Reshape { .. })) {
            let Op::Reshape { shape } = op else { continue };
            let py = &eg[p].data.ty.shape;
            // Only the last axis split, into fixed heads of a fixed size.
            let (Some(h), Some(d)) = (shape[r - 2].as_fixed(), shape[r - 1].as_fixed()) else {
                continue;
            };
            let splits_last = py.len() == r - 1
                && shape[..r - 2] == py[..r - 2]
                && py[r - 2] == Dim::fixed(h * d)
                && h > 0;
            if !splits_last || !find::only_read_by(eg, p, split) {
                continue;
            }
            let h = usize::try_from(h).unwrap_or(0);
            for node in &eg[p].nodes {
                if let Some(op) = with_heads(&node.op, h) {
                    let term = Term::node(op, &node.children);
                    if !out.contains(&term) {
                        out.push(term);
                    }
                }
            }
        }
    }
    out
}

fn linear_rotary(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| *o == Op::Rotary) {
        let (x, cos, sin) = (n.children[0], n.children[1], n.children[2]);
        if eg[x].data.ty != eg[id].data.ty || !find::only_read_by(eg, x, id) {
            continue;
        }
        for node in &eg[x].nodes {
            let Op::Linear {
                transpose_b,
                scaled,
                added,
                heads: heads @ 1..,
                rotary: false,
            } = node.op
            else {
                continue;
            };
            let op = Op::Linear {
                transpose_b,
                scaled,
                added,
                heads,
                rotary: true,
            };
            let mut operands = node.children.clone();
            operands.extend([cos, sin]);
            let term = Term::node(op, &operands);
            if !out.contains(&term) {
                out.push(term);
            }
        }
    }
    out
}

fn merge_heads(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let mut out = vec![];
    for (op, rows) in find::unary(eg, id, |o| matches!(o, Op::Reshape { .. })) {
        let Op::Reshape { shape } = op else { continue };
        if !find::only_read_by(eg, rows, id) {
            continue;
        }
        let bshd = find::unary(
            eg,
            rows,
            |o| matches!(o, Op::Permute { perm } if *perm == [0, 2, 1, 3]),
        );
        for (_, o) in bshd {
            let os = &eg[o].data.ty.shape;
            let merged = os.len() == 4
                && *shape == [os[0].clone(), os[2].clone(), &os[1] * &os[3]]
                && ty.dtype == eg[o].data.ty.dtype;
            if !merged || !find::only_read_by(eg, o, rows) {
                continue;
            }
            for node in &eg[o].nodes {
                let Op::Attention {
                    scale,
                    causal,
                    window,
                    merge_heads: false,
                } = node.op
                else {
                    continue;
                };
                let op = Op::Attention {
                    scale,
                    causal,
                    window,
                    merge_heads: true,
                };
                let term = Term::node(op, &node.children);
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
    use crate::rules::check::{ops, rewrite_exact};
    use kiln_ir::trace::{Tensor, Tracer};
    use kiln_ir::{DType, Dim, Graph, Op, F64};

    fn dims(shape: &[i64]) -> Vec<Dim> {
        shape.iter().map(|&n| Dim::fixed(n)).collect()
    }

    /// `x [2, 3, 8] · wᵀ` (`w [8, 8]`), then `tail` of the product and the tracer.
    fn projection(tail: impl Fn(&Tracer, &Tensor) -> Vec<(&'static str, Tensor)>) -> Graph {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let w = t.param("w", DType::F32, [8, 8]);
        let y = x.matmul_t(&w, false, true).unwrap();
        for (name, v) in tail(&t, &y) {
            t.output(name, &v);
        }
        t.finish().unwrap()
    }

    /// `y [2, 3, 8]` as 2 heads `[2, 2, 3, 4]`.
    fn heads(y: &Tensor) -> Tensor {
        let split = y.reshape(&dims(&[2, 3, 2, 4])).unwrap();
        split.permute(&[0, 2, 1, 3]).unwrap()
    }

    /// `rotary(h, cos, sin)` with tables `[2, 1, 3, 4]`.
    fn rotate(t: &Tracer, h: &Tensor) -> Tensor {
        let cos = t.input("cos", DType::F32, [2, 1, 3, 4]);
        let sin = t.input("sin", DType::F32, [2, 1, 3, 4]);
        t.apply(Op::Rotary, &[h, &cos, &sin]).unwrap()
    }

    /// The `(heads, rotary)` of `g`'s `linear` ops.
    fn linears(g: &Graph) -> Vec<(usize, bool)> {
        g.nodes()
            .iter()
            .filter_map(|n| match n.op {
                Op::Linear { heads, rotary, .. } => Some((heads, rotary)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn heads_and_rope_become_one_linear_op() {
        let g = projection(|t, y| vec![("q", rotate(t, &heads(y)))]);
        let h = rewrite_exact(&g, rules);
        assert_eq!((ops(&h), linears(&h)), (vec!["linear"], vec![(2, true)]));
        let g = projection(|_, y| vec![("v", heads(y))]);
        let h = rewrite_exact(&g, rules);
        assert_eq!((ops(&h), linears(&h)), (vec!["linear"], vec![(2, false)]));
        // A projection with its bias epilogue already fused.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let w = t.param("w", DType::F32, [8, 8]);
        let b = t.param("b", DType::F32, [8]);
        let biased = Op::Linear {
            transpose_b: true,
            scaled: false,
            added: true,
            heads: 0,
            rotary: false,
        };
        let y = t.apply(biased, &[&x, &w, &b]).unwrap();
        t.output("k", &rotate(&t, &heads(&y)));
        let h = rewrite_exact(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["linear"]);
        assert!(
            matches!(
                h.nodes().last().unwrap().op,
                Op::Linear {
                    added: true,
                    heads: 2,
                    rotary: true,
                    ..
                }
            ),
            "{h}"
        );
    }

    #[test]
    fn near_misses_keep_their_layout_ops() {
        // The product read twice, or a graph output: nothing fused.
        let g = projection(|_, y| vec![("v", heads(y)), ("e", y.exp().unwrap())]);
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        let g = projection(|_, y| vec![("v", heads(y)), ("y", y.clone())]);
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        // The split heads also an output.
        let g = projection(|_, y| {
            let split = y.reshape(&dims(&[2, 3, 2, 4])).unwrap();
            vec![("v", split.permute(&[0, 2, 1, 3]).unwrap()), ("s", split)]
        });
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        // The unrotated heads read by something else too: heads fused, the rotation not.
        let g = projection(|t, y| {
            let h = heads(y);
            vec![("q", rotate(t, &h)), ("h", h)]
        });
        let h = rewrite_exact(&g, rules);
        assert_eq!(
            (ops(&h), linears(&h)),
            (vec!["linear", "rotary"], vec![(2, false)])
        );
        // Another permutation of the split.
        let g = projection(|_, y| {
            let split = y.reshape(&dims(&[2, 3, 2, 4])).unwrap();
            vec![("v", split.permute(&[0, 2, 3, 1]).unwrap())]
        });
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        // A reshape splitting the rows, not the columns.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 6, 8]);
        let w = t.param("w", DType::F32, [8, 8]);
        let y = x.matmul_t(&w, false, true).unwrap();
        let split = y.reshape(&dims(&[2, 3, 2, 8])).unwrap();
        t.output("v", &split.permute(&[0, 2, 1, 3]).unwrap());
        assert!(linears(&rewrite_exact(&t.finish().unwrap(), rules)).is_empty());
        // x read transposed.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 8, 3]);
        let w = t.param("w", DType::F32, [8, 8]);
        t.output("v", &heads(&x.matmul_t(&w, true, true).unwrap()));
        assert_eq!(
            ops(&rewrite_exact(&t.finish().unwrap(), rules)),
            ["matmul", "reshape", "permute"]
        );
    }

    /// Attention over q `[2, 4, 3, 4]` and k, v `[2, 2, 3, 4]`, then `tail` of its result.
    fn attention(tail: impl Fn(&Tensor) -> Vec<(&'static str, Tensor)>) -> Graph {
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 4, 3, 4]);
        let k = t.input("k", DType::F32, [2, 2, 3, 4]);
        let v = t.input("v", DType::F32, [2, 2, 3, 4]);
        let op = Op::Attention {
            scale: F64(0.5),
            causal: true,
            window: 0,
            merge_heads: false,
        };
        let o = t.apply(op, &[&q, &k, &v]).unwrap();
        for (name, v) in tail(&o) {
            t.output(name, &v);
        }
        t.finish().unwrap()
    }

    fn merged(g: &Graph) -> usize {
        let merged = |op: &Op| {
            matches!(
                op,
                Op::Attention {
                    merge_heads: true,
                    ..
                }
            )
        };
        g.nodes().iter().filter(|n| merged(&n.op)).count()
    }

    #[test]
    fn attention_writes_merged_heads() {
        let rows = |o: &Tensor, perm: &[usize], shape: &[i64]| {
            let p = o.permute(perm).unwrap();
            (p.reshape(&dims(shape)).unwrap(), p)
        };
        let g = attention(|o| vec![("y", rows(o, &[0, 2, 1, 3], &[2, 3, 16]).0)]);
        let h = rewrite_exact(&g, rules);
        assert_eq!((ops(&h), merged(&h)), (vec!["attention"], 1));
        // Near misses: the result or its permute read again, another permutation, another
        // reshape.
        let g = attention(|o| {
            vec![
                ("y", rows(o, &[0, 2, 1, 3], &[2, 3, 16]).0),
                ("o", o.clone()),
            ]
        });
        assert_eq!(merged(&rewrite_exact(&g, rules)), 0);
        let g = attention(|o| {
            let (y, p) = rows(o, &[0, 2, 1, 3], &[2, 3, 16]);
            vec![("y", y), ("p", p)]
        });
        assert_eq!(merged(&rewrite_exact(&g, rules)), 0);
        let g = attention(|o| vec![("y", rows(o, &[0, 1, 3, 2], &[2, 4, 12]).0)]);
        assert_eq!(merged(&rewrite_exact(&g, rules)), 0);
        let g = attention(|o| vec![("y", rows(o, &[0, 2, 1, 3], &[6, 16]).0)]);
        assert_eq!(merged(&rewrite_exact(&g, rules)), 0);
        // With as many heads as rows and head size, another permutation gives the rows' shape.
        let t = Tracer::new();
        let q = t.input("q", DType::F32, [2, 3, 3, 3]);
        let kv = t.input("kv", DType::F32, [2, 1, 3, 3]);
        let op = Op::Attention {
            scale: F64(0.5),
            causal: false,
            window: 0,
            merge_heads: false,
        };
        let o = t.apply(op, &[&q, &kv, &kv]).unwrap();
        t.output("y", &rows(&o, &[0, 2, 3, 1], &[2, 3, 9]).0);
        assert_eq!(merged(&rewrite_exact(&t.finish().unwrap(), rules)), 0);
    }
}

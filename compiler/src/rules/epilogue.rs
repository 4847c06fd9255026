//! Matmul epilogues: a product by a weight followed by a per-column scale and a residual or
//! bias add becomes the IR's composite `linear` op, which backends compute in the GEMM's output
//! stage (one kernel, the product never stored on its own). Runs after precision lowering
//! ([`crate::pipeline::lowered_passes`]), which creates fp8's scale products.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `linear-epilogue` | `matmul(x, w) * s` | `linear(x, w, s) scaled` |
//! | | `matmul(x, w) + r`, `(matmul(x, w) * s) + r` | `linear(x, w, [s,] r) added` |
//!
//! Products and sums match in either operand order. The matmul must not read `x` transposed;
//! `s` must have shape `[n]` (`n` the product's last axis: it varies along the columns only)
//! and `r` the product's shape or `[n]`, so the result has the product's type; and every
//! intermediate value (the product, the scaled product) must be read by the next op of the
//! chain alone and not be a graph output, so nothing is computed twice. The composite is
//! defined as exactly these primitive ops, so the rewrite is exact.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{BinaryOp, Op};

/// The epilogue rule.
pub fn rules() -> Vec<Rewrite> {
    vec![FnRule::rewrite("linear-epilogue", epilogue)]
}

/// A node that is a linear layer so far: `(transpose_b, scaled, added)` of a `linear` op, or
/// of a matmul not reading `x` transposed (no epilogue).
fn as_linear(op: &Op) -> Option<(bool, bool, bool)> {
    match *op {
        Op::MatMul {
            transpose_a: false,
            transpose_b,
        } => Some((transpose_b, false, false)),
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads: 0,
            ..
        } => Some((transpose_b, scaled, added)),
        _ => None,
    }
}

fn epilogue(eg: &EG, id: Id) -> Vec<Term> {
    let ty = &eg[id].data.ty;
    let Some(n) = ty.shape.last() else {
        return vec![];
    };
    let column = std::slice::from_ref(n);
    let mut out = vec![];
    for op in [BinaryOp::Mul, BinaryOp::Add] {
        for (y, other) in find::binary(eg, id, op) {
            let shape = eg[other].data.ty.shape.as_slice();
            let fits = match op {
                BinaryOp::Mul => shape == column,
                _ => shape == column || shape == ty.shape.as_slice(),
            };
            if !fits || eg[y].data.ty != *ty || !find::only_read_by(eg, y, id) {
                continue;
            }
            for node in &eg[y].nodes {
                let Some((transpose_b, scaled, added)) = as_linear(&node.op) else {
                    continue;
                };
                let scaled = match op {
                    BinaryOp::Mul if !scaled && !added => true,
                    BinaryOp::Add if !added => scaled,
                    _ => continue,
                };
                let linear = Op::Linear {
                    transpose_b,
                    scaled,
                    added: op == BinaryOp::Add,
                    heads: 0,
                    rotary: false,
                };
                let mut operands = node.children.clone();
                operands.push(other);
                let term = Term::node(linear, &operands);
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
    use kiln_ir::{DType, Dim, Graph, Op};

    /// `x [2, 3, 8]` times the weight `w [6, 8]` (`x · wᵀ`), then `epilogue` of the product.
    fn layer(epilogue: impl Fn(&Tracer, &Tensor) -> Vec<(&'static str, Tensor)>) -> Graph {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let w = t.param("w", DType::F32, [6, 8]);
        let y = x.matmul_t(&w, false, true).unwrap();
        for (name, v) in epilogue(&t, &y) {
            t.output(name, &v);
        }
        t.finish().unwrap()
    }

    /// The `linear` ops of `g` as `(scaled, added)`.
    fn linears(g: &Graph) -> Vec<(bool, bool)> {
        g.nodes()
            .iter()
            .filter_map(|n| match n.op {
                Op::Linear { scaled, added, .. } => Some((scaled, added)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn scale_and_residual_become_one_linear_op() {
        // fp8's form: the scale parameter reshaped to [n], then the residual.
        let g = layer(|t, y| {
            let s = t
                .param("w.scale", DType::F32, [6, 1])
                .reshape(&[Dim::fixed(6)])
                .unwrap();
            let r = t.input("r", DType::F32, [2, 3, 6]);
            vec![("y", y.mul(&s).unwrap().add(&r).unwrap())]
        });
        let h = rewrite_exact(&g, rules);
        assert_eq!(ops(&h), ["reshape", "linear"]);
        assert_eq!(linears(&h), [(true, true)]);
    }

    #[test]
    fn operand_orders_a_bias_and_a_scale_alone_match() {
        let bias = layer(|t, y| {
            let b = t.param("b", DType::F32, [6]);
            vec![("y", b.add(y).unwrap())]
        });
        assert_eq!(linears(&rewrite_exact(&bias, rules)), [(false, true)]);
        let scaled = layer(|t, y| {
            let s = t.input("s", DType::F32, [6]);
            vec![("y", s.mul(y).unwrap())]
        });
        assert_eq!(linears(&rewrite_exact(&scaled, rules)), [(true, false)]);
        // Residual first, scale second in their products.
        let both = layer(|t, y| {
            let (s, r) = (
                t.input("s", DType::F32, [6]),
                t.input("r", DType::F32, [2, 3, 6]),
            );
            vec![("y", r.add(&s.mul(y).unwrap()).unwrap())]
        });
        assert_eq!(linears(&rewrite_exact(&both, rules)), [(true, true)]);
        // x · w, the weight [8, 6] not transposed.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [3, 8]);
        let w = t.param("w", DType::F32, [8, 6]);
        let b = t.param("b", DType::F32, [6]);
        t.output("y", &x.matmul(&w).unwrap().add(&b).unwrap());
        let h = rewrite_exact(&t.finish().unwrap(), rules);
        let plain = Op::Linear {
            transpose_b: false,
            scaled: false,
            added: true,
            heads: 0,
            rotary: false,
        };
        assert!(h.nodes().iter().any(|n| n.op == plain), "{h}");
    }

    #[test]
    fn near_misses_do_not_match() {
        // A scale varying along the rows too, or per row.
        for shape in [[3, 6], [3, 1]] {
            let g = layer(|t, y| {
                let s = t.input("s", DType::F32, shape.to_vec());
                vec![("y", y.mul(&s).unwrap())]
            });
            assert!(linears(&rewrite_exact(&g, rules)).is_empty(), "{shape:?}");
        }
        // An addend that broadcasts the product to a larger shape.
        let g = layer(|t, y| {
            let r = t.input("r", DType::F32, [4, 2, 3, 6]);
            vec![("y", y.add(&r).unwrap())]
        });
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        // The product read twice, or also a graph output: never computed twice.
        let g = layer(|t, y| {
            let r = t.input("r", DType::F32, [2, 3, 6]);
            vec![("y", y.add(&r).unwrap()), ("z", y.exp().unwrap())]
        });
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        let g = layer(|t, y| {
            let r = t.input("r", DType::F32, [2, 3, 6]);
            vec![("y", y.add(&r).unwrap()), ("product", y.clone())]
        });
        assert!(linears(&rewrite_exact(&g, rules)).is_empty());
        // The scaled product read twice: the scale is fused, the adds stay.
        let g = layer(|t, y| {
            let s = t.input("s", DType::F32, [6]);
            let r = t.input("r", DType::F32, [2, 3, 6]);
            let scaled = y.mul(&s).unwrap();
            let twice = scaled.add(&r).unwrap().add(&scaled).unwrap();
            vec![("y", twice)]
        });
        let h = rewrite_exact(&g, rules);
        assert_eq!(linears(&h), [(true, false)]);
        assert_eq!(ops(&h), ["linear", "add", "add"]);
        // A residual added before the scale: not the op's order.
        let g = layer(|t, y| {
            let s = t.input("s", DType::F32, [6]);
            let r = t.input("r", DType::F32, [2, 3, 6]);
            vec![("y", y.add(&r).unwrap().mul(&s).unwrap())]
        });
        assert_eq!(linears(&rewrite_exact(&g, rules)), [(false, true)]);
        // x read transposed.
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [8, 3]);
        let w = t.param("w", DType::F32, [6, 8]);
        let b = t.param("b", DType::F32, [6]);
        t.output("y", &x.matmul_t(&w, true, true).unwrap().add(&b).unwrap());
        let h = rewrite_exact(&t.finish().unwrap(), rules);
        assert_eq!(ops(&h), ["matmul", "add"]);
    }
}

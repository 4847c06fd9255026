//! Gated MLPs as one kernel: the SwiGLU `silu(x·Gᵀ) * (x·Uᵀ)` of two projections of one
//! activation becomes the IR's `swiglu` op, which backends compute as two GEMMs sharing their
//! reads of `x` with the activation in their output stage (neither projection stored). Runs
//! after [`super::epilogue`] ([`crate::pipeline::lowered_passes`]), so each projection may
//! carry fp8's per-column scale.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `swiglu` | `fused_elementwise(g, u) body="(mul (silu $0) $1)"` (either operand gated, the product either way round), or `mul(silu(g), u)`, with `g = matmul(x, G)` or `linear(x, G, s_g)` and `u` the same over `U` | `swiglu(x, G, U[, s_g, s_u])` |
//!
//! Both projections must read the same `x` (not transposed), their weights with the same
//! `transpose_b`, both scaled or neither, with no addend or heads; `g` and `u` must be
//! different values (a body gating its one operand, or `silu(g) * g`, whose `g` has two
//! readers, does not match), each read by the gate alone (and the `silu` of the primitive form
//! by the product alone), none a graph output. The op is defined as exactly this chain (a
//! `fused_elementwise` computes each node as its primitive op), so the rewrite is exact.

use crate::egraph::{find, FnRule, Rewrite, Term, EG};
use egg::Id;
use kiln_ir::{BinaryOp, Expr, Op, UnaryOp};

/// The SwiGLU rule.
pub fn rules() -> Vec<Rewrite> {
    vec![FnRule::rewrite("swiglu", swiglu)]
}

/// The operands `(g, u)` of a body `silu($g) * $u` or `$u * silu($g)` (a product of floats
/// is the same either way round).
fn gated(body: &Expr) -> Option<(usize, usize)> {
    let Expr::Binary(BinaryOp::Mul, a, b) = body else {
        return None;
    };
    let silu_of = |e: &Expr| match e {
        Expr::Unary(UnaryOp::Silu, x) => match **x {
            Expr::Arg(g) => Some(g),
            _ => None,
        },
        _ => None,
    };
    let arg = |e: &Expr| match *e {
        Expr::Arg(u) => Some(u),
        _ => None,
    };
    let pair = |s: &Expr, u: &Expr| Some((silu_of(s)?, arg(u)?));
    pair(a, b).or_else(|| pair(b, a)).filter(|(g, u)| g != u)
}

/// The pairs `(g, u)` the class computes `silu(g) * u` of, each with the class that reads `g`
/// (the class itself, or the primitive form's `silu`).
fn gates(eg: &EG, id: Id) -> Vec<(Id, Id, Id)> {
    let mut out = vec![];
    for n in find::nodes(eg, id, |o| matches!(o, Op::FusedElementwise { .. })) {
        let Op::FusedElementwise { body } = &n.op else {
            continue;
        };
        let (a, b) = match n.children[..] {
            [a, b] => (eg.find(a), eg.find(b)),
            _ => continue,
        };
        match gated(body) {
            Some((0, 1)) => out.push((a, b, id)),
            Some((1, 0)) => out.push((b, a, id)),
            _ => {}
        }
    }
    for (s, u) in find::binary(eg, id, BinaryOp::Mul) {
        if !find::only_read_by(eg, s, id) {
            continue;
        }
        for (_, g) in find::unary(eg, s, |o| *o == Op::Unary(UnaryOp::Silu)) {
            out.push((g, u, s));
        }
    }
    out
}

/// A projection without epilogue: `(x, w, scale, transpose_b)` of a matmul not reading `x`
/// transposed, or of a `linear` op with at most a scale.
fn projections(eg: &EG, id: Id) -> Vec<(Id, Id, Option<Id>, bool)> {
    let mut out = vec![];
    for n in &eg[id].nodes {
        let c = |i: usize| eg.find(n.children[i]);
        match n.op {
            Op::MatMul {
                transpose_a: false,
                transpose_b,
            } => out.push((c(0), c(1), None, transpose_b)),
            Op::Linear {
                transpose_b,
                scaled,
                added: false,
                heads: 0,
                rotary: false,
            } => out.push((c(0), c(1), scaled.then(|| c(2)), transpose_b)),
            _ => {}
        }
    }
    out
}

fn swiglu(eg: &EG, id: Id) -> Vec<Term> {
    let mut out = vec![];
    for (g, u, reader) in gates(eg, id) {
        if !find::only_read_by(eg, g, reader) || !find::only_read_by(eg, u, id) {
            continue;
        }
        for (x, wg, sg, tg) in projections(eg, g) {
            for (xu, wu, su, tu) in projections(eg, u) {
                if x != xu || tg != tu || sg.is_some() != su.is_some() {
                    continue;
                }
                let op = Op::SwiGlu {
                    transpose_b: tg,
                    scaled: sg.is_some(),
                };
                let mut operands = vec![x, wg, wu];
                operands.extend(sg.into_iter().chain(su));
                let term = Term::node(op, &operands);
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
    use crate::rules::fuse;
    use kiln_ir::trace::{Tensor, Tracer};
    use kiln_ir::{DType, Graph, Op};

    /// `g` through the `fuse` pass and then these rules, as the pipeline runs them (the gate
    /// a fused body), each step checked bit for bit.
    fn fused_then_gated(g: &Graph) -> Graph {
        rewrite_exact(&rewrite_exact(g, fuse::rules), rules)
    }

    /// `x [2, 3, 8]` with gate and up weights `[6, 8]` (read transposed), then `mlp` of the
    /// activation and the weights.
    fn mlp(
        body: impl Fn(&Tracer, &Tensor, &Tensor, &Tensor) -> Vec<(&'static str, Tensor)>,
    ) -> Graph {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 8]);
        let gate = t.param("gate", DType::F32, [6, 8]);
        let up = t.param("up", DType::F32, [6, 8]);
        for (name, v) in body(&t, &x, &gate, &up) {
            t.output(name, &v);
        }
        t.finish().unwrap()
    }

    fn proj(x: &Tensor, w: &Tensor) -> Tensor {
        x.matmul_t(w, false, true).unwrap()
    }

    fn swiglus(g: &Graph) -> Vec<bool> {
        g.nodes()
            .iter()
            .filter_map(|n| match n.op {
                Op::SwiGlu { scaled, .. } => Some(scaled),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn gate_and_up_become_one_swiglu_op() {
        let gated = |x: &Tensor, g: &Tensor, u: &Tensor| {
            proj(x, g).silu().unwrap().mul(&proj(x, u)).unwrap()
        };
        let g = mlp(|_, x, g, u| vec![("y", gated(x, g, u))]);
        assert_eq!(ops(&rewrite_exact(&g, rules)), ["swiglu"]);
        assert_eq!(ops(&fused_then_gated(&g)), ["swiglu"]);
        // Up first in the product.
        let g = mlp(|_, x, g, u| vec![("y", proj(x, u).mul(&proj(x, g).silu().unwrap()).unwrap())]);
        let h = fused_then_gated(&g);
        assert_eq!((ops(&h), swiglus(&h)), (vec!["swiglu"], vec![false]));
        // fp8's form: both projections scaled per column.
        let g = mlp(|t, x, g, u| {
            let scaled = |w: &Tensor, name: &str| {
                let s = t.param(name, DType::F32, [6]);
                let op = Op::Linear {
                    transpose_b: true,
                    scaled: true,
                    added: false,
                    heads: 0,
                    rotary: false,
                };
                t.apply(op, &[x, w, &s]).unwrap()
            };
            let y = scaled(g, "gs")
                .silu()
                .unwrap()
                .mul(&scaled(u, "us"))
                .unwrap();
            vec![("y", y)]
        });
        let h = fused_then_gated(&g);
        assert_eq!((ops(&h), swiglus(&h)), (vec!["swiglu"], vec![true]));
    }

    #[test]
    fn near_misses_stay_apart() {
        // The gate projection, its silu or the up projection read again, or a graph output.
        let g = mlp(|_, x, g, u| {
            let gp = proj(x, g);
            vec![
                ("y", gp.silu().unwrap().mul(&proj(x, u)).unwrap()),
                ("g", gp),
            ]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        let g = mlp(|_, x, g, u| {
            let s = proj(x, g).silu().unwrap();
            vec![("y", s.mul(&proj(x, u)).unwrap()), ("s", s)]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        assert!(swiglus(&rewrite_exact(&g, rules)).is_empty());
        let g = mlp(|_, x, g, u| {
            let up = proj(x, u);
            vec![
                ("y", proj(x, g).silu().unwrap().mul(&up).unwrap()),
                ("u", up.exp().unwrap()),
            ]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        // Projections of different activations.
        let g = mlp(|t, x, g, u| {
            let x2 = t.input("x2", DType::F32, [2, 3, 8]);
            vec![("y", proj(x, g).silu().unwrap().mul(&proj(&x2, u)).unwrap())]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        // One projection's value gating itself.
        let g = mlp(|_, x, g, _| {
            let gp = proj(x, g);
            vec![("y", gp.silu().unwrap().mul(&gp).unwrap())]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        // Weights read in different orientations.
        let g = mlp(|t, x, g, _| {
            let up = t.param("up_t", DType::F32, [8, 6]);
            vec![(
                "y",
                proj(x, g)
                    .silu()
                    .unwrap()
                    .mul(&x.matmul(&up).unwrap())
                    .unwrap(),
            )]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        // The gate scaled, the up projection not.
        let g = mlp(|t, x, g, u| {
            let s = t.param("gs", DType::F32, [6]);
            let op = Op::Linear {
                transpose_b: true,
                scaled: true,
                added: false,
                heads: 0,
                rotary: false,
            };
            let gp = t.apply(op, &[x, g, &s]).unwrap();
            vec![("y", gp.silu().unwrap().mul(&proj(x, u)).unwrap())]
        });
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
        // Another activation: gelu is not SwiGLU.
        let g = mlp(|_, x, g, u| vec![("y", proj(x, g).gelu().unwrap().mul(&proj(x, u)).unwrap())]);
        assert!(swiglus(&fused_then_gated(&g)).is_empty());
    }
}

//! Composite ops written back as the ops that define them, for a backend without a kernel
//! for the composite. [`expand`] turns each chosen node into its definition, one level at a
//! time, expanding again every op of that definition that is chosen too:
//!
//! - `rotary` into the slices, negation, concat, products and sum of [`Op::Rotary`];
//! - `linear` with `heads` into the `linear` without them (a plain `matmul` when it has no
//!   epilogue either), the reshape and permute to heads, and `rotary` ([`Op::Linear`]);
//!   `linear` without heads into its matmul, scale product and sum;
//! - `attention` with `merge_heads` into `attention` without, the permute and the reshape
//!   ([`Op::Attention`]);
//! - `packed_linear` into its groups' `linear` ops and the `concat` of their heads
//!   ([`Op::PackedLinear`]); a `slice` selecting exactly one group ([`group_part`]) becomes
//!   that group's result, not a copy of the concatenation, and the `concat` is written only
//!   when something other than such parts reads the packed result;
//! - `swiglu` into its two linear layers (plain matmuls when unscaled) and the
//!   `fused_elementwise` `(mul (silu $0) $1)` of them ([`Op::SwiGlu`]; a `fused_elementwise`
//!   is exactly its primitive ops, so the expansion is too).
//!
//! So a backend that fuses those forms itself (the CPU plan) expands only the new layouts and
//! gates, and one that wants primitives (CUDA) chooses every composite it lacks.

use crate::{BinaryOp, Dim, Expr, Graph, Node, Op, OpError, TensorType, UnaryOp, ValueId};
use std::collections::{HashMap, HashSet};

/// When `v` is a `slice` of a [`Op::PackedLinear`] result selecting exactly the heads of one
/// of its groups (along the head axis, fixed bounds), the packed value and the group's index.
/// Such a part is the group's own projection: [`expand`] turns it into that projection's
/// result, so no backend copies it (a backend's plan is of the expanded graph).
pub fn group_part(g: &Graph, v: ValueId) -> Option<(ValueId, usize)> {
    let node = g.node(v)?;
    let Op::Slice { axis, start, end } = &node.op else {
        return None;
    };
    let packed = *node.inputs.first()?;
    let Op::PackedLinear { heads, .. } = &g.node(packed)?.op else {
        return None;
    };
    if *axis + 3 != g.ty(packed).rank() {
        return None;
    }
    let (start, end) = (start.as_fixed()?, end.as_fixed()?);
    let mut at = 0;
    for (i, &h) in heads.iter().enumerate() {
        let h = i64::try_from(h).ok()?;
        if (start, end) == (at, at + h) {
            return Some((packed, i));
        }
        at += h;
    }
    None
}

/// `g` with every node whose op satisfies `which` and is `rotary`, `linear`, `packed_linear`,
/// `swiglu` or `attention` with `merge_heads` replaced by its definition (whose own ops are expanded again
/// where `which` holds); other nodes are copied unchanged (values renumbered), outputs keep
/// their names. Fails only on a replaced node the verifier would reject, naming it.
pub fn expand(g: &Graph, which: impl Fn(&Op) -> bool) -> Result<Graph, (ValueId, OpError)> {
    let mut x = Expander {
        out: Graph::new(),
        which,
        groups: HashMap::new(),
    };
    let whole = read_whole(g);
    let mut remap: Vec<ValueId> = Vec::with_capacity(g.nodes().len());
    for (v, node) in g.iter() {
        let inputs: Vec<ValueId> = node.inputs.iter().map(|v| remap[v.index()]).collect();
        let part = group_part(g, v).and_then(|(p, i)| Some(*x.groups.get(&p)?.get(i)?));
        let id = match (part, x.expands(&node.op)) {
            (Some(group), _) => Ok(group),
            (None, true) if matches!(node.op, Op::PackedLinear { .. }) => {
                x.packed(v, &node.op, &inputs, whole.contains(&v))
            }
            (None, true) => x.add(node.op.clone(), &inputs),
            (None, false) => Ok(x.out.push(Node {
                op: node.op.clone(),
                inputs,
                ty: node.ty.clone(),
            })),
        };
        remap.push(id.map_err(|e| (v, e))?);
    }
    for o in g.outputs() {
        x.out.add_output(&o.name, remap[o.value.index()]);
    }
    Ok(x.out)
}

/// The `packed_linear` results of `g` read other than as a [`group_part`] (by another op or
/// as a graph output): their expansion needs the `concat` of the groups.
fn read_whole(g: &Graph) -> HashSet<ValueId> {
    let packed = |v: &ValueId| matches!(g.node(*v).map(|n| &n.op), Some(Op::PackedLinear { .. }));
    let mut whole: HashSet<ValueId> = g.outputs().iter().map(|o| o.value).filter(packed).collect();
    for (v, node) in g.iter() {
        if group_part(g, v).is_none() {
            whole.extend(node.inputs.iter().copied().filter(packed));
        }
    }
    whole
}

/// The graph being written, the choice of ops to expand, and the group results of each
/// expanded `packed_linear` (by its value in the source graph).
struct Expander<F> {
    out: Graph,
    which: F,
    groups: HashMap<ValueId, Vec<ValueId>>,
}

impl<F: Fn(&Op) -> bool> Expander<F> {
    /// True when `op` is chosen and has a definition here.
    fn expands(&self, op: &Op) -> bool {
        let composite = matches!(
            op,
            Op::Rotary
                | Op::Linear { .. }
                | Op::PackedLinear { .. }
                | Op::SwiGlu { .. }
                | Op::Attention {
                    merge_heads: true,
                    ..
                }
        );
        composite && (self.which)(op)
    }

    /// The packed projection `v` (`op` over `ins`) as its groups' `linear` ops (each expanded
    /// when chosen), remembered for its parts; with `whole`, also their `concat` along the
    /// head axis, which is then `v`'s result. Without, no reader needs that `concat`, and `v`
    /// stands for its first group, which only its parts (redirected to their groups) read.
    fn packed(
        &mut self,
        v: ValueId,
        op: &Op,
        ins: &[ValueId],
        whole: bool,
    ) -> Result<ValueId, OpError> {
        let tys: Vec<&TensorType> = ins.iter().map(|&v| self.out.ty(v)).collect();
        let ty = crate::infer(op, &tys).map_err(|reason| OpError {
            op: op.name().into(),
            operands: tys.iter().map(|t| t.to_string()).collect(),
            reason,
        })?;
        let groups = op.packed_groups(ins.len()).unwrap_or_default();
        let mut results = Vec::with_capacity(groups.len());
        for (linear, at) in groups {
            let operands: Vec<ValueId> = at.iter().map(|&i| ins[i]).collect();
            results.push(self.add(linear, &operands)?);
        }
        let first = results[0];
        self.groups.insert(v, results.clone());
        match whole {
            true => self.out.add(
                Op::Concat {
                    axis: ty.rank() - 3,
                },
                &results,
            ),
            false => Ok(first),
        }
    }

    /// `op(ins)`, expanded when chosen.
    fn add(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, OpError> {
        if !self.expands(&op) {
            return self.out.add(op, ins);
        }
        let error = |reason: String| OpError {
            op: op.name().into(),
            operands: vec![],
            reason,
        };
        let tys: Vec<&TensorType> = ins.iter().map(|&v| self.out.ty(v)).collect();
        let ty = crate::infer(&op, &tys).map_err(&error)?;
        match op {
            Op::Rotary => self.rotary(ins, &ty),
            Op::Linear {
                transpose_b,
                scaled,
                added,
                heads: 0,
                ..
            } => self.product(ins, transpose_b, scaled, added),
            Op::Linear {
                transpose_b,
                scaled,
                added,
                heads,
                rotary,
            } => {
                let (epilogue, _) = op.linear_arity().unwrap_or_default();
                let y = self.product(&ins[..epilogue], transpose_b, scaled, added)?;
                let heads = self.split_heads(y, heads)?;
                match rotary {
                    true => self.add(Op::Rotary, &[heads, ins[epilogue], ins[epilogue + 1]]),
                    false => Ok(heads),
                }
            }
            Op::Attention {
                scale,
                causal,
                window,
                ..
            } => {
                let heads = Op::Attention {
                    scale,
                    causal,
                    window,
                    merge_heads: false,
                };
                let o = self.add(heads, ins)?;
                let rows = self.add(
                    Op::Permute {
                        perm: vec![0, 2, 1, 3],
                    },
                    &[o],
                )?;
                self.add(Op::Reshape { shape: ty.shape }, &[rows])
            }
            Op::SwiGlu {
                transpose_b,
                scaled,
            } => {
                let layer = |j: usize| -> Vec<ValueId> {
                    let scale = scaled.then(|| ins[3 + j]);
                    [ins[0], ins[1 + j]].into_iter().chain(scale).collect()
                };
                let g = self.product(&layer(0), transpose_b, scaled, false)?;
                let u = self.product(&layer(1), transpose_b, scaled, false)?;
                let body = Expr::Binary(
                    BinaryOp::Mul,
                    Box::new(Expr::Unary(UnaryOp::Silu, Box::new(Expr::Arg(0)))),
                    Box::new(Expr::Arg(1)),
                );
                self.add(Op::FusedElementwise { body }, &[g, u])
            }
            _ => Err(error("has no definition to expand".into())),
        }
    }

    /// A linear layer without heads: the matmul alone when there is no epilogue, else the
    /// `linear` op, expanded when chosen into `matmul(x, w)`, then `* scale`, then `+ addend`.
    fn product(
        &mut self,
        ins: &[ValueId],
        transpose_b: bool,
        scaled: bool,
        added: bool,
    ) -> Result<ValueId, OpError> {
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b,
        };
        let linear = Op::Linear {
            transpose_b,
            scaled,
            added,
            heads: 0,
            rotary: false,
        };
        if (scaled || added) && !self.expands(&linear) {
            return self.out.add(linear, ins);
        }
        let arity = 2 + usize::from(scaled) + usize::from(added);
        if ins.len() != arity {
            return Err(OpError {
                op: "linear".into(),
                operands: vec![],
                reason: format!("needs {arity} operands, got {}", ins.len()),
            });
        }
        let mut y = self.out.add(mm, &ins[..2])?;
        if scaled {
            y = self.out.add(Op::Binary(BinaryOp::Mul), &[y, ins[2]])?;
        }
        if added {
            y = self
                .out
                .add(Op::Binary(BinaryOp::Add), &[y, ins[arity - 1]])?;
        }
        Ok(y)
    }

    /// `y[.., s, n]` reshaped to `[.., s, h, n/h]` and permuted to `[.., h, s, n/h]`.
    fn split_heads(&mut self, y: ValueId, heads: usize) -> Result<ValueId, OpError> {
        let ty = self.out.ty(y).clone();
        let r = ty.rank();
        let h = i64::try_from(heads).unwrap_or(i64::MAX);
        let d = ty.shape[r - 1].as_fixed().unwrap_or(0) / h.max(1);
        let mut shape = ty.shape[..r - 1].to_vec();
        shape.extend([Dim::fixed(h), Dim::fixed(d)]);
        let split = self.out.add(Op::Reshape { shape }, &[y])?;
        let mut perm: Vec<usize> = (0..=r).collect();
        perm.swap(r - 2, r - 1);
        self.out.add(Op::Permute { perm }, &[split])
    }

    /// `x * cos + concat(-x[.., h..d], x[.., 0..h]) * sin` over the last axis.
    fn rotary(&mut self, ins: &[ValueId], ty: &TensorType) -> Result<ValueId, OpError> {
        let error = |reason: &str| OpError {
            op: "rotary".into(),
            operands: vec![ty.to_string()],
            reason: reason.into(),
        };
        let &[x, cos, sin] = ins else {
            return Err(error("needs 3 operands"));
        };
        let axis = ty
            .rank()
            .checked_sub(1)
            .ok_or_else(|| error("needs rank >= 1"))?;
        let d = ty.shape[axis].clone();
        let half = d
            .div_exact(2)
            .ok_or_else(|| error("needs an even last axis"))?;
        let g = &mut self.out;
        let low = g.add(
            Op::Slice {
                axis,
                start: Dim::fixed(0),
                end: half.clone(),
            },
            &[x],
        )?;
        let high = g.add(
            Op::Slice {
                axis,
                start: half,
                end: d,
            },
            &[x],
        )?;
        let negated = g.add(Op::Unary(UnaryOp::Neg), &[high])?;
        let rotated = g.add(Op::Concat { axis }, &[negated, low])?;
        let a = g.add(Op::Binary(BinaryOp::Mul), &[x, cos])?;
        let b = g.add(Op::Binary(BinaryOp::Mul), &[rotated, sin])?;
        g.add(Op::Binary(BinaryOp::Add), &[a, b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{verify, DType};

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType {
            dtype: DType::F32,
            shape: shape.iter().map(|&n| Dim::fixed(n)).collect(),
        }
    }

    fn ops(g: &Graph) -> Vec<&'static str> {
        g.nodes().iter().map(|n| n.op.name()).collect()
    }

    #[test]
    fn rotary_becomes_its_definition() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3, 4]));
        let cos = g.input("cos", f32s(&[3, 4]));
        let sin = g.input("sin", f32s(&[2, 1, 4]));
        let y = g.add(Op::Rotary, &[x, cos, sin]).unwrap();
        g.add_output("y", y);
        let h = expand(&g, |_| true).unwrap();
        verify(&h).unwrap();
        assert_eq!(
            ops(&h),
            ["input", "input", "input", "slice", "slice", "neg", "concat", "mul", "mul", "add"]
        );
        assert_eq!(h.ty(h.outputs()[0].value), g.ty(y));
    }

    #[test]
    fn linear_becomes_its_definition_where_chosen() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3, 4]));
        let w = g.param("w", f32s(&[5, 4]));
        let s = g.param("s", f32s(&[5]));
        let r = g.input("r", f32s(&[2, 3, 5]));
        let linear = |scaled, added| Op::Linear {
            transpose_b: true,
            scaled,
            added,
            heads: 0,
            rotary: false,
        };
        let full = g.add(linear(true, true), &[x, w, s, r]).unwrap();
        let bias = g.add(linear(false, true), &[x, w, s]).unwrap();
        let plain = g.add(linear(false, false), &[x, w]).unwrap();
        for (name, v) in [("full", full), ("bias", bias), ("plain", plain)] {
            g.add_output(name, v);
        }
        verify(&g).unwrap();
        let h = expand(&g, |op| matches!(op, Op::Linear { .. })).unwrap();
        verify(&h).unwrap();
        assert_eq!(
            ops(&h)[4..],
            ["matmul", "mul", "add", "matmul", "add", "matmul"]
        );
        for (o, p) in h.outputs().iter().zip(g.outputs()) {
            assert_eq!((&o.name, h.ty(o.value)), (&p.name, g.ty(p.value)));
        }
        // Not chosen: copied as it is.
        assert_eq!(expand(&g, |_| false).unwrap(), g);
    }

    /// `packed_linear` of q (4 heads, rotated), k (2, rotated) and v (2) over `x [2, 3, 8]`,
    /// heads of size 2, and the slices `parts` of it (`(start, end)` along the head axis).
    fn packed(parts: &[(i64, i64)]) -> (Graph, ValueId, Vec<ValueId>) {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3, 8]));
        let wq = g.param("wq", f32s(&[8, 8]));
        let wk = g.param("wk", f32s(&[4, 8]));
        let wv = g.param("wv", f32s(&[4, 8]));
        let table = g.input("cos", f32s(&[2, 1, 3, 2]));
        let op = Op::PackedLinear {
            transpose_b: true,
            heads: vec![4, 2, 2],
            scaled: 0,
            added: false,
            rotary: 2,
        };
        let p = g.add(op, &[x, wq, wk, wv, table, table]).unwrap();
        let slices = parts
            .iter()
            .map(|&(start, end)| {
                let slice = Op::Slice {
                    axis: 1,
                    start: Dim::fixed(start),
                    end: Dim::fixed(end),
                };
                g.add(slice, &[p]).unwrap()
            })
            .collect();
        (g, p, slices)
    }

    #[test]
    fn packed_linear_parts_are_their_groups() {
        let (g, p, parts) = packed(&[(0, 4), (4, 6), (6, 8), (5, 7), (0, 8)]);
        assert_eq!(g.ty(p), &f32s(&[2, 8, 3, 2]));
        let found: Vec<_> = parts.iter().map(|&v| group_part(&g, v)).collect();
        assert_eq!(
            found,
            [Some((p, 0)), Some((p, 1)), Some((p, 2)), None, None]
        );
        let (mut g, _, parts) = packed(&[(0, 4), (4, 6), (6, 8)]);
        for (i, &v) in parts.iter().enumerate() {
            g.add_output(&format!("part{i}"), v);
        }
        verify(&g).unwrap();
        // Parts only: three linears, no concat, each output the group's own result.
        let h = expand(&g, |op| matches!(op, Op::PackedLinear { .. })).unwrap();
        verify(&h).unwrap();
        assert_eq!(ops(&h)[5..], ["linear", "linear", "linear"]);
        let linears: Vec<ValueId> = h
            .iter()
            .filter(|(_, n)| matches!(n.op, Op::Linear { .. }))
            .map(|(v, _)| v)
            .collect();
        let outs: Vec<ValueId> = h.outputs().iter().map(|o| o.value).collect();
        assert_eq!(outs, linears);
        // A slice that is not one group, or the packed value read whole: the concat is written.
        let (mut g, _, parts) = packed(&[(0, 4), (4, 6), (6, 8), (5, 7)]);
        for (i, &v) in parts.iter().enumerate() {
            g.add_output(&format!("part{i}"), v);
        }
        let h = expand(&g, |op| matches!(op, Op::PackedLinear { .. })).unwrap();
        verify(&h).unwrap();
        assert_eq!(
            ops(&h)[5..],
            ["linear", "linear", "linear", "concat", "slice"]
        );
        let (mut g, p, _) = packed(&[]);
        g.add_output("p", p);
        let h = expand(&g, |_| true).unwrap();
        verify(&h).unwrap();
        assert!(ops(&h).contains(&"concat") && !ops(&h).contains(&"linear"));
        assert_eq!(h.ty(h.outputs()[0].value), g.ty(p));
    }

    #[test]
    fn layouts_and_gates_expand_one_level_where_chosen() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3, 8]));
        let w = g.param("w", f32s(&[8, 8]));
        let b = g.param("b", f32s(&[8]));
        let table = g.input("cos", f32s(&[2, 1, 3, 4]));
        let q = Op::Linear {
            transpose_b: true,
            scaled: false,
            added: true,
            heads: 2,
            rotary: true,
        };
        let q = g.add(q, &[x, w, b, table, table]).unwrap();
        let v = Op::Linear {
            transpose_b: true,
            scaled: false,
            added: false,
            heads: 2,
            rotary: false,
        };
        let v = g.add(v, &[x, w]).unwrap();
        let attention = |merge_heads| Op::Attention {
            scale: crate::F64(0.5),
            causal: true,
            window: 0,
            merge_heads,
        };
        let o = g.add(attention(true), &[q, v, v]).unwrap();
        let up = g.param("up", f32s(&[8, 8]));
        let swiglu = Op::SwiGlu {
            transpose_b: true,
            scaled: false,
        };
        let y = g.add(swiglu, &[o, w, up]).unwrap();
        g.add_output("y", y);
        verify(&g).unwrap();
        // The CPU backend's choice: the new forms only, one level.
        let fused = |op: &Op| {
            matches!(
                op,
                Op::Linear { heads: 1.., .. }
                    | Op::SwiGlu { .. }
                    | Op::Attention {
                        merge_heads: true,
                        ..
                    }
            )
        };
        let h = expand(&g, fused).unwrap();
        verify(&h).unwrap();
        assert_eq!(
            ops(&h)[4..],
            [
                "linear",
                "reshape",
                "permute",
                "rotary",
                "matmul",
                "reshape",
                "permute",
                "attention",
                "permute",
                "reshape",
                "param",
                "matmul",
                "matmul",
                "fused_elementwise"
            ]
        );
        assert_eq!(h.ty(h.outputs()[0].value), g.ty(y));
        // Everything: primitive ops and the elementwise body.
        let h = expand(&g, |_| true).unwrap();
        verify(&h).unwrap();
        assert!(ops(&h)
            .iter()
            .all(|&n| !["linear", "rotary", "swiglu"].contains(&n)));
        assert_eq!(h.ty(h.outputs()[0].value), g.ty(y));
    }
}

//! Composite ops written back as the primitive ops that define them, for a backend without a
//! kernel for the composite: [`expand`] turns each chosen `rotary` node into the slices,
//! negation, concat, products and sum of its definition ([`Op::Rotary`]), and each chosen
//! `linear` node into its matmul, scale product and sum ([`Op::Linear`]).

use crate::{BinaryOp, Dim, Graph, Node, Op, OpError, TensorType, UnaryOp, ValueId};

/// `g` with every node whose op satisfies `which` and is `rotary` or `linear` replaced by its
/// primitive ops; other nodes are copied unchanged (values renumbered), outputs keep their
/// names. Fails only on a replaced node the verifier would reject, naming it.
pub fn expand(g: &Graph, which: impl Fn(&Op) -> bool) -> Result<Graph, (ValueId, OpError)> {
    let mut out = Graph::new();
    let mut remap: Vec<ValueId> = Vec::with_capacity(g.nodes().len());
    for (v, node) in g.iter() {
        let inputs: Vec<ValueId> = node.inputs.iter().map(|v| remap[v.index()]).collect();
        let id = match node.op {
            Op::Rotary if which(&node.op) => expand_rotary(&mut out, &inputs, &node.ty),
            Op::Linear {
                transpose_b,
                scaled,
                added,
            } if which(&node.op) => expand_linear(&mut out, &inputs, transpose_b, scaled, added),
            _ => Ok(out.push(Node {
                op: node.op.clone(),
                inputs,
                ty: node.ty.clone(),
            })),
        };
        remap.push(id.map_err(|e| (v, e))?);
    }
    for o in g.outputs() {
        out.add_output(&o.name, remap[o.value.index()]);
    }
    Ok(out)
}

/// `matmul(x, w)`, then `* scale`, then `+ addend`, as the flags say.
fn expand_linear(
    g: &mut Graph,
    ins: &[ValueId],
    transpose_b: bool,
    scaled: bool,
    added: bool,
) -> Result<ValueId, OpError> {
    let arity = 2 + usize::from(scaled) + usize::from(added);
    if ins.len() != arity {
        return Err(OpError {
            op: "linear".into(),
            operands: vec![],
            reason: format!("needs {arity} operands, got {}", ins.len()),
        });
    }
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b,
    };
    let mut y = g.add(mm, &ins[..2])?;
    if scaled {
        y = g.add(Op::Binary(BinaryOp::Mul), &[y, ins[2]])?;
    }
    if added {
        y = g.add(Op::Binary(BinaryOp::Add), &[y, ins[arity - 1]])?;
    }
    Ok(y)
}

/// `x * cos + concat(-x[.., h..d], x[.., 0..h]) * sin` over the last axis.
fn expand_rotary(g: &mut Graph, ins: &[ValueId], ty: &TensorType) -> Result<ValueId, OpError> {
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
}

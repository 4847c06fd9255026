//! Composite ops written back as the primitive ops that define them, for a backend without a
//! kernel for the composite: [`rotary`] turns each `rotary` node into the slices, negation,
//! concat, products and sum of its definition ([`Op::Rotary`]).

use crate::{BinaryOp, Dim, Graph, Node, Op, OpError, TensorType, UnaryOp, ValueId};

/// `g` with every `rotary` node replaced by its primitive ops; other nodes are copied
/// unchanged (values renumbered), outputs keep their names. Fails only on a `rotary` node the
/// verifier would reject, naming it.
pub fn rotary(g: &Graph) -> Result<Graph, (ValueId, OpError)> {
    let mut out = Graph::new();
    let mut remap: Vec<ValueId> = Vec::with_capacity(g.nodes().len());
    for (v, node) in g.iter() {
        let inputs: Vec<ValueId> = node.inputs.iter().map(|v| remap[v.index()]).collect();
        let id = match node.op {
            Op::Rotary => expand_rotary(&mut out, &inputs, &node.ty).map_err(|e| (v, e))?,
            _ => out.push(Node {
                op: node.op.clone(),
                inputs,
                ty: node.ty.clone(),
            }),
        };
        remap.push(id);
    }
    for o in g.outputs() {
        out.add_output(&o.name, remap[o.value.index()]);
    }
    Ok(out)
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

    #[test]
    fn rotary_becomes_its_definition() {
        let mut g = Graph::new();
        let f32s = |shape: &[i64]| TensorType {
            dtype: DType::F32,
            shape: shape.iter().map(|&n| Dim::fixed(n)).collect(),
        };
        let x = g.input("x", f32s(&[2, 3, 4]));
        let cos = g.input("cos", f32s(&[3, 4]));
        let sin = g.input("sin", f32s(&[2, 1, 4]));
        let y = g.add(Op::Rotary, &[x, cos, sin]).unwrap();
        g.add_output("y", y);
        let h = rotary(&g).unwrap();
        verify(&h).unwrap();
        let ops: Vec<&str> = h.nodes().iter().map(|n| n.op.name()).collect();
        assert_eq!(
            ops,
            ["input", "input", "input", "slice", "slice", "neg", "concat", "mul", "mul", "add"]
        );
        assert_eq!(h.ty(h.outputs()[0].value), g.ty(y));
    }
}

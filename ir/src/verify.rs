//! The verifier: checks that a graph is well formed (operands defined before use, types as
//! inference says, names unique, outputs defined) and names the offending node when not.

use crate::infer::infer;
use crate::{Graph, Op, TensorType, ValueId};
use std::collections::HashSet;
use std::fmt;

/// Where a verification error was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A node, with its op mnemonic.
    Node(ValueId, String),
    /// A graph output, by name.
    Output(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Node(v, op) => write!(f, "{v} ({op})"),
            Location::Output(name) => write!(f, "output {name:?}"),
        }
    }
}

/// A graph failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid graph at {at}: {reason}")]
pub struct VerifyError {
    /// The node or output at fault.
    pub at: Location,
    /// What is wrong.
    pub reason: String,
}

/// Checks every node and output of `g`.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut inputs = HashSet::new();
    let mut params = HashSet::new();
    for (id, node) in g.iter() {
        let fail = |reason: String| VerifyError {
            at: Location::Node(id, node.op.name().to_string()),
            reason,
        };
        if let Some(bad) = node.inputs.iter().find(|v| v.index() >= id.index()) {
            return Err(fail(format!("operand {bad} is not defined before use")));
        }
        if let Op::Const { value } = &node.op {
            value.check().map_err(|e| fail(e.to_string()))?;
        }
        match &node.op {
            Op::Input { name } | Op::Param { name } => {
                if !node.inputs.is_empty() {
                    return Err(fail("takes no operands".into()));
                }
                let set = if matches!(node.op, Op::Input { .. }) {
                    &mut inputs
                } else {
                    &mut params
                };
                if name.is_empty() || !set.insert(name.as_str()) {
                    return Err(fail(format!(
                        "{} name {name:?} is empty or repeated",
                        node.op.name()
                    )));
                }
                if let Some(d) = node
                    .ty
                    .shape
                    .iter()
                    .find(|d| d.as_fixed().is_some_and(|n| n < 0))
                {
                    return Err(fail(format!("negative dimension {d} in {}", node.ty)));
                }
            }
            op => {
                let tys: Vec<&TensorType> = node.inputs.iter().map(|v| g.ty(*v)).collect();
                let ty = infer(op, &tys).map_err(|reason| {
                    let operands: Vec<String> = tys.iter().map(ToString::to_string).collect();
                    fail(format!("{reason} (operands {})", operands.join(", ")))
                })?;
                if ty != node.ty {
                    return Err(fail(format!(
                        "declared type {} but the op gives {ty}",
                        node.ty
                    )));
                }
            }
        }
    }
    let mut names = HashSet::new();
    for out in g.outputs() {
        let fail = |reason: String| VerifyError {
            at: Location::Output(out.name.clone()),
            reason,
        };
        if g.node(out.value).is_none() {
            return Err(fail(format!("{} is not defined", out.value)));
        }
        if out.name.is_empty() || !names.insert(out.name.as_str()) {
            return Err(fail("output name is empty or repeated".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BinaryOp, DType, Node};

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().copied())
    }

    #[test]
    fn accepts_well_formed() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3]));
        let w = g.param("w", f32s(&[3]));
        let y = g.add(Op::Binary(BinaryOp::Add), &[x, w]).unwrap();
        g.add_output("y", y);
        verify(&g).unwrap();
    }

    #[test]
    fn names_node_and_reason() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2, 3]));
        let w = g.param("w", f32s(&[4]));
        g.push(Node {
            op: Op::Binary(BinaryOp::Mul),
            inputs: vec![x, w],
            ty: f32s(&[2, 3]),
        });
        let e = verify(&g).unwrap_err();
        assert_eq!(e.at, Location::Node(ValueId(2), "mul".into()));
        assert!(e.to_string().contains("%2 (mul)"), "{e}");
        assert!(e.reason.contains("do not broadcast"), "{e}");
    }

    #[test]
    fn rejects_wrong_declared_type_forward_refs_and_duplicates() {
        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2]));
        g.push(Node {
            op: Op::Unary(crate::UnaryOp::Exp),
            inputs: vec![x],
            ty: f32s(&[3]),
        });
        assert!(verify(&g)
            .unwrap_err()
            .reason
            .contains("declared type f32[3]"));

        let mut g = Graph::new();
        g.push(Node {
            op: Op::Unary(crate::UnaryOp::Exp),
            inputs: vec![ValueId(1)],
            ty: f32s(&[2]),
        });
        g.input("x", f32s(&[2]));
        assert!(verify(&g)
            .unwrap_err()
            .reason
            .contains("not defined before use"));

        let mut g = Graph::new();
        g.input("x", f32s(&[2]));
        g.input("x", f32s(&[2]));
        assert!(verify(&g).unwrap_err().reason.contains("repeated"));

        let mut g = Graph::new();
        let x = g.input("x", f32s(&[2]));
        g.add_output("y", x);
        g.add_output("y", x);
        assert_eq!(verify(&g).unwrap_err().at, Location::Output("y".into()));
        let mut g = Graph::new();
        g.add_output("z", ValueId(7));
        assert!(verify(&g).is_err());
    }

    #[test]
    fn rejects_deserialized_const_with_wrong_byte_count() {
        let json = r#"{"dtype":"F32","shape":[2],"bytes":[0,0,128,63]}"#;
        let value: crate::Literal = serde_json::from_str(json).unwrap();
        let mut g = Graph::new();
        g.push(Node {
            op: Op::Const { value },
            inputs: vec![],
            ty: f32s(&[2]),
        });
        let e = verify(&g).unwrap_err();
        assert!(e.reason.contains("needs 8 bytes, got 4"), "{e}");
    }

    #[test]
    fn sliding_window_requires_causal() {
        let mut g = Graph::new();
        let q = g.input("q", f32s(&[1, 2, 3, 4]));
        let attn = |causal| Op::Attention {
            scale: crate::F64(0.5),
            causal,
            window: 2,
            merge_heads: false,
        };
        assert!(g.add(attn(true), &[q, q, q]).is_ok());
        let e = g.add(attn(false), &[q, q, q]).unwrap_err();
        assert!(e.reason.contains("requires causal"), "{e}");
    }
}

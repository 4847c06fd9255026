//! Graphs of SSA values: nodes in definition order, each an op applied to earlier values,
//! with its result type; named inputs, parameters and outputs.

use crate::infer::infer;
use crate::{Op, TensorType};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A value: the result of the node with this index. Printed as `%N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

impl ValueId {
    /// The node index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One SSA definition: `op(inputs) : ty`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// The operation and its attributes.
    pub op: Op,
    /// Operands, each defined by an earlier node.
    pub inputs: Vec<ValueId>,
    /// The result type.
    pub ty: TensorType,
}

/// A named graph output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// The output's name (e.g. `logits`).
    pub name: String,
    /// The value returned.
    pub value: ValueId,
}

/// A type error found while adding a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}({}): {reason}", operands.join(", "))]
pub struct OpError {
    /// The op's mnemonic.
    pub op: String,
    /// The operand types, printed.
    pub operands: Vec<String>,
    /// Why the op does not accept them.
    pub reason: String,
}

/// A kiln graph. Nodes are stored in definition order, so a node's operands always have
/// smaller indices: the node list is a topological order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    nodes: Vec<Node>,
    outputs: Vec<Output>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node whose type is inferred from its operands.
    pub fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, OpError> {
        let tys: Vec<&TensorType> = inputs
            .iter()
            .map(|v| self.nodes.get(v.index()).map(|n| &n.ty))
            .collect::<Option<_>>()
            .ok_or_else(|| OpError {
                op: op.name().to_string(),
                operands: inputs.iter().map(ToString::to_string).collect(),
                reason: "operand not defined yet".into(),
            })?;
        let ty = infer(&op, &tys).map_err(|reason| OpError {
            op: op.name().to_string(),
            operands: tys.iter().map(ToString::to_string).collect(),
            reason,
        })?;
        Ok(self.push(Node {
            op,
            inputs: inputs.to_vec(),
            ty,
        }))
    }

    /// Declares a graph input of the given type.
    pub fn input(&mut self, name: &str, ty: TensorType) -> ValueId {
        self.push(Node {
            op: Op::Input { name: name.into() },
            inputs: vec![],
            ty,
        })
    }

    /// Declares a named parameter of the given type.
    pub fn param(&mut self, name: &str, ty: TensorType) -> ValueId {
        self.push(Node {
            op: Op::Param { name: name.into() },
            inputs: vec![],
            ty,
        })
    }

    /// Appends a node as given, unchecked (the parser uses this; run the verifier after).
    pub fn push(&mut self, node: Node) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(node);
        id
    }

    /// Marks `value` as the output called `name`.
    pub fn add_output(&mut self, name: &str, value: ValueId) {
        self.outputs.push(Output {
            name: name.into(),
            value,
        });
    }

    /// All nodes in definition order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node defining `v`, if any.
    pub fn node(&self, v: ValueId) -> Option<&Node> {
        self.nodes.get(v.index())
    }

    /// The type of `v`.
    ///
    /// # Panics
    /// If `v` is not a value of this graph.
    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.index()].ty
    }

    /// The outputs in declaration order.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// Iterates over `(id, node)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (ValueId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (ValueId(i as u32), n))
    }

    /// The graph inputs: `(name, value, type)` in definition order.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, ValueId, &TensorType)> {
        self.iter().filter_map(|(id, n)| match &n.op {
            Op::Input { name } => Some((name.as_str(), id, &n.ty)),
            _ => None,
        })
    }

    /// The parameters: `(name, value, type)` in definition order.
    pub fn params(&self) -> impl Iterator<Item = (&str, ValueId, &TensorType)> {
        self.iter().filter_map(|(id, n)| match &n.op {
            Op::Param { name } => Some((name.as_str(), id, &n.ty)),
            _ => None,
        })
    }
}

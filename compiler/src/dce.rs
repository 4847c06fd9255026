//! Dead-code and common-subexpression elimination: keeps only nodes that outputs depend on
//! (graph inputs are always kept, since they are the graph's interface), merges nodes that
//! compute the same op on the same operands, and renumbers values densely.

use kiln_ir::{Graph, Node, Op, ValueId};
use std::collections::HashMap;

/// Returns `g` without nodes unreachable from its outputs and with duplicate computations
/// merged. Inputs stay, in order; the result computes the same outputs.
pub fn eliminate(g: &Graph) -> Graph {
    let mut live = vec![false; g.nodes().len()];
    for out in g.outputs() {
        live[out.value.index()] = true;
    }
    for (id, node) in g.iter().collect::<Vec<_>>().into_iter().rev() {
        if matches!(node.op, Op::Input { .. }) {
            live[id.index()] = true;
        }
        if live[id.index()] {
            for v in &node.inputs {
                live[v.index()] = true;
            }
        }
    }
    let mut out = Graph::new();
    let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
    let mut seen: HashMap<Node, ValueId> = HashMap::new();
    for (id, node) in g.iter() {
        if !live[id.index()] {
            continue;
        }
        let new = Node {
            op: node.op.clone(),
            inputs: node.inputs.iter().map(|v| remap[v]).collect(),
            ty: node.ty.clone(),
        };
        let nid = if matches!(new.op, Op::Input { .. } | Op::Param { .. }) {
            out.push(new)
        } else {
            *seen.entry(new.clone()).or_insert_with(|| out.push(new))
        };
        remap.insert(id, nid);
    }
    for o in g.outputs() {
        out.add_output(&o.name, remap[&o.value]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::trace::Tracer;
    use kiln_ir::{verify, DType};

    #[test]
    fn removes_dead_and_merges_duplicates() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [4]);
        let unused = t.input("unused", DType::F32, [2]);
        let _dead = unused.exp().unwrap();
        let a = x.exp().unwrap();
        let b = x.exp().unwrap();
        let y = a.add(&b).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        assert_eq!(g.nodes().len(), 6);
        let h = eliminate(&g);
        verify(&h).unwrap();
        let ops: Vec<&str> = h.nodes().iter().map(|n| n.op.name()).collect();
        assert_eq!(ops, ["input", "input", "exp", "add"]);
        assert_eq!(h.nodes()[3].inputs, [ValueId(2), ValueId(2)]);
        assert_eq!(h.outputs()[0].value, ValueId(3));
    }
}

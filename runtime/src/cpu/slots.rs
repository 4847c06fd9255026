//! Static memory planning: every value a step stores in a buffer of its own gets one of a few
//! reusable f32 buffers ("slots"), chosen by liveness in node order: a slot is free again
//! after the last read of every value stored in it (an alias keeps its operand's slot alive);
//! graph outputs keep theirs to the end. The layers of a linear group get theirs at the
//! group's node, where they are computed. Sizes are symbolic until a run binds them, so a slot
//! is as large as the largest value it ever holds; [`SlotPlan::peak_bytes`] gives the total for
//! concrete sizes before anything is allocated.

use super::plan::{Plan, Step};
use kiln_ir::Graph;

/// The slot of each node's value and when slots become free.
#[derive(Debug, Clone)]
pub struct SlotPlan {
    /// Per node: the slot holding its value (aliases share their operand's), if any.
    pub slot: Vec<Option<usize>>,
    /// Number of slots.
    pub count: usize,
    /// Per slot: the nodes whose values it holds.
    members: Vec<Vec<usize>>,
}

impl SlotPlan {
    /// Assigns slots for `plan`'s steps over `graph`.
    pub fn new(graph: &Graph, plan: &Plan) -> SlotPlan {
        let nodes = graph.nodes();
        let n = nodes.len();
        // The node whose buffer each value lives in.
        let mut root: Vec<usize> = (0..n).collect();
        for (i, node) in nodes.iter().enumerate() {
            if matches!(plan.steps[i], Step::Alias | Step::View) {
                root[i] = root[node.inputs[0].index()];
            }
        }
        // Last read of each root's buffer (usize::MAX: a graph output).
        let mut last = vec![0usize; n];
        for (i, node) in nodes.iter().enumerate() {
            last[root[i]] = last[root[i]].max(i);
            for v in plan.steps[i].value_operands(node) {
                let r = root[v.index()];
                last[r] = last[r].max(i);
            }
        }
        for out in graph.outputs() {
            last[root[out.value.index()]] = usize::MAX;
        }
        let mut release: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (r, &l) in last.iter().enumerate() {
            if l != usize::MAX && root[r] == r {
                release[l].push(r);
            }
        }
        let mut slot = vec![None; n];
        let mut free: Vec<usize> = Vec::new();
        let mut count = 0;
        let mut alloc = |free: &mut Vec<usize>| {
            Some(free.pop().unwrap_or_else(|| {
                count += 1;
                count - 1
            }))
        };
        for (i, node) in nodes.iter().enumerate() {
            match &plan.steps[i] {
                // A group's layers all get their buffers at the group's node.
                Step::Linear(layers) => {
                    for l in layers.iter() {
                        slot[l.node] = alloc(&mut free);
                    }
                }
                Step::Grouped => {}
                Step::Alias | Step::View => slot[i] = slot[root[i]],
                s if s.owns_buffer(node) => slot[i] = alloc(&mut free),
                _ => {}
            }
            for &r in &release[i] {
                if let Some(s) = slot[r] {
                    free.push(s);
                }
            }
        }
        let mut members = vec![Vec::new(); count];
        for (i, s) in slot.iter().enumerate() {
            if let Some(s) = s {
                members[*s].push(i);
            }
        }
        SlotPlan {
            slot,
            count,
            members,
        }
    }

    /// Bytes of all slots when node `i`'s value has `elems(i)` elements (`None` for values
    /// not stored in a slot): each slot as large as the largest value it holds.
    pub fn peak_bytes(&self, elems: impl Fn(usize) -> Option<usize>) -> usize {
        self.members
            .iter()
            .map(|nodes| nodes.iter().filter_map(|&i| elems(i)).max().unwrap_or(0))
            .fold(0usize, |a, e| a.saturating_add(e.saturating_mul(4)))
    }
}

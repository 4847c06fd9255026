//! Extraction: picks one e-node per needed e-class and rebuilds a verified [`Graph`].
//!
//! The choice is greedy and DAG-aware: a node's cost is the sum of the local costs (given by an
//! `egg::CostFunction` evaluated with zero-cost children) of every e-class it would pull in,
//! each counted once, however many uses share it. egg's own `Extractor` sums tree costs, which
//! count a shared value once per use: in a transformer every layer reuses the residual stream
//! several times, so those sums grow exponentially with depth and drown the differences that
//! decide between a fused op and its decomposition.

use super::{ENode, EG};
use egg::{CostFunction, Id};
use kiln_ir::{verify, Graph, Op, OpError, ValueId, VerifyError};
use std::collections::{HashMap, HashSet};

/// Extraction failed: each variant is a bug in the optimizer, reported rather than hidden.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// An output's e-class has no acyclic choice.
    #[error("no acyclic term for an e-class of type {0}")]
    NoTerm(String),
    /// A chosen node did not type-check when rebuilt.
    #[error("rebuilt node is ill-typed: {0}")]
    Op(#[from] OpError),
    /// A rebuilt node's type differs from its e-class's.
    #[error("rebuilt {op} has type {got}, its e-class {want}")]
    Type {
        /// The op's mnemonic.
        op: String,
        /// The rebuilt type.
        got: String,
        /// The e-class's type.
        want: String,
    },
    /// The rebuilt graph does not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// A set of e-class indices.
#[derive(Clone, PartialEq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn union(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a |= b);
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let next = |x: &u64| Some(x & (x - 1)).filter(|&y| y != 0);
            std::iter::successors(Some(word).filter(|&x| x != 0), next)
                .map(move |x| w * 64 + x.trailing_zeros() as usize)
        })
    }
}

/// One class's current choice: node index, cone (classes pulled in, itself included), cost.
#[derive(Clone)]
struct Choice {
    node: usize,
    cone: Bits,
    cost: f64,
}

/// Sweeps over the e-classes until no choice changes (or this many sweeps). Classes are swept
/// in id order, which is mostly operands before users, so a few sweeps usually suffice.
const MAX_SWEEPS: usize = 1000;

/// The chosen node index of every e-class (by class index), or `None` where none is acyclic.
fn choose(
    eg: &EG,
    classes: &[Id],
    index: &HashMap<Id, usize>,
    local: &[Vec<f64>],
) -> Vec<Option<Choice>> {
    let n = classes.len();
    let mut best: Vec<Option<Choice>> = vec![None; n];
    let mut chosen_local = vec![0.0; n];
    for _ in 0..MAX_SWEEPS {
        let mut changed = false;
        for (ci, &cid) in classes.iter().enumerate() {
            let mut pick: Option<Choice> = None;
            for (ni, node) in eg[cid].nodes.iter().enumerate() {
                let mut cone = Bits::new(n);
                let ok = node
                    .children
                    .iter()
                    .all(|&c| match &best[index[&eg.find(c)]] {
                        Some(ch) if !ch.cone.has(ci) => {
                            cone.union(&ch.cone);
                            true
                        }
                        _ => false,
                    });
                if !ok {
                    continue;
                }
                cone.set(ci);
                let cost: f64 = cone
                    .iter()
                    .map(|j| {
                        if j == ci {
                            local[ci][ni]
                        } else {
                            chosen_local[j]
                        }
                    })
                    .sum();
                let current = best[ci].as_ref().is_some_and(|b| b.node == ni);
                let better = match &pick {
                    None => true,
                    Some(p) => cost < p.cost || (cost == p.cost && current),
                };
                if better {
                    pick = Some(Choice {
                        node: ni,
                        cone,
                        cost,
                    });
                }
            }
            changed |= match (&best[ci], &pick) {
                (Some(b), Some(p)) => b.node != p.node || b.cone != p.cone,
                (None, None) => false,
                _ => true,
            };
            chosen_local[ci] = pick.as_ref().map_or(0.0, |p| local[ci][p.node]);
            best[ci] = pick;
        }
        if !changed {
            break;
        }
    }
    best
}

/// Rebuilds the graph computing `outputs` from the cheapest nodes under `cost`. Inputs and
/// parameters come first, in the order of `sources` (all of them, used or not; dead-code
/// elimination drops unused parameters); the result is verified.
pub fn extract<C: CostFunction<ENode, Cost = f64>>(
    eg: &EG,
    outputs: &[(String, Id)],
    sources: &[(Op, Id)],
    cost: &mut C,
) -> Result<Graph, ExtractError> {
    let mut classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
    classes.sort_unstable();
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let local: Vec<Vec<f64>> = classes
        .iter()
        .map(|&c| eg[c].nodes.iter().map(|n| cost.cost(n, |_| 0.0)).collect())
        .collect();
    let best = choose(eg, &classes, &index, &local);

    let mut g = Graph::new();
    let mut values: HashMap<Id, ValueId> = HashMap::new();
    for (op, id) in sources {
        let ty = eg[*id].data.ty.clone();
        let v = match op {
            Op::Input { name } => g.input(name, ty),
            Op::Param { name } => g.param(name, ty),
            _ => continue,
        };
        values.insert(eg.find(*id), v);
    }
    for (_, out) in outputs {
        // Iterative post-order: (class, children done).
        let mut stack = vec![(eg.find(*out), false)];
        let mut open = HashSet::new();
        while let Some((id, ready)) = stack.pop() {
            if values.contains_key(&id) {
                continue;
            }
            if !ready && !open.insert(id) {
                return Err(ExtractError::NoTerm(eg[id].data.ty.to_string()));
            }
            let ci = index[&id];
            let choice = best[ci]
                .as_ref()
                .ok_or_else(|| ExtractError::NoTerm(eg[id].data.ty.to_string()))?;
            let node = &eg[id].nodes[choice.node];
            if !ready {
                stack.push((id, true));
                stack.extend(node.children.iter().map(|&c| (eg.find(c), false)));
                continue;
            }
            let inputs = node
                .children
                .iter()
                .map(|c| values.get(&eg.find(*c)).copied())
                .collect::<Option<Vec<ValueId>>>()
                .ok_or_else(|| ExtractError::NoTerm(eg[id].data.ty.to_string()))?;
            let v = g.add(node.op.clone(), &inputs)?;
            if *g.ty(v) != eg[id].data.ty {
                return Err(ExtractError::Type {
                    op: node.op.name().into(),
                    got: g.ty(v).to_string(),
                    want: eg[id].data.ty.to_string(),
                });
            }
            values.insert(id, v);
        }
    }
    for (name, out) in outputs {
        g.add_output(name, values[&eg.find(*out)]);
    }
    verify(&g)?;
    Ok(g)
}

//! The plan section: the CPU backend's execution plan and memory plan for each graph, as `kiln
//! compile` derived them — per computed node the kernel and its parameters (linear groups with
//! their weights, epilogues and layouts, fused elementwise programs, attention settings, ...)
//! and the activation buffer ("slot") holding its value.
//!
//! The loader does not trust a plan from the file (a wrong one could send a kernel out of a
//! buffer's bounds): it derives the plan from the graphs with its own code, as it would anyway,
//! and refuses the artifact when the two differ, naming the first node that differs. So a model
//! runs exactly the kernels it was compiled (and tested and benchmarked) with, and a runtime
//! that would plan it differently — an older or newer kiln — says so instead of running
//! something else; `kiln inspect` prints the plan from the file.

use crate::cpu::legalize::legalize;
use crate::cpu::{kind_counts, Plan, SlotPlan, Step};
use kiln_ir::Graph;
use serde::{Deserialize, Serialize};

/// The plans of an artifact's graphs, in the manifest's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRecord {
    /// One per graph.
    pub graphs: Vec<GraphPlan>,
}

/// The execution and memory plan of one graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphPlan {
    /// The graph's name (`prefill`, `decode`, `encoder`).
    pub name: String,
    /// Per node computed by a step of its own: the node, its kernel's short name (e.g.
    /// `linear model.layers.0.mlp.down_proj.weight`) and the step in full, parameters included.
    pub kernels: Vec<KernelRecord>,
    /// Per node whose value lives in an activation buffer: the node and its buffer.
    pub slots: Vec<(usize, usize)>,
    /// Number of activation buffers.
    pub buffers: usize,
}

/// One computed node of a [`GraphPlan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRecord {
    /// The node.
    pub node: usize,
    /// The kernel's name ([`Step::name`]).
    pub kernel: String,
    /// The step with all its parameters.
    pub step: String,
}

impl PlanRecord {
    /// The plans this runtime derives for `graphs` (verified, then legalized for the CPU plan),
    /// named by `names`.
    pub fn derive(names: &[String], graphs: &[Graph]) -> PlanRecord {
        let graphs = names
            .iter()
            .zip(graphs)
            .map(|(name, g)| {
                let g = &legalize(g);
                let plan = Plan::new(g);
                let slots = SlotPlan::new(g, &plan);
                GraphPlan {
                    name: name.clone(),
                    kernels: plan
                        .steps
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| !matches!(s, Step::Source | Step::Skip | Step::Grouped))
                        .map(|(node, s)| KernelRecord {
                            node,
                            kernel: s.name(),
                            step: format!("{s:?}"),
                        })
                        .collect(),
                    slots: slots
                        .slot
                        .iter()
                        .enumerate()
                        .filter_map(|(node, s)| s.map(|s| (node, s)))
                        .collect(),
                    buffers: slots.count,
                }
            })
            .collect();
        PlanRecord { graphs }
    }

    /// Where `self` (from a file) and `derived` first differ, in words; `None` when they agree.
    pub fn difference(&self, derived: &PlanRecord) -> Option<String> {
        if self.graphs.len() != derived.graphs.len() {
            return Some(format!(
                "it plans {} graphs, this runtime {}",
                self.graphs.len(),
                derived.graphs.len()
            ));
        }
        for (a, b) in self.graphs.iter().zip(&derived.graphs) {
            let name = &b.name;
            if a.name != b.name {
                return Some(format!("it names graph {name:?} {:?}", a.name));
            }
            if let Some(d) = kernel_difference(&a.kernels, &b.kernels) {
                return Some(format!("in the {name} graph {d}"));
            }
            if (&a.slots, a.buffers) != (&b.slots, b.buffers) {
                return Some(format!(
                    "the {name} graph's memory plan differs ({} buffers recorded, {} derived)",
                    a.buffers, b.buffers
                ));
            }
        }
        None
    }
}

/// The first kernel where `recorded` and `derived` differ, in words: its node and kernel name,
/// or its full step when only the parameters differ.
fn kernel_difference(recorded: &[KernelRecord], derived: &[KernelRecord]) -> Option<String> {
    let show = |k: Option<&KernelRecord>, full: bool| match k {
        None => "nothing more".to_string(),
        Some(k) if full => format!("%{}: {}", k.node, k.step),
        Some(k) => format!("%{}: {}", k.node, k.kernel),
    };
    let n = recorded.len().max(derived.len());
    (0..n).find_map(|i| {
        let (a, b) = (recorded.get(i), derived.get(i));
        (a != b).then(|| {
            let full =
                matches!((a, b), (Some(x), Some(y)) if (x.node, &x.kernel) == (y.node, &y.kernel));
            format!(
                "it runs {}, this runtime would run {}",
                show(a, full),
                show(b, full)
            )
        })
    })
}

impl GraphPlan {
    /// Kernels by kind, e.g. `attention×12 linear×48`.
    pub fn summary(&self) -> String {
        kind_counts(self.kernels.iter().map(|k| k.kernel.as_str()))
    }
}

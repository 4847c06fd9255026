//! The pass manager: runs named passes in order over a graph, each an e-graph rewrite (lower,
//! saturate with a rule set under [`Limits`], extract with the [`Roofline`] cost) or a graph
//! clean-up, verifying the graph after every pass in debug builds (extraction always verifies
//! its result), and reports each pass's op counts and time. A rewrite pass that hits a limit
//! keeps the best graph its e-graph holds and says so in the report's warnings.

use crate::cost::{Roofline, Target};
use crate::egraph::{extract, extract::ExtractError, to_egraph, Rewrite};
use crate::{dce, rules};
use egg::{Runner, SimpleScheduler, StopReason};
use kiln_ir::{verify, Graph, VerifyError};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Bounds on each rewrite pass's e-graph run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// E-nodes in the e-graph.
    pub nodes: usize,
    /// Rewrite iterations.
    pub iterations: usize,
    /// Wall time.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 500_000,
            iterations: 30,
            time: Duration::from_secs(10),
        }
    }
}

/// What a pass does.
pub enum PassKind {
    /// Saturate an e-graph with these rules, then extract.
    Rewrite(fn() -> Vec<Rewrite>),
    /// A graph-to-graph function.
    Graph(fn(&Graph) -> Graph),
}

/// A named pass.
pub struct Pass {
    /// Its name in reports (`algebra`, `norm`, `dce`).
    pub name: &'static str,
    /// What it does.
    pub kind: PassKind,
}

/// The default pipeline: `algebra` (layout and algebra clean-ups), `norm` (RMSNorm/LayerNorm
/// fusion), `rotary` (rotary embedding), `attention` (attention fusion), `moe` (MoE dispatch),
/// `fuse` (elementwise kernel fusion), `dce`. Precision lowering follows it, then
/// [`lowered_passes`].
pub fn default_passes() -> Vec<Pass> {
    vec![
        Pass {
            name: "algebra",
            kind: PassKind::Rewrite(rules::algebra::rules),
        },
        Pass {
            name: "norm",
            kind: PassKind::Rewrite(rules::norm::rules),
        },
        Pass {
            name: "rotary",
            kind: PassKind::Rewrite(rules::rotary::rules),
        },
        Pass {
            name: "attention",
            kind: PassKind::Rewrite(rules::attention::rules),
        },
        Pass {
            name: "moe",
            kind: PassKind::Rewrite(rules::moe::rules),
        },
        Pass {
            name: "fuse",
            kind: PassKind::Rewrite(rules::fuse::rules),
        },
        Pass {
            name: "dce",
            kind: PassKind::Graph(dce::eliminate),
        },
    ]
}

/// The passes run after precision lowering ([`crate::precision`], which creates fp8's scale
/// products and bf16's roundings): `epilogue` (matmul epilogues into `linear` ops), `heads`
/// (head layouts and RoPE into projections, merged heads into attention), `swiglu` (gated
/// MLPs into `swiglu` ops), `qkv` (an attention's q, k and v projections into one
/// `packed_linear`; last, a graph pass, so no e-graph extraction reorders its nodes). At f32, where lowering changes nothing, [`default_passes`]
/// followed by these is the whole pipeline.
pub fn lowered_passes() -> Vec<Pass> {
    vec![
        Pass {
            name: "epilogue",
            kind: PassKind::Rewrite(rules::epilogue::rules),
        },
        Pass {
            name: "heads",
            kind: PassKind::Rewrite(rules::heads::rules),
        },
        Pass {
            name: "swiglu",
            kind: PassKind::Rewrite(rules::swiglu::rules),
        },
        Pass {
            name: "qkv",
            kind: PassKind::Graph(rules::qkv::pack),
        },
    ]
}

/// Runs [`lowered_passes`] over `g` (a graph [`optimize`]d and then precision-lowered),
/// appending their records and warnings to `report`, the optimizer's report.
pub fn run_lowered(
    g: &Graph,
    target: &Target,
    limits: &Limits,
    report: &mut Report,
) -> Result<Graph, OptimizeError> {
    let (out, late) = run_passes(g, &lowered_passes(), target, limits)?;
    report.passes.extend(late.passes);
    report.warnings.extend(late.warnings);
    Ok(out)
}

/// One pass's record.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    /// The pass's name.
    pub name: &'static str,
    /// Nodes before.
    pub ops_before: usize,
    /// Nodes after.
    pub ops_after: usize,
    /// Wall time of the pass.
    pub time: Duration,
    /// For rewrite passes: iterations run, final e-nodes and e-classes, and why it stopped.
    pub egraph: Option<EGraphStats>,
}

/// An e-graph run's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EGraphStats {
    /// Iterations run.
    pub iterations: usize,
    /// E-nodes at the end.
    pub nodes: usize,
    /// E-classes at the end.
    pub classes: usize,
    /// Why the run stopped (`saturated`, or the limit hit).
    pub stop: String,
    /// How many times each rule that fired was applied, by rule name.
    pub applied: BTreeMap<String, usize>,
}

/// The record of a whole pipeline run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Each pass, in order.
    pub passes: Vec<PassReport>,
    /// Limits hit and other things a user should know; the graph is still correct.
    pub warnings: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.passes {
            write!(
                f,
                "{:<10} {:>6} -> {:>6} ops  {:>9.3} ms",
                p.name,
                p.ops_before,
                p.ops_after,
                p.time.as_secs_f64() * 1e3
            )?;
            if let Some(e) = &p.egraph {
                write!(
                    f,
                    "  ({} iterations, {} e-nodes, {} e-classes, {})",
                    e.iterations, e.nodes, e.classes, e.stop
                )?;
                for (rule, n) in &e.applied {
                    write!(f, " {rule}×{n}")?;
                }
            }
            writeln!(f)?;
        }
        self.warnings
            .iter()
            .try_for_each(|w| writeln!(f, "warning: {w}"))
    }
}

/// Optimization failed: always an optimizer bug, named by pass.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    /// Extraction could not rebuild a graph.
    #[error("pass {pass}: {source}")]
    Extract {
        /// The pass.
        pass: &'static str,
        /// What went wrong.
        source: ExtractError,
    },
    /// A pass produced a graph that does not verify.
    #[error("pass {pass} produced an invalid graph: {source}")]
    Verify {
        /// The pass.
        pass: &'static str,
        /// What went wrong.
        source: VerifyError,
    },
    /// The e-graph became inconsistent (a rule rewrote a value to one of another type or value).
    #[error("pass {pass}: inconsistent e-graph: {}", bugs.join("; "))]
    Inconsistent {
        /// The pass.
        pass: &'static str,
        /// What the analysis recorded.
        bugs: Vec<String>,
    },
}

/// Runs one rewrite pass: lower, saturate, extract.
fn rewrite(
    g: &Graph,
    name: &'static str,
    rules: &[Rewrite],
    target: &Target,
    limits: &Limits,
    warnings: &mut Vec<String>,
) -> Result<(Graph, EGraphStats), OptimizeError> {
    let lowered = to_egraph(g);
    let runner = Runner::default()
        .with_egraph(lowered.egraph)
        .with_scheduler(SimpleScheduler)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(rules);
    let eg = &runner.egraph;
    if !eg.analysis.bugs.is_empty() {
        return Err(OptimizeError::Inconsistent {
            pass: name,
            bugs: eg.analysis.bugs.clone(),
        });
    }
    let stop = match &runner.stop_reason {
        Some(StopReason::Saturated) | None => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit {n}"),
        Some(StopReason::NodeLimit(n)) => format!("node limit {n}"),
        Some(StopReason::TimeLimit(t)) => format!("time limit {t:.3} s"),
        Some(StopReason::Other(s)) => s.clone(),
    };
    if stop != "saturated" {
        warnings.push(format!(
            "pass {name} stopped at the {stop} before saturating; kept the best graph found so far"
        ));
    }
    let mut cost = Roofline {
        egraph: eg,
        target: *target,
    };
    let out = extract(eg, &lowered.outputs, &lowered.sources, &mut cost)
        .map_err(|source| OptimizeError::Extract { pass: name, source })?;
    let mut applied = BTreeMap::new();
    for (rule, n) in runner.iterations.iter().flat_map(|i| &i.applied) {
        *applied.entry(rule.to_string()).or_insert(0) += n;
    }
    let stats = EGraphStats {
        applied,
        iterations: runner.iterations.len(),
        nodes: eg.total_number_of_nodes(),
        classes: eg.number_of_classes(),
        stop,
    };
    Ok((out, stats))
}

/// Runs `passes` over `g` in order.
pub fn run_passes(
    g: &Graph,
    passes: &[Pass],
    target: &Target,
    limits: &Limits,
) -> Result<(Graph, Report), OptimizeError> {
    let mut report = Report::default();
    let mut g = g.clone();
    for pass in passes {
        let start = Instant::now();
        let before = g.nodes().len();
        let egraph = match &pass.kind {
            PassKind::Rewrite(rules) => {
                let (out, stats) = rewrite(
                    &g,
                    pass.name,
                    &rules(),
                    target,
                    limits,
                    &mut report.warnings,
                )?;
                g = out;
                Some(stats)
            }
            PassKind::Graph(f) => {
                g = f(&g);
                None
            }
        };
        if cfg!(debug_assertions) {
            verify(&g).map_err(|source| OptimizeError::Verify {
                pass: pass.name,
                source,
            })?;
        }
        report.passes.push(PassReport {
            name: pass.name,
            ops_before: before,
            ops_after: g.nodes().len(),
            time: start.elapsed(),
            egraph,
        });
    }
    Ok((g, report))
}

/// Optimizes `g` for `target` with the [`default_passes`].
pub fn optimize(
    g: &Graph,
    target: &Target,
    limits: &Limits,
) -> Result<(Graph, Report), OptimizeError> {
    run_passes(g, &default_passes(), target, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::{find, FnRule, Term, EG};
    use egg::Id;
    use kiln_ir::trace::Tracer;
    use kiln_ir::{BinaryOp, DType, Literal, Op};

    /// `x * c` → `(x * c/2) * 2`: valid, and never saturates (a new constant every time).
    fn halve(eg: &EG, id: Id) -> Vec<Term> {
        find::binary(eg, id, BinaryOp::Mul)
            .into_iter()
            .filter_map(|(x, c)| {
                let v = find::scalar(eg, c)?;
                let k = |v| {
                    Term::Node(
                        Op::Const {
                            value: Literal::scalar(DType::F32, v),
                        },
                        vec![],
                    )
                };
                let half = Term::Node(Op::Binary(BinaryOp::Mul), vec![Term::Class(x), k(v / 2.0)]);
                Some(Term::Node(Op::Binary(BinaryOp::Mul), vec![half, k(2.0)]))
            })
            .collect()
    }

    fn looping() -> Vec<Rewrite> {
        vec![FnRule::rewrite("halve", halve)]
    }

    #[test]
    fn a_looping_rule_set_stops_with_a_warning_and_a_valid_graph() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [4]);
        let y = x.mul(&t.scalar(DType::F32, 8.0)).unwrap().exp().unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let passes = [Pass {
            name: "loop",
            kind: PassKind::Rewrite(looping),
        }];
        let limits = Limits {
            iterations: 6,
            ..Limits::default()
        };
        let (h, report) = run_passes(&g, &passes, &Target::cpu(), &limits).unwrap();
        assert_eq!(report.warnings.len(), 1, "{report}");
        assert!(report.warnings[0].contains("iteration limit 6"), "{report}");
        verify(&h).unwrap();
        // The cheapest equivalent is the original single multiply.
        let ops: Vec<&str> = h.nodes().iter().map(|n| n.op.name()).collect();
        assert_eq!(ops, ["input", "const", "mul", "exp"]);
        let stats = report.passes[0].egraph.as_ref().unwrap();
        assert!(stats.applied["halve"] >= 6, "{report}");
    }

    /// `exp(x)` → `x` flattened: a rule bug the pass must report, not hide.
    fn wrong_type(eg: &EG, id: Id) -> Vec<Term> {
        find::unary(eg, id, |o| *o == Op::Unary(kiln_ir::UnaryOp::Exp))
            .map(|(_, x)| {
                Term::node(
                    Op::Reshape {
                        shape: vec![4.into()],
                    },
                    &[x],
                )
            })
            .collect()
    }

    #[test]
    fn an_ill_typed_rewrite_is_an_error() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 2]);
        t.output("y", &x.exp().unwrap());
        let passes = [Pass {
            name: "bad",
            kind: PassKind::Rewrite(|| vec![FnRule::rewrite("wrong-type", wrong_type)]),
        }];
        let err = run_passes(
            &t.finish().unwrap(),
            &passes,
            &Target::cpu(),
            &Limits::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("pass bad: inconsistent e-graph: rule wrong-type built a f32[4]"),
            "{msg}"
        );
    }

    #[test]
    fn the_lowered_passes_extend_the_report() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [3, 4]);
        let w = t.param("w", DType::F32, [5, 4]);
        let b = t.param("b", DType::F32, [5]);
        t.output("y", &x.matmul_t(&w, false, true).unwrap().add(&b).unwrap());
        let (target, limits) = (Target::cpu(), Limits::default());
        let (h, mut report) = optimize(&t.finish().unwrap(), &target, &limits).unwrap();
        let h = run_lowered(&h, &target, &limits, &mut report).unwrap();
        let names: Vec<&str> = report.passes.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), default_passes().len() + lowered_passes().len());
        assert_eq!(
            names[default_passes().len()..],
            ["epilogue", "heads", "swiglu", "qkv"]
        );
        let ops: Vec<&str> = h.nodes().iter().map(|n| n.op.name()).collect();
        assert_eq!(ops, ["input", "param", "param", "linear"]);
        assert!(report.to_string().contains("linear-epilogue×1"), "{report}");
    }

    #[test]
    fn the_report_lists_passes_in_order() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [4]);
        let y = x.permute(&[0]).unwrap().exp().unwrap();
        t.output("y", &y);
        let (h, report) =
            optimize(&t.finish().unwrap(), &Target::cpu(), &Limits::default()).unwrap();
        let names: Vec<&str> = report.passes.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "algebra",
                "norm",
                "rotary",
                "attention",
                "moe",
                "fuse",
                "dce"
            ]
        );
        assert_eq!(
            (report.passes[0].ops_before, report.passes[0].ops_after),
            (3, 2)
        );
        assert_eq!(h.nodes().len(), 2);
        assert!(
            report.to_string().contains("permute-identity×1"),
            "{report}"
        );
    }
}

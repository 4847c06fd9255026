//! kiln graphs as e-graphs (`egg`): the language ([`ENode`]: an [`Op`] with child e-classes),
//! the analysis ([`analysis`]: each e-class's type and small constant value), rewrites written
//! as Rust functions ([`FnRule`]), lowering ([`to_egraph`]) and extraction back to a verified
//! graph ([`extract()`]).

pub mod analysis;
pub mod extract;

pub use analysis::{Data, TypeAnalysis};
pub use extract::extract;

use egg::{Applier, Id, Language, PatternAst, SearchMatches, Searcher, Subst, Symbol, Var};
use kiln_ir::{infer, Graph, Op, TensorType};

/// One e-node: an op (with its attributes) applied to e-classes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ENode {
    /// The operation.
    pub op: Op,
    /// Operand e-classes, in operand order.
    pub children: Vec<Id>,
}

impl Language for ENode {
    type Discriminant = std::mem::Discriminant<Op>;

    fn discriminant(&self) -> Self::Discriminant {
        std::mem::discriminant(&self.op)
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

/// The e-graph of kiln ops with the type/constant analysis.
pub type EG = egg::EGraph<ENode, TypeAnalysis>;

/// A rewrite rule over [`EG`].
pub type Rewrite = egg::Rewrite<ENode, TypeAnalysis>;

/// A graph lowered into an e-graph: the e-class of each output and the graph's sources.
pub struct Lowered {
    /// The e-graph.
    pub egraph: EG,
    /// Outputs by name, in order, with their e-classes.
    pub outputs: Vec<(String, Id)>,
    /// The graph's inputs and parameters, in definition order, with their e-classes.
    pub sources: Vec<(Op, Id)>,
}

/// Lowers a verified graph into a fresh e-graph (equal nodes are shared on the way in).
pub fn to_egraph(g: &Graph) -> Lowered {
    let mut egraph = EG::new(TypeAnalysis::default());
    let mut ids: Vec<Id> = Vec::with_capacity(g.nodes().len());
    let mut sources = Vec::new();
    for node in g.nodes() {
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            egraph.analysis.declare(node.op.clone(), node.ty.clone());
        }
        let children = node.inputs.iter().map(|v| ids[v.index()]).collect();
        let id = egraph.add(ENode {
            op: node.op.clone(),
            children,
        });
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            sources.push((node.op.clone(), id));
        }
        ids.push(id);
    }
    egraph.rebuild();
    let outputs = g
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), egraph.find(ids[o.value.index()])))
        .collect::<Vec<_>>();
    egraph.analysis.outputs = outputs.iter().map(|&(_, id)| id).collect();
    Lowered {
        egraph,
        outputs,
        sources,
    }
}

/// A term to add to the e-graph: an existing e-class, or an op applied to terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// An existing e-class.
    Class(Id),
    /// A new node.
    Node(Op, Vec<Term>),
}

impl Term {
    /// `op(children)` over existing e-classes.
    pub fn node(op: Op, children: &[Id]) -> Term {
        Term::Node(op, children.iter().map(|&c| Term::Class(c)).collect())
    }
}

/// The type `term` would have, or why it is ill-typed.
fn term_type(eg: &EG, term: &Term) -> Result<TensorType, String> {
    match term {
        Term::Class(id) => Ok(eg[*id].data.ty.clone()),
        Term::Node(op, children) => {
            let tys = children
                .iter()
                .map(|c| term_type(eg, c))
                .collect::<Result<Vec<_>, _>>()?;
            infer(op, &tys.iter().collect::<Vec<_>>())
        }
    }
}

fn add_term(eg: &mut EG, term: &Term) -> Id {
    match term {
        Term::Class(id) => *id,
        Term::Node(op, children) => {
            let children = children.iter().map(|c| add_term(eg, c)).collect();
            eg.add(ENode {
                op: op.clone(),
                children,
            })
        }
    }
}

/// Finds, for one e-class, terms equal to it (empty when the rule does not apply there).
pub type FindFn = fn(&EG, Id) -> Vec<Term>;

/// A rewrite written as a Rust function over the e-graph and its analysis (shapes, dtypes and
/// constants are checked in code). It is both the searcher and the applier: the search reports
/// the classes where `find` has terms, and the application recomputes them on the current
/// e-graph, checks that each is well-typed with the class's type, adds it and unions it in.
/// A term of another type is a rule bug: it is recorded in the analysis, never added.
#[derive(Clone, Copy)]
pub struct FnRule(pub FindFn);

impl FnRule {
    /// The rule as an egg rewrite.
    pub fn rewrite(name: &str, find: FindFn) -> Rewrite {
        Rewrite::new(name, FnRule(find), FnRule(find))
            .unwrap_or_else(|e| unreachable!("FnRule binds no variables: {e}"))
    }
}

impl Searcher<ENode, TypeAnalysis> for FnRule {
    fn search_eclass_with_limit(
        &self,
        egraph: &EG,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, ENode>> {
        (limit > 0 && !(self.0)(egraph, eclass).is_empty()).then(|| SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<ENode, TypeAnalysis> for FnRule {
    fn apply_one(
        &self,
        egraph: &mut EG,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<ENode>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let eclass = egraph.find(eclass);
        let mut changed = vec![];
        for term in (self.0)(egraph, eclass) {
            let want = &egraph[eclass].data.ty;
            match term_type(egraph, &term) {
                Ok(ty) if ty == *want => {
                    let id = add_term(egraph, &term);
                    if egraph.union(eclass, id) {
                        changed.push(id);
                    }
                }
                Ok(ty) => {
                    let msg = format!("rule {rule} built a {ty} for a {want} e-class: {term:?}");
                    egraph.analysis.bugs.push(msg);
                }
                Err(e) => {
                    let msg = format!("rule {rule} built an ill-typed term: {e}: {term:?}");
                    egraph.analysis.bugs.push(msg);
                }
            }
        }
        changed
    }
}

/// Helpers for rules: looking into e-classes.
pub mod find {
    use super::{ENode, EG};
    use egg::Id;
    use kiln_ir::{BinaryOp, Op};

    /// The nodes of `id`'s class whose op satisfies `pred`.
    pub fn nodes<'a>(
        eg: &'a EG,
        id: Id,
        pred: impl Fn(&Op) -> bool + 'a,
    ) -> impl Iterator<Item = &'a ENode> + 'a {
        eg[id].nodes.iter().filter(move |n| pred(&n.op))
    }

    /// Operand pairs `(a, b)` of the class's binary `op` nodes, each in both orders.
    pub fn binary(eg: &EG, id: Id, op: BinaryOp) -> Vec<(Id, Id)> {
        nodes(eg, id, |o| *o == Op::Binary(op))
            .flat_map(|n| {
                let (a, b) = (eg.find(n.children[0]), eg.find(n.children[1]));
                [(a, b), (b, a)]
            })
            .collect()
    }

    /// The operands of the class's one-operand nodes whose op satisfies `pred`, with the op.
    pub fn unary<'a>(
        eg: &'a EG,
        id: Id,
        pred: impl Fn(&Op) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a Op, Id)> + 'a {
        nodes(eg, id, pred)
            .filter(|n| n.children.len() == 1)
            .map(|n| (&n.op, eg.find(n.children[0])))
    }

    /// True when every reader of `id`'s class is a node of `user`'s class (there is one at
    /// least) and the class is not a graph output: a value `user` alone reads.
    pub fn only_read_by(eg: &EG, id: Id, user: Id) -> bool {
        let (id, user) = (eg.find(id), eg.find(user));
        let output = eg.analysis.outputs.iter().any(|&o| eg.find(o) == id);
        let parents = eg[id].parents();
        !output && parents.len() > 0 && parents.map(|p| eg.find(p)).all(|p| p == user)
    }

    /// True when `id`'s class holds the constant whose every element is `v`.
    pub fn is_splat(eg: &EG, id: Id, v: f64) -> bool {
        eg[id]
            .data
            .constant
            .as_ref()
            .is_some_and(|c| !c.is_empty() && c.values().iter().all(|s| s.as_f64() == v))
    }

    /// The value of a one-element float constant class.
    pub fn scalar(eg: &EG, id: Id) -> Option<f64> {
        let c = eg[id].data.constant.as_ref()?;
        (c.dtype().is_float() && c.len() == 1).then(|| c.values()[0].as_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{Roofline, Target};
    use kiln_ir::trace::Tracer;
    use kiln_ir::DType;

    #[test]
    fn lowering_and_extraction_keep_the_interface() {
        let t = Tracer::new();
        let b = t.input("b", DType::F32, [2]);
        let w = t.param("w", DType::F32, [2]);
        let a = t.input("a", DType::F32, [2]);
        t.param("unused", DType::F32, [3]);
        let y = a.add(&w).unwrap().mul(&b).unwrap();
        let z = a.add(&w).unwrap();
        t.output("z", &z);
        t.output("y", &y);
        t.output("a", &a);
        t.output("w", &w);
        let g = t.finish().unwrap();
        let low = to_egraph(&g);
        // The duplicate `a + w` is one e-class.
        assert_eq!(low.egraph.number_of_classes(), 6);
        let mut cost = Roofline {
            egraph: &low.egraph,
            target: Target::cpu(),
        };
        let h = extract(&low.egraph, &low.outputs, &low.sources, &mut cost).unwrap();
        let names = |g: &Graph| {
            let ins: Vec<String> = g.inputs().map(|(n, ..)| n.to_string()).collect();
            let ps: Vec<String> = g.params().map(|(n, ..)| n.to_string()).collect();
            let outs: Vec<String> = g.outputs().iter().map(|o| o.name.clone()).collect();
            (ins, ps, outs)
        };
        assert_eq!(names(&h), names(&g));
        assert_eq!(
            h.outputs()[2].value,
            h.inputs().find(|i| i.0 == "a").unwrap().1
        );
        assert_eq!(h.nodes().len(), g.nodes().len() - 1);
    }
}

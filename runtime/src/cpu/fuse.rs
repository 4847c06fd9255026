//! Plan-level fusions: patterns of selected steps that one kernel computes, found on the graph
//! after kernel selection, without changing the graph (the nodes a fusion absorbs become
//! [`Step::Skip`] once nothing reads them).
//!
//! - **Operand rounding in the kernels** ([`rounding_in_kernels`]): a `cast(cast(x, bf16), f32)`
//!   read only by linear layers with bf16 or e4m3 weights is not computed: those kernels round
//!   x to bf16 (to nearest even, as the cast) when they convert it.
//! - **Linear epilogues** ([`linear_epilogues`]): a linear layer whose only consumer multiplies
//!   it by a per-column f32 parameter (fp8's scales) and/or whose (scaled) result's only
//!   consumer adds a residual of its shape or a bias `[n]` computes that in its epilogue.
//! - **Linear groups** ([`linear_groups`]): linear layers reading the same activation (Q/K/V,
//!   gate/up) become one step at the first one's node, one parallel region in decode.
//! - **Rotary embedding** ([`rope`]): `x·cos + concat(-x[.., h..], x[.., ..h])·sin` is one step;
//!   its rounding to bf16, where that is its only consumer, is done by the same step
//!   ([`rope_rounding`]).
//! - **Attention output layout** ([`attention_layout`]): attention whose only consumer permutes
//!   `[b, h, s, d]` to `[b, s, h, d]` writes that layout, so the permute is a dense view.

use super::plan::{LinearLayer, Step};
use kiln_ir::{BinaryOp, DType, Dim, Expr, Graph, Node, Op, UnaryOp, ValueId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Per node: the nodes reading it (a graph output counts as a reader `usize::MAX`).
fn users(graph: &Graph) -> Vec<Vec<usize>> {
    let mut users = vec![Vec::new(); graph.nodes().len()];
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in &node.inputs {
            users[v.index()].push(i);
        }
    }
    for o in graph.outputs() {
        users[o.value.index()].push(usize::MAX);
    }
    users
}

/// The binary op a node computes on its two operands: a primitive binary op, or a
/// `fused_elementwise` body `(op $0 $1)`.
fn binary(node: &Node) -> Option<BinaryOp> {
    if node.inputs.len() != 2 {
        return None;
    }
    match &node.op {
        Op::Binary(op) => Some(*op),
        Op::FusedElementwise {
            body: Expr::Binary(op, a, b),
        } => match (&**a, &**b) {
            (Expr::Arg(0), Expr::Arg(1)) | (Expr::Arg(1), Expr::Arg(0)) => Some(*op),
            _ => None,
        },
        _ => None,
    }
}

/// The f32 parameter behind `v` if `v` is that parameter, or a reshape of it, of shape `[n]`.
fn column_param(graph: &Graph, v: ValueId, n: &Dim) -> Option<String> {
    let node = graph.node(v)?;
    if node.ty.shape.as_slice() != std::slice::from_ref(n) {
        return None;
    }
    let param = match &node.op {
        Op::Reshape { .. } => graph.node(node.inputs[0])?,
        _ => node,
    };
    match &param.op {
        Op::Param { name } if param.ty.dtype == DType::F32 => Some(name.clone()),
        _ => None,
    }
}

/// Lets the linear layers with bf16 / e4m3 weights read `x` for `cast(cast(x, bf16), f32)`
/// where only such layers read that rounding (their kernels round x to bf16 themselves).
pub(super) fn rounding_in_kernels(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for (c, node) in nodes.iter().enumerate() {
        let (Op::Cast { to: DType::F32 }, [inner]) = (&node.op, node.inputs.as_slice()) else {
            continue;
        };
        let Some(x) = graph
            .node(*inner)
            .filter(|n| matches!(n.op, Op::Cast { to: DType::BF16 }))
            .and_then(|n| n.inputs.first().copied())
            .filter(|x| graph.node(*x).is_some_and(|n| n.ty.dtype == DType::F32))
        else {
            continue;
        };
        let only_rounding_layers = !users[c].is_empty()
            && users[c].iter().all(|&r| match steps.get(r) {
                Some(Step::Linear(layers)) => layers.iter().all(|l| l.rounds_x && l.x.index() == c),
                _ => false,
            });
        if !only_rounding_layers {
            continue;
        }
        for &r in &users[c] {
            if let Step::Linear(layers) = &steps[r] {
                let mut layers = layers.to_vec();
                for l in &mut layers {
                    l.x = x;
                }
                steps[r] = Step::Linear(Arc::from(layers));
            }
        }
    }
}

/// Folds each single linear layer's scale multiply and residual / bias add into it.
pub(super) fn linear_epilogues(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for i in 0..nodes.len() {
        let Step::Linear(layers) = &steps[i] else {
            continue;
        };
        let [layer] = &layers[..] else {
            continue;
        };
        let mut layer = layer.clone();
        let mut at = i;
        while let [c] = users[at][..] {
            let Some(cn) = nodes.get(c) else { break };
            let an = &nodes[at];
            let other = cn.inputs.iter().copied().find(|v| v.index() != at);
            let (Some(op), Some(other), true, true) = (
                binary(cn),
                other,
                cn.ty == an.ty,
                matches!(steps[c], Step::Fused(_)),
            ) else {
                break;
            };
            let Some(n) = cn.ty.shape.last() else { break };
            match op {
                BinaryOp::Mul if layer.scale.is_none() && layer.add.is_none() => {
                    match column_param(graph, other, n) {
                        Some(name) => layer.scale = Some(name),
                        None => break,
                    }
                }
                BinaryOp::Add if layer.add.is_none() => {
                    let Some(o) = graph.node(other) else { break };
                    let fits = o.ty.dtype == DType::F32
                        && (o.ty.shape == cn.ty.shape
                            || o.ty.shape.as_slice() == std::slice::from_ref(n));
                    if !fits {
                        break;
                    }
                    layer.add = Some(other);
                }
                _ => break,
            }
            steps[at] = Step::Skip;
            at = c;
        }
        if at != i {
            layer.node = at;
            steps[at] = Step::Linear(Arc::from(vec![layer]));
        }
    }
}

/// Groups the single linear layers that read the same activation into one step at the first
/// one's node (a layer joins only if its addend is computed before that node).
pub(super) fn linear_groups(steps: &mut [Step]) {
    let mut by_x: BTreeMap<ValueId, Vec<usize>> = BTreeMap::new();
    for (i, step) in steps.iter().enumerate() {
        if let Step::Linear(layers) = step {
            if let [l] = &layers[..] {
                by_x.entry(l.x).or_default().push(i);
            }
        }
    }
    for members in by_x.into_values() {
        let first = members[0];
        let joins: Vec<usize> = members
            .into_iter()
            .filter(|&m| match &steps[m] {
                Step::Linear(l) => l[0].add.is_none_or(|a| a.index() < first),
                _ => false,
            })
            .collect();
        if joins.len() < 2 || joins[0] != first {
            continue;
        }
        let layers: Vec<LinearLayer> = joins
            .iter()
            .filter_map(|&m| match &steps[m] {
                Step::Linear(l) => Some(l[0].clone()),
                _ => None,
            })
            .collect();
        for &m in &joins[1..] {
            steps[m] = Step::Grouped;
        }
        steps[first] = Step::Linear(Arc::from(layers));
    }
}

/// Attention steps whose only consumer is a `[0, 2, 1, 3]` permute store `[b, s, h, d]`; that
/// permute becomes a (dense) view.
pub(super) fn attention_layout(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for a in 0..nodes.len() {
        let [p] = users[a][..] else { continue };
        let fits = matches!(steps[a], Step::Attention { .. })
            && nodes[a].ty.rank() == 4
            && nodes
                .get(p)
                .is_some_and(|pn| matches!(&pn.op, Op::Permute { perm } if perm == &[0, 2, 1, 3]))
            && matches!(steps[p], Step::View | Step::Copy);
        if fits {
            if let Step::Attention { bshd, .. } = &mut steps[a] {
                *bshd = true;
            }
            steps[p] = Step::View;
        }
    }
}

/// The rotary step for a `fused_elementwise` `node` whose body is
/// `(add (mul a b) (mul c d))` with one factor the rotate-half of another operand.
pub(super) fn rope(graph: &Graph, node: &Node, body: &Expr) -> Option<Step> {
    let Expr::Binary(BinaryOp::Add, l, r) = body else {
        return None;
    };
    let product = |e: &Expr| match e {
        Expr::Binary(BinaryOp::Mul, a, b) => match (&**a, &**b) {
            (Expr::Arg(i), Expr::Arg(j)) => Some((*i, *j)),
            _ => None,
        },
        _ => None,
    };
    let (p, q) = (product(l)?, product(r)?);
    let val = |i: usize| node.inputs.get(i).copied();
    for (rotated, plain) in [(q, p), (p, q)] {
        for (rot, sin) in [rotated, (rotated.1, rotated.0)] {
            for (x, cos) in [plain, (plain.1, plain.0)] {
                let (x, cos, sin) = (val(x)?, val(cos)?, val(sin)?);
                let same_type = graph.node(x).is_some_and(|n| n.ty == node.ty);
                if same_type && rotate_half_of(graph, val(rot)?) == Some(x) {
                    return Some(Step::Rope {
                        x,
                        cos,
                        sin,
                        round_bf16: false,
                    });
                }
            }
        }
    }
    None
}

/// A rotary step whose only consumer rounds it to bf16 (a bf16 graph's query) moves to that
/// cast's node and rounds its result itself.
pub(super) fn rope_rounding(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for r in 0..nodes.len() {
        let Step::Rope {
            x,
            cos,
            sin,
            round_bf16: false,
        } = steps[r]
        else {
            continue;
        };
        let [c] = users[r][..] else { continue };
        let rounds = nodes
            .get(c)
            .is_some_and(|n| matches!(n.op, Op::Cast { to: DType::BF16 }));
        if rounds && matches!(steps[c], Step::Fused(_)) {
            steps[c] = Step::Rope {
                x,
                cos,
                sin,
                round_bf16: true,
            };
            steps[r] = Step::Skip;
        }
    }
}

/// `x` if `v` is `concat(neg(x[.., h..2h]), x[.., ..h])` over the last axis of `x` (size 2h).
fn rotate_half_of(graph: &Graph, v: ValueId) -> Option<ValueId> {
    let node = graph.node(v)?;
    let last = node.ty.rank().checked_sub(1)?;
    let (Op::Concat { axis }, [a, b]) = (&node.op, node.inputs.as_slice()) else {
        return None;
    };
    if *axis != last {
        return None;
    }
    let neg = graph.node(*a)?;
    let negated = match &neg.op {
        Op::Unary(UnaryOp::Neg) => true,
        Op::FusedElementwise { body } => {
            matches!(body, Expr::Unary(UnaryOp::Neg, e) if matches!(**e, Expr::Arg(0)))
        }
        _ => false,
    };
    if !negated || neg.inputs.len() != 1 {
        return None;
    }
    let slice = |v: ValueId| -> Option<(ValueId, i64, i64)> {
        let s = graph.node(v)?;
        match &s.op {
            Op::Slice { axis, start, end } if *axis == last => {
                Some((s.inputs[0], start.as_fixed()?, end.as_fixed()?))
            }
            _ => None,
        }
    };
    let (x_hi, h, d) = slice(neg.inputs[0])?;
    let (x_lo, zero, h2) = slice(*b)?;
    let full = graph.node(x_hi)?.ty.shape.get(last)?.as_fixed()?;
    (x_hi == x_lo && zero == 0 && h2 == h && d == 2 * h && full == d).then_some(x_hi)
}

//! Plan-level fusions: patterns of selected steps that one kernel computes, found on the graph
//! after kernel selection, without changing the graph (the nodes a fusion absorbs become
//! [`Step::Skip`] once nothing reads them).
//!
//! - **Operand rounding in the kernels** ([`rounding_in_kernels`]): a `cast(cast(x, bf16), f32)`
//!   read only by linear layers with bf16 or e4m3 weights is not computed: those kernels round
//!   x to bf16 (to nearest even, as the cast) when they convert it.
//! - **Linear groups** ([`linear_groups`]): linear layers reading the same activation (Q/K/V,
//!   gate/up) become one step at the first one's node, one parallel region in decode.
//! - **Rotary rounding** ([`rope_rounding`]): a rotary step's rounding to bf16, where that is
//!   its only consumer, is done by the same step.
//! - **Attention output layout** ([`attention_layout`]): attention whose only consumer permutes
//!   `[b, h, s, d]` to `[b, s, h, d]` writes that layout, so the permute is a dense view.
//! - **Heads** ([`linear_heads`]): a linear layer whose result the graph splits into heads and
//!   permutes to `[b, h, s, d]` (reshape + permute, views) and then rotates (a rotary step),
//!   rounds to bf16 or appends to a KV cache stores `[b, s, h, d]` and computes the rotation
//!   (cos/sin rows per position) and rounding in its epilogue: the rotary and rounding steps
//!   disappear.
//! - **SwiGLU** ([`swiglu`]): `silu(x · Gᵀ) · (x · Uᵀ)` (each possibly scaled) is one layer
//!   with a gate, writing one output.
//! - **Bias, residual and GELU** ([`linear_epilogues`]): an elementwise step computing
//!   `act(y + b + r)` from a single linear layer's value `y` read by nothing else (a bias `b`
//!   `[n]`, a residual `r`, `act` GELU in either form, each optional, the additions in the
//!   body's order) is that layer's epilogue, at the step's node (BERT's and GPT-2's output
//!   projections and first MLP layers).
//! - **KV-cache appends** ([`cache_appends`]): a `concat(past, new)` graph output whose `new`
//!   is a linear layer's value read by nothing else is appended by that layer's group step
//!   (the executor writes the new rows into the cache's spare capacity right after the
//!   group's kernel), not by a step of its own.
//!
//! Each fusion checks its whole pattern (ops, shapes, that the absorbed values have no other
//! reader) and leaves the steps unchanged otherwise.

use super::plan::{reads_strided, GateLayer, LinearLayer, Step};
use kiln_ir::{BinaryOp, DType, Dim, Expr, Graph, Op, UnaryOp, ValueId};
use kiln_kernels::linear::Activation;
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

/// Groups the single linear layers that read the same activation into one step at the first
/// one's node (a layer joins only if its addend and RoPE tables are computed before that node).
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
                Step::Linear(l) => l[0].operands().all(|a| a.index() < first),
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

/// Whether every reader of `v` is `target`, or (through at most `depth` nodes, none a graph
/// output) only feeds `target`.
fn only_feeds(users: &[Vec<usize>], v: usize, target: usize, depth: usize) -> bool {
    depth > 0
        && !users[v].is_empty()
        && users[v]
            .iter()
            .all(|&w| w == target || (w != usize::MAX && only_feeds(users, w, target, depth - 1)))
}

/// `(reshape, permute, d)` if linear value `l` `[b, s, h·d]` is read only by a reshape to
/// `[b, s, h, d]` read only by a `[0, 2, 1, 3]` permute.
fn head_view(graph: &Graph, users: &[Vec<usize>], l: usize) -> Option<(usize, usize, usize)> {
    let nodes = graph.nodes();
    let [r] = users[l][..] else { return None };
    let [p] = users.get(r)?[..] else { return None };
    let (ln, rn, pn) = (&nodes[l], nodes.get(r)?, nodes.get(p)?);
    let (ls, rs) = (ln.ty.shape.as_slice(), rn.ty.shape.as_slice());
    let fits = matches!(rn.op, Op::Reshape { .. })
        && matches!(&pn.op, Op::Permute { perm } if perm == &[0, 2, 1, 3])
        && ls.len() == 3
        && rs.len() == 4
        && ls[..2] == rs[..2];
    if !fits {
        return None;
    }
    let d = usize::try_from(rs[3].as_fixed()?).ok()?;
    Some((r, p, d))
}

/// What a layer stored as heads computes: the node whose value it is, its RoPE tables
/// `(cos, sin)`, and whether it rounds to bf16.
type HeadsUse = (usize, Option<(ValueId, ValueId)>, bool);

/// What a layer stored as heads computes for the heads view `p` (`[b, h, s, d]`): a rotary
/// step on `p` (at its node, or at its rounding's) with cos/sin `[b, 1, s, d]`, where the other
/// readers of `p` only feed that step (the rotate-half slices); else a rounding of `p` to bf16
/// or a concat (a KV cache) that is `p`'s only reader.
fn heads_use(graph: &Graph, users: &[Vec<usize>], steps: &[Step], p: usize) -> Option<HeadsUse> {
    let nodes = graph.nodes();
    let pty = &nodes[p].ty;
    for &u in &users[p] {
        // The rotary step of elementwise node u: at u, or moved to its rounding.
        let at = match (steps.get(u), users.get(u).map(Vec::as_slice)) {
            (Some(Step::Rope { .. }), _) => u,
            (Some(Step::Skip), Some(&[c])) if matches!(steps.get(c), Some(Step::Rope { .. })) => c,
            _ => continue,
        };
        let Step::Rope {
            x,
            cos,
            sin,
            round_bf16,
        } = steps[at]
        else {
            continue;
        };
        let table = |v: ValueId| {
            graph.node(v).is_some_and(|t| {
                let s = &t.ty.shape;
                t.ty.dtype == DType::F32
                    && s.len() == 4
                    && s[0] == pty.shape[0]
                    && s[1] == Dim::fixed(1)
                    && s[2] == pty.shape[2]
                    && s[3] == pty.shape[3]
            })
        };
        let others_feed_u = users[p]
            .iter()
            .all(|&w| w == u || only_feeds(users, w, u, 3));
        if x.index() == p && table(cos) && table(sin) && others_feed_u {
            return Some((at, Some((cos, sin)), round_bf16));
        }
        return None;
    }
    let [c] = users[p][..] else { return None };
    let cn = nodes.get(c)?;
    match cn.op {
        Op::Cast { to: DType::BF16 } if matches!(steps[c], Step::Fused(_)) => Some((c, None, true)),
        Op::Concat { .. } if cn.inputs.len() == 2 && cn.inputs[1].index() == p => {
            Some((p, None, false))
        }
        _ => None,
    }
}

/// Single linear layers whose heads view is rotated, rounded or appended (see [`heads_use`])
/// compute that value themselves, stored `[b, s, h, d]`; the views and the rotary / rounding
/// steps they replace are not computed.
pub(super) fn linear_heads(graph: &Graph, steps: &mut [Step]) {
    let users = users(graph);
    for l in 0..steps.len() {
        let Step::Linear(layers) = &steps[l] else {
            continue;
        };
        let [layer] = &layers[..] else { continue };
        if layer.heads.is_some() || layer.gate.is_some() {
            continue;
        }
        let Some((r, p, d)) = head_view(graph, &users, l) else {
            continue;
        };
        let Some((node, rope, round_bf16)) = heads_use(graph, &users, steps, p) else {
            continue;
        };
        let strided_readers = users[node]
            .iter()
            .all(|&u| u == usize::MAX || steps.get(u).is_some_and(reads_strided));
        if !strided_readers || d % 2 == 1 && rope.is_some() {
            continue;
        }
        let mut layer = layer.clone();
        layer.node = node;
        layer.heads = Some(d);
        layer.rope = rope;
        layer.round_bf16 = round_bf16;
        for i in [l, r, p] {
            steps[i] = Step::Skip;
        }
        steps[node] = Step::Linear(Arc::from(vec![layer]));
    }
}

/// `(gate, up)` argument indices of a body `silu($g) · $u`.
fn silu_mul(body: &Expr) -> Option<(usize, usize)> {
    let Expr::Binary(BinaryOp::Mul, a, b) = body else {
        return None;
    };
    let arg = |e: &Expr| match e {
        Expr::Arg(i) => Some(*i),
        _ => None,
    };
    let silu = |e: &Expr| match e {
        Expr::Unary(UnaryOp::Silu, x) => arg(x),
        _ => None,
    };
    match (silu(a), arg(b), arg(a), silu(b)) {
        (Some(g), Some(u), _, _) | (_, _, Some(u), Some(g)) => Some((g, u)),
        _ => None,
    }
}

/// A `silu(gate) · up` elementwise step over two single linear layers of the same x, of its
/// type and read only by it, becomes the up layer with that gate, at the step's node.
pub(super) fn swiglu(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for (i, node) in nodes.iter().enumerate() {
        let (Step::Fused(_), Op::FusedElementwise { body }) = (&steps[i], &node.op) else {
            continue;
        };
        let Some((g, u)) = silu_mul(body) else {
            continue;
        };
        let (Some(&gv), Some(&uv)) = (node.inputs.get(g), node.inputs.get(u)) else {
            continue;
        };
        let single = |v: ValueId| match (&steps[v.index()], graph.node(v)) {
            (Step::Linear(l), Some(n)) if users[v.index()] == [i] && n.ty == node.ty => {
                match &l[..] {
                    [l] if l.add.is_none() && l.heads.is_none() && l.gate.is_none() => {
                        Some(l.clone())
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let (Some(gl), Some(mut ul)) = (single(gv), single(uv)) else {
            continue;
        };
        if gv == uv || gl.x != ul.x || gl.rounds_x != ul.rounds_x {
            continue;
        }
        ul.gate = Some(GateLayer {
            weight: gl.weight,
            transposed: gl.transposed,
            scale: gl.scale,
        });
        ul.node = i;
        steps[gv.index()] = Step::Skip;
        steps[uv.index()] = Step::Skip;
        steps[i] = Step::Linear(Arc::from(vec![ul]));
    }
}

/// A body `act?(p₀ [+ p₁] [+ c])` over operands: the pair added first (`(add $a $b)`, either
/// way round) and the operand added to their sum (on either side), under an optional GELU.
struct SumThenActivation {
    pair: Vec<usize>,
    outer: Option<usize>,
    activation: Option<Activation>,
}

/// The [`SumThenActivation`] a body is, if it is one.
fn sum_then_activation(body: &Expr) -> Option<SumThenActivation> {
    let (sum, activation) = match body {
        Expr::Unary(UnaryOp::Gelu, x) => (x.as_ref(), Some(Activation::Gelu)),
        Expr::Unary(UnaryOp::GeluTanh, x) => (x.as_ref(), Some(Activation::GeluTanh)),
        _ => (body, None),
    };
    let arg = |e: &Expr| match e {
        Expr::Arg(i) => Some(*i),
        _ => None,
    };
    let pair = |e: &Expr| match e {
        Expr::Binary(BinaryOp::Add, a, b) => Some(vec![arg(a)?, arg(b)?]),
        _ => None,
    };
    let (pair, outer) = match sum {
        Expr::Arg(i) => (vec![*i], None),
        Expr::Binary(BinaryOp::Add, a, b) => match (arg(a), arg(b)) {
            (Some(a), Some(b)) => (vec![a, b], None),
            (None, Some(c)) => (pair(a)?, Some(c)),
            (Some(c), None) => (pair(b)?, Some(c)),
            (None, None) => return None,
        },
        _ => return None,
    };
    Some(SumThenActivation {
        pair,
        outer,
        activation,
    })
}

/// Elementwise steps `act(y + b + r)` over a single linear layer's value `y` (see the module
/// docs) become that layer, with the bias, addend and activation in its epilogue, at the
/// step's node. `y` is one of the pair added first (f32 addition commutes); with a third
/// operand, `y`'s partner must be a bias `[n]` (the kernel adds the bias, then the addend); a
/// layer that already has an addend takes only an activation.
pub(super) fn linear_epilogues(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    for (i, node) in nodes.iter().enumerate() {
        if !matches!(steps[i], Step::Fused(_)) || node.ty.dtype != DType::F32 {
            continue;
        }
        let Op::FusedElementwise { body } = &node.op else {
            continue;
        };
        let Some(sum) = sum_then_activation(body) else {
            continue;
        };
        let value = |a: usize| node.inputs.get(a).copied();
        // The layer's value: either operand of the pair.
        let layer_at = |a: usize| {
            let v = value(a)?;
            match (&steps[v.index()], graph.node(v)) {
                (Step::Linear(l), Some(n)) if users[v.index()] == [i] && n.ty == node.ty => {
                    match &l[..] {
                        [l] if l.bias.is_none()
                            && l.activation.is_none()
                            && l.gate.is_none()
                            && l.heads.is_none()
                            && l.rope.is_none()
                            && !l.round_bf16 =>
                        {
                            Some((v, l.clone()))
                        }
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        let Some((j, (y, mut layer))) = sum
            .pair
            .iter()
            .enumerate()
            .find_map(|(j, &a)| Some((j, layer_at(a)?)))
        else {
            continue;
        };
        let partner = match sum.pair.get(1 - j) {
            Some(&a) => match value(a) {
                Some(v) => Some(v),
                None => continue,
            },
            None => None,
        };
        let outer = match sum.outer.map(value) {
            Some(None) => continue,
            Some(Some(v)) => Some(v),
            None => None,
        };
        let n = node.ty.shape.last();
        let is_bias = |v: ValueId| {
            graph.node(v).is_some_and(|b| {
                b.ty.dtype == DType::F32 && n.is_some_and(|n| b.ty.shape.as_slice() == [n.clone()])
            })
        };
        let is_addend = |v: ValueId| is_bias(v) || graph.node(v).is_some_and(|a| a.ty == node.ty);
        let fits = match (partner, outer, layer.add) {
            (None, None, _) => true,
            (Some(a), None, None) if is_addend(a) => {
                layer.add = Some(a);
                true
            }
            (Some(b), Some(a), None) if is_bias(b) && is_addend(a) => {
                layer.bias = Some(b);
                layer.add = Some(a);
                true
            }
            _ => false,
        };
        if !fits || partner == Some(y) || outer == Some(y) {
            continue;
        }
        layer.activation = sum.activation;
        layer.node = i;
        steps[y.index()] = Step::Skip;
        steps[i] = Step::Linear(Arc::from(vec![layer]));
    }
}

/// A `concat(past, new)` that is a graph output, with `new` a linear layer's value read by
/// nothing else and `past` computed before that layer's group, is appended by the group (the
/// concat's node becomes [`Step::Grouped`]).
pub(super) fn cache_appends(graph: &Graph, steps: &mut [Step]) {
    let nodes = graph.nodes();
    let users = users(graph);
    let mut group_of = vec![None; nodes.len()];
    for (g, step) in steps.iter().enumerate() {
        if let Step::Linear(layers) = step {
            for (j, l) in layers.iter().enumerate() {
                group_of[l.node] = Some((g, j));
            }
        }
    }
    for (c, node) in nodes.iter().enumerate() {
        let (Step::Concat, Op::Concat { .. }, [past, new]) =
            (&steps[c], &node.op, node.inputs.as_slice())
        else {
            continue;
        };
        let Some((g, j)) = group_of[new.index()] else {
            continue;
        };
        if !users[c].contains(&usize::MAX) || users[new.index()] != [c] || past.index() >= g {
            continue;
        }
        if let Step::Linear(layers) = &steps[g] {
            let mut layers = layers.to_vec();
            layers[j].append = Some(c);
            steps[g] = Step::Linear(Arc::from(layers));
            steps[c] = Step::Grouped;
        }
    }
}

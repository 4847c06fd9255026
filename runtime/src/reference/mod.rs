//! The reference executor: interprets any verified [`Graph`] on the CPU with plain loops. It
//! *defines* what a graph means; every optimized graph and generated kernel is tested against it,
//! so each op is written to be obviously correct rather than fast.
//!
//! [`run`] verifies the graph, then binds the size symbols from the supplied inputs' and
//! parameters' shapes: a declared dim that is a single symbol binds it; then a dim with exactly
//! one unbound symbol appearing linearly (`past+seq` once `seq` is known) is solved for it; then
//! every declared dim must evaluate to the supplied size and every dtype must match exactly.
//! It then evaluates the nodes in order, checking each result against its declared type
//! evaluated with the bindings, and frees every value after its last use. Outputs are returned
//! by name.
//!
//! Numerics, shared by all ops:
//! - float ops widen their operands to f64, compute in f64 and round once to the result dtype
//!   (as [`Storage::from_scalars`] does: via f32, then to f16/bf16/fp8 as a cast);
//! - integer ops compute in i64 and wrap to the result dtype; integer division by zero is
//!   [`ExecError::DivisionByZero`];
//! - reductions and matmul accumulate in f64 (floats) or wrapping i64 (integers);
//! - data movement (reshape, permute, expand, slice, concat, gather, where) copies elements bit
//!   for bit.
//!
//! Every problem with caller-supplied data (missing or mistyped inputs, conflicting sizes, gather
//! indices or slice bounds out of range) is an [`ExecError`], never a panic.

pub(crate) mod bind;
mod composite;
mod elementwise;
mod error;
mod index;
mod layout;
mod matmul;
mod moe;
mod reduce;
mod refine;
#[cfg(test)]
mod testutil;

pub use bind::concrete_type;
pub use error::ExecError;

use crate::{Storage, Tensor};
use kiln_ir::scalar::Scalar;
use kiln_ir::{verify, BinaryOp, Bindings, DType, Dim, Graph, Op, UnaryOp, ValueId};
use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash};

/// Where the executor finds parameters (weights) by name.
pub trait ParamSource {
    /// The parameter called `name`, if present.
    fn get(&self, name: &str) -> Option<&Tensor>;
}

impl<S: BuildHasher> ParamSource for HashMap<String, Tensor, S> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        HashMap::get(self, name)
    }
}

impl ParamSource for BTreeMap<String, Tensor> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        BTreeMap::get(self, name)
    }
}

/// A parameter source with no parameters, for graphs without weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoParams;

impl ParamSource for NoParams {
    fn get(&self, _name: &str) -> Option<&Tensor> {
        None
    }
}

/// Runs `graph` on `inputs` (by input name) and `params`; returns the outputs by name.
pub fn run(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &dyn ParamSource,
) -> Result<HashMap<String, Tensor>, ExecError> {
    run_with_bindings(graph, inputs, params, &Bindings::new())
}

/// As [`run`], with some size symbols bound explicitly (for symbols that no input or parameter
/// shape determines); the shapes must agree with them.
pub fn run_with_bindings(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &dyn ParamSource,
    bindings: &Bindings,
) -> Result<HashMap<String, Tensor>, ExecError> {
    verify(graph)?;
    let sources = sources(graph, inputs, params)?;
    let env = bind::bind(&sources.iter().map(|s| s.0).collect::<Vec<_>>(), bindings)?;

    let n = graph.nodes().len();
    let last_use = last_uses(graph);
    let mut values: Vec<Option<Cow<'_, Tensor>>> = (0..n).map(|_| None).collect();
    for (s, t) in &sources {
        values[s.id.index()] = Some(Cow::Borrowed(*t));
    }
    for (id, node) in graph.iter() {
        let ctx = Ctx {
            node: id,
            op: node.op.name(),
            env: &env,
        };
        if !matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            let args = node
                .inputs
                .iter()
                .map(|v| {
                    values[v.index()]
                        .as_deref()
                        .ok_or_else(|| ctx.mismatch(format!("operand {v} is not available")))
                })
                .collect::<Result<Vec<&Tensor>, _>>()?;
            let out = eval_op(&ctx, &node.op, &args)?;
            let expected = ctx.shape(&node.ty.shape)?;
            if out.dtype() != node.ty.dtype || out.shape() != expected.as_slice() {
                return Err(ctx.mismatch(format!(
                    "produced {} but the declared type {} evaluates to {}",
                    concrete_type(&out),
                    node.ty,
                    kiln_ir::TensorType::new(node.ty.dtype, expected.iter().map(|&n| n as i64))
                )));
            }
            values[id.index()] = Some(Cow::Owned(out));
        }
        for v in node.inputs.iter().chain([&id]) {
            if last_use[v.index()] == id.index() {
                values[v.index()] = None;
            }
        }
    }

    take_outputs(graph, values)
}

/// The graph's inputs and parameters paired with the supplied tensors, in definition order.
/// Every supplied input must be an input of the graph.
pub(crate) fn sources<'a>(
    graph: &'a Graph,
    inputs: &'a HashMap<String, Tensor>,
    params: &'a dyn ParamSource,
) -> Result<Vec<(bind::Source<'a>, &'a Tensor)>, ExecError> {
    let mut out = Vec::new();
    typed_sources(
        graph,
        inputs,
        params,
        |t| (t.dtype(), t.shape()),
        &mut |s, t| {
            out.push((
                s,
                match t {
                    Supplied::Input(t) | Supplied::Param(t) => t,
                },
            ))
        },
    )?;
    Ok(out)
}

/// Walks the graph's inputs (from `inputs`, typed by `ty`) and parameters, in definition
/// order, giving each with its declared and supplied types.
fn typed_sources<'a, K, T>(
    graph: &'a Graph,
    inputs: &'a HashMap<K, T>,
    params: &'a dyn ParamSource,
    ty: impl Fn(&'a T) -> (DType, &'a [usize]),
    each: &mut dyn FnMut(bind::Source<'a>, Supplied<'a, T>),
) -> Result<(), ExecError>
where
    K: Borrow<str> + Hash + Eq,
{
    check_known_inputs(graph, inputs.keys())?;
    let input = |_: usize, name: &str| inputs.get(name).map(&ty);
    each_source(graph, params, &input, &mut |source| {
        let supplied = match source.kind {
            "input" => inputs.get(source.name).map(Supplied::Input),
            _ => params.get(source.name).map(Supplied::Param),
        };
        if let Some(supplied) = supplied {
            each(source, supplied);
        }
    })
}

/// Refuses a name among `names` that is not an input of the graph (the first in sorted order:
/// most likely a misspelt name).
pub(crate) fn check_known_inputs<'k, K: Borrow<str> + 'k>(
    graph: &Graph,
    names: impl Iterator<Item = &'k K>,
) -> Result<(), ExecError> {
    let unknown = names
        .map(|k| k.borrow())
        .filter(|k| !graph.inputs().any(|(name, _, _)| name == *k))
        .min();
    match unknown {
        Some(name) => Err(ExecError::UnknownInput(name.to_string())),
        None => Ok(()),
    }
}

/// The dtype and shape supplied for input `i` named `name`, if any ([`each_source`]).
pub(crate) type SuppliedType<'a, 'f> = dyn Fn(usize, &str) -> Option<(DType, &'a [usize])> + 'f;

/// Walks the graph's inputs and parameters in definition order, giving each with its declared
/// and supplied types: input `i` (in [`Graph::inputs`] order, named `name`) typed by
/// `input(i, name)` (`None`: not supplied, an error), parameters by `params`. Allocates
/// nothing itself (the CPU backend binds each decode step's sizes through it).
pub(crate) fn each_source<'a>(
    graph: &'a Graph,
    params: &'a dyn ParamSource,
    input: &SuppliedType<'a, '_>,
    each: &mut dyn FnMut(bind::Source<'a>),
) -> Result<(), ExecError> {
    let mut position = 0;
    for (id, node) in graph.iter() {
        let (kind, name, (dtype, shape)) = match &node.op {
            Op::Input { name } => {
                position += 1;
                let supplied = input(position - 1, name)
                    .ok_or_else(|| ExecError::MissingInput(name.clone()))?;
                ("input", name, supplied)
            }
            Op::Param { name } => {
                let t = params
                    .get(name)
                    .ok_or_else(|| ExecError::MissingParam(name.clone()))?;
                ("param", name, (t.dtype(), t.shape()))
            }
            _ => continue,
        };
        each(bind::Source {
            kind,
            name,
            id,
            ty: &node.ty,
            dtype,
            shape,
        });
    }
    Ok(())
}

/// What was supplied for a source: an input of the caller's type, or a parameter tensor.
enum Supplied<'a, T> {
    Input(&'a T),
    Param(&'a Tensor),
}

/// The size bindings of `graph` for inputs of the given dtypes and shapes (held anywhere: a
/// backend's device values) and `params`, checking every declared type as [`run`] does. The
/// names and shapes may be borrowed (`HashMap<&str, (DType, &[usize])>`: no allocation per
/// input).
pub fn bind_types<K, S>(
    graph: &Graph,
    inputs: &HashMap<K, (DType, S)>,
    params: &dyn ParamSource,
) -> Result<Bindings, ExecError>
where
    K: Borrow<str> + Hash + Eq,
    S: AsRef<[usize]>,
{
    let count = graph
        .iter()
        .filter(|(_, n)| matches!(n.op, Op::Input { .. } | Op::Param { .. }))
        .count();
    let mut sources = Vec::with_capacity(count);
    typed_sources(
        graph,
        inputs,
        params,
        |(d, s)| (*d, s.as_ref()),
        &mut |s, _| sources.push(s),
    )?;
    bind::bind(&sources, &Bindings::new())
}

/// Evaluates one non-source node on host tensors with the size bindings `env` (how a backend
/// runs an op it has no kernel for); the result is checked against the node's declared type.
pub fn eval_node(
    id: ValueId,
    node: &kiln_ir::Node,
    env: &Bindings,
    args: &[&Tensor],
) -> Result<Tensor, ExecError> {
    let ctx = Ctx {
        node: id,
        op: node.op.name(),
        env,
    };
    let out = eval_op(&ctx, &node.op, args)?;
    let expected = ctx.shape(&node.ty.shape)?;
    if out.dtype() != node.ty.dtype || out.shape() != expected.as_slice() {
        return Err(ctx.mismatch(format!(
            "produced {} where {} was declared",
            concrete_type(&out),
            node.ty
        )));
    }
    Ok(out)
}

/// The concrete shape of `node`'s value under the size bindings `env`.
pub fn node_shape(
    id: ValueId,
    node: &kiln_ir::Node,
    env: &Bindings,
) -> Result<Vec<usize>, ExecError> {
    Ctx {
        node: id,
        op: node.op.name(),
        env,
    }
    .shape(&node.ty.shape)
}

/// Moves the output values out of `values` (cloning only a value returned under several names).
fn take_outputs(
    graph: &Graph,
    mut values: Vec<Option<Cow<'_, Tensor>>>,
) -> Result<HashMap<String, Tensor>, ExecError> {
    let mut refs: HashMap<ValueId, usize> = HashMap::new();
    for out in graph.outputs() {
        *refs.entry(out.value).or_default() += 1;
    }
    let mut result = HashMap::new();
    for out in graph.outputs() {
        let left = refs.entry(out.value).or_default();
        *left -= 1;
        let slot = &mut values[out.value.index()];
        let value = if *left == 0 {
            slot.take()
        } else {
            slot.clone()
        };
        let value = value.ok_or_else(|| ExecError::ShapeMismatch {
            node: out.value,
            op: "output",
            detail: format!("output {:?} has no value", out.name),
        })?;
        result.insert(out.name.clone(), value.into_owned());
    }
    Ok(result)
}

/// For each value, the index of the last node reading it (its own index if none does);
/// `usize::MAX` for outputs, which live to the end. A value is freed right after that node.
pub fn last_uses(graph: &Graph) -> Vec<usize> {
    let mut last: Vec<usize> = (0..graph.nodes().len()).collect();
    for (id, node) in graph.iter() {
        for v in &node.inputs {
            last[v.index()] = id.index();
        }
    }
    for out in graph.outputs() {
        last[out.value.index()] = usize::MAX;
    }
    last
}

/// Evaluates one non-source node.
pub(crate) fn eval_op(ctx: &Ctx<'_>, op: &Op, args: &[&Tensor]) -> Result<Tensor, ExecError> {
    match op {
        Op::Input { .. } | Op::Param { .. } => {
            Err(ctx.mismatch("inputs and parameters are bound, not evaluated"))
        }
        Op::Const { value } => elementwise::constant(ctx, value),
        Op::Iota { dtype, shape, axis } => layout::iota(ctx, *dtype, shape, *axis),
        Op::Unary(u) => {
            let [x] = operands(ctx, args)?;
            elementwise::unary(ctx, *u, x)
        }
        Op::Binary(b) => {
            let [x, y] = operands(ctx, args)?;
            elementwise::binary(ctx, *b, x, y)
        }
        Op::Compare(c) => {
            let [x, y] = operands(ctx, args)?;
            elementwise::compare(ctx, *c, x, y)
        }
        Op::Where => {
            let [c, x, y] = operands(ctx, args)?;
            elementwise::select(ctx, c, x, y)
        }
        Op::Cast { to } => {
            let [x] = operands(ctx, args)?;
            Ok(x.cast(*to))
        }
        Op::Reduce { op, axes, keepdim } => {
            let [x] = operands(ctx, args)?;
            reduce::reduce(ctx, *op, axes, *keepdim, x)
        }
        Op::ArgMax { axis, keepdim } => {
            let [x] = operands(ctx, args)?;
            reduce::argmax(ctx, *axis, *keepdim, x)
        }
        Op::TopK { k, axis } => {
            let [x] = operands(ctx, args)?;
            reduce::topk(ctx, *k, *axis, x)
        }
        Op::Softmax { axis } => {
            let [x] = operands(ctx, args)?;
            composite::softmax(ctx, *axis, false, x)
        }
        Op::LogSoftmax { axis } => {
            let [x] = operands(ctx, args)?;
            composite::softmax(ctx, *axis, true, x)
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let [a, b] = operands(ctx, args)?;
            matmul::matmul(ctx, *transpose_a, *transpose_b, a, b)
        }
        Op::Reshape { shape } => {
            let [x] = operands(ctx, args)?;
            layout::reshape(ctx, shape, x)
        }
        Op::Permute { perm } => {
            let [x] = operands(ctx, args)?;
            layout::permute(ctx, perm, x)
        }
        Op::Expand { shape } => {
            let [x] = operands(ctx, args)?;
            layout::expand(ctx, shape, x)
        }
        Op::Slice { axis, start, end } => {
            let [x] = operands(ctx, args)?;
            layout::slice(ctx, *axis, start, end, x)
        }
        Op::Concat { axis } => layout::concat(ctx, *axis, args),
        Op::Gather { axis } => {
            let [d, i] = operands(ctx, args)?;
            layout::gather(ctx, *axis, d, i)
        }
        Op::GatherAlong { axis } => {
            let [d, i] = operands(ctx, args)?;
            layout::gather_along(ctx, *axis, d, i)
        }
        Op::Triangle { upper, diagonal } => {
            let [x] = operands(ctx, args)?;
            layout::triangle(ctx, *upper, diagonal, x)
        }
        Op::RmsNorm { eps } => {
            let [x, w] = operands(ctx, args)?;
            composite::rmsnorm(ctx, eps.0, x, w)
        }
        Op::LayerNorm { eps } => {
            let [x, w, b] = operands(ctx, args)?;
            composite::layernorm(ctx, eps.0, x, w, b)
        }
        Op::Rotary => {
            let [x, cos, sin] = operands(ctx, args)?;
            composite::rotary(ctx, x, cos, sin)
        }
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads,
            rotary,
        } => {
            let (epilogue, arity) = op.linear_arity().unwrap_or_default();
            if args.len() != arity {
                return Err(ctx.mismatch(format!(
                    "linear takes {arity} operand(s), got {}",
                    args.len()
                )));
            }
            let ops = [(*scaled, BinaryOp::Mul), (*added, BinaryOp::Add)];
            let steps: Vec<(BinaryOp, &Tensor)> = ops
                .into_iter()
                .filter_map(|(on, op)| on.then_some(op))
                .zip(args[2..epilogue].iter().copied())
                .collect();
            let y = composite::linear(ctx, *transpose_b, args[0], args[1], &steps)?;
            let tables = rotary.then(|| (args[epilogue], args[epilogue + 1]));
            match *heads {
                0 => Ok(y),
                h => composite::heads(ctx, h, &y, tables),
            }
        }
        Op::PackedLinear { heads, .. } => {
            let groups = op.packed_groups(args.len()).ok_or_else(|| {
                ctx.mismatch(format!(
                    "packed_linear with heads {heads:?} takes other operands than {}",
                    args.len()
                ))
            })?;
            let mut results = Vec::with_capacity(groups.len());
            for (linear, at) in groups {
                let operands: Vec<&Tensor> = at.iter().map(|&i| args[i]).collect();
                results.push(eval_op(ctx, &linear, &operands)?);
            }
            let rank = results[0].shape().len();
            let parts: Vec<&Tensor> = results.iter().collect();
            layout::concat(ctx, rank - 3, &parts)
        }
        Op::SwiGlu {
            transpose_b,
            scaled,
        } => {
            let arity = 3 + 2 * usize::from(*scaled);
            if args.len() != arity {
                return Err(ctx.mismatch(format!(
                    "swiglu takes {arity} operand(s), got {}",
                    args.len()
                )));
            }
            let layer = |j: usize| {
                let scale: Vec<(BinaryOp, &Tensor)> = match scaled {
                    true => vec![(BinaryOp::Mul, args[3 + j])],
                    false => vec![],
                };
                composite::linear(ctx, *transpose_b, args[0], args[1 + j], &scale)
            };
            let (g, u) = (layer(0)?, layer(1)?);
            let silu = elementwise::unary(ctx, UnaryOp::Silu, &g)?;
            elementwise::binary(ctx, BinaryOp::Mul, &silu, &u)
        }
        Op::Attention {
            scale,
            causal,
            window,
            merge_heads,
        } => {
            let spec = composite::AttentionSpec {
                scale: scale.0,
                causal: *causal,
                window: *window,
            };
            let o = match *args {
                [q, k, v] => composite::attention(ctx, spec, q, k, v, None),
                [q, k, v, m] => composite::attention(ctx, spec, q, k, v, Some(m)),
                _ => Err(ctx.mismatch(format!(
                    "attention takes 3 or 4 operands, got {}",
                    args.len()
                ))),
            }?;
            match merge_heads {
                true => composite::merge_heads(ctx, &o),
                false => Ok(o),
            }
        }
        Op::Moe { top_k } => moe::moe(ctx, *top_k, args),
        Op::RefineLogits => refine::refine_logits(ctx, args),
        Op::FusedElementwise { body } => elementwise::fused(ctx, body, args),
    }
}

/// The operands as a fixed-size array.
fn operands<'t, const N: usize>(
    ctx: &Ctx<'_>,
    args: &[&'t Tensor],
) -> Result<[&'t Tensor; N], ExecError> {
    args.try_into()
        .map_err(|_| ctx.mismatch(format!("expected {N} operand(s), got {}", args.len())))
}

/// The node being evaluated, for error messages and evaluating its symbolic attributes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'b> {
    /// The node.
    pub node: ValueId,
    /// Its op mnemonic.
    pub op: &'static str,
    /// The size-symbol bindings.
    pub env: &'b Bindings,
}

impl Ctx<'_> {
    /// `%N (op)`.
    pub fn at(&self) -> String {
        format!("{} ({})", self.node, self.op)
    }

    /// Evaluates a dim that may be negative (a slice bound, a diagonal offset).
    pub fn value(&self, d: &Dim) -> Result<i64, ExecError> {
        d.eval(self.env)
            .map_err(|e| bind::dim_error(e, d, self.at()))
    }

    /// Evaluates a dim that must be a size.
    pub fn size(&self, d: &Dim) -> Result<usize, ExecError> {
        bind::eval_size(d, self.env, || self.at())
    }

    /// Evaluates a shape whose element count must fit in `usize`.
    pub fn shape(&self, s: &[Dim]) -> Result<Vec<usize>, ExecError> {
        self.shape_in(s)
    }

    /// [`Ctx::shape`] collected into `S` (an inline array: no allocation).
    pub fn shape_in<S>(&self, s: &[Dim]) -> Result<S, ExecError>
    where
        S: FromIterator<usize> + std::ops::Deref<Target = [usize]>,
    {
        let shape = s.iter().map(|d| self.size(d)).collect::<Result<S, _>>()?;
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(ExecError::BadDim {
                at: self.at(),
                dim: kiln_ir::shape::DisplayShape(s).to_string(),
                reason: format!("evaluates to {:?}, too many elements", &*shape),
            });
        }
        Ok(shape)
    }

    /// A [`ExecError::ShapeMismatch`] at this node.
    pub fn mismatch(&self, detail: impl Into<String>) -> ExecError {
        ExecError::ShapeMismatch {
            node: self.node,
            op: self.op,
            detail: detail.into(),
        }
    }

    /// A [`ExecError::Unsupported`] at this node.
    pub fn unsupported(&self, dtype: DType) -> ExecError {
        ExecError::Unsupported {
            node: self.node,
            op: self.op,
            dtype,
        }
    }

    /// A tensor of `shape` from `storage`, whose length must match.
    pub fn tensor(&self, shape: Vec<usize>, storage: Storage) -> Result<Tensor, ExecError> {
        Tensor::new(shape, storage).map_err(|e| self.mismatch(e.to_string()))
    }
}

/// The elements widened to f64 (integers rounded beyond 2^53, bool as 0/1).
pub(crate) fn floats(t: &Tensor) -> Vec<f64> {
    match t.storage() {
        Storage::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        s => (0..s.len()).map(|i| s.get(i).as_f64()).collect(),
    }
}

/// The elements widened to i64 (floats truncated, bool as 0/1).
pub(crate) fn ints(t: &Tensor) -> Vec<i64> {
    match t.storage() {
        Storage::I64(v) => v.clone(),
        s => (0..s.len()).map(|i| s.get(i).as_i64()).collect(),
    }
}

/// The elements as bools (non-zero is true).
pub(crate) fn bools(t: &Tensor) -> Vec<bool> {
    match t.storage() {
        Storage::Bool(v) => v.clone(),
        s => (0..s.len()).map(|i| s.get(i).as_bool()).collect(),
    }
}

/// Storage of `dtype` from f64 values, each rounded once to `dtype` (as a cast).
pub(crate) fn from_floats(dtype: DType, values: impl Iterator<Item = f64>) -> Storage {
    Storage::from_scalars(dtype, values.map(Scalar::Float))
}

/// Storage of `dtype` from i64 values, each wrapped to `dtype` (as a cast).
pub(crate) fn from_ints(dtype: DType, values: impl Iterator<Item = i64>) -> Storage {
    Storage::from_scalars(dtype, values.map(Scalar::Int))
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use kiln_ir::{BinaryOp, TensorType, UnaryOp};

    fn f32_ty(dims: Vec<Dim>) -> TensorType {
        TensorType {
            dtype: DType::F32,
            shape: dims,
        }
    }

    /// `y = exp(x) + w` with x: f32[batch, 3], w: f32[3]; outputs y and x itself.
    fn small_graph() -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", f32_ty(vec![Dim::sym("batch"), Dim::fixed(3)]));
        let w = g.param("w", f32_ty(vec![Dim::fixed(3)]));
        let e = g.add(Op::Unary(UnaryOp::Exp), &[x]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[e, w]).unwrap();
        g.add_output("y", y);
        g.add_output("x_again", x);
        g.add_output("y_again", y);
        g
    }

    fn params() -> HashMap<String, Tensor> {
        HashMap::from([("w".to_string(), f32t(&[3], &[1.0, 2.0, 3.0]))])
    }

    #[test]
    fn runs_and_returns_outputs_by_name() {
        let g = small_graph();
        let inputs = HashMap::from([("x".to_string(), f32t(&[2, 3], &[0.0; 6]))]);
        let out = run(&g, &inputs, &params()).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out["y"].as_f32().unwrap(), &[2.0, 3.0, 4.0, 2.0, 3.0, 4.0]);
        assert_eq!(out["y_again"], out["y"]);
        assert_eq!(out["x_again"], inputs["x"]);
    }

    #[test]
    fn input_errors_are_reported_not_panicked() {
        let g = small_graph();
        let none = HashMap::new();
        let e = run(&g, &none, &params()).unwrap_err();
        assert_eq!(e, ExecError::MissingInput("x".into()));
        assert_eq!(e.to_string(), "missing input `x`");

        let inputs = HashMap::from([("x".to_string(), f32t(&[2, 3], &[0.0; 6]))]);
        let e = run(&g, &inputs, &NoParams).unwrap_err();
        assert_eq!(e.to_string(), "missing parameter `w`");

        let mut extra = inputs.clone();
        extra.insert("z".into(), f32t(&[1], &[0.0]));
        let e = run(&g, &extra, &params()).unwrap_err();
        assert_eq!(e.to_string(), "`z` is not an input of the graph");

        let ints = HashMap::from([("x".to_string(), i64t(&[2, 3], &[0; 6]))]);
        let e = run(&g, &ints, &params()).unwrap_err();
        assert_eq!(
            e,
            ExecError::InputType {
                kind: "input",
                name: "x".into(),
                expected: "f32[batch, 3]".into(),
                got: "i64[2, 3]".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "input `x` should be f32[batch, 3] but is i64[2, 3]"
        );

        let wide = HashMap::from([("x".to_string(), f32t(&[2, 4], &[0.0; 8]))]);
        let e = run(&g, &wide, &params()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input `x` should be f32[batch, 3] but is f32[2, 4]"
        );

        let bad_w = HashMap::from([("w".to_string(), f32t(&[4], &[0.0; 4]))]);
        let e = run(&g, &inputs, &bad_w).unwrap_err();
        assert_eq!(e.to_string(), "param `w` should be f32[3] but is f32[4]");
    }

    #[test]
    fn dim_conflict_between_inputs() {
        let mut g = Graph::new();
        let a = g.input("a", f32_ty(vec![Dim::sym("n")]));
        let b = g.input("b", f32_ty(vec![Dim::sym("n")]));
        let s = g.add(Op::Binary(BinaryOp::Add), &[a, b]).unwrap();
        g.add_output("s", s);
        let inputs = HashMap::from([
            ("a".to_string(), f32t(&[2], &[0.0; 2])),
            ("b".to_string(), f32t(&[3], &[0.0; 3])),
        ]);
        let e = run(&g, &inputs, &NoParams).unwrap_err();
        assert!(
            matches!(e, ExecError::DimConflict { ref sym, first_value: 2, second_value: 3, .. } if sym == "n")
        );
        assert_eq!(
            e.to_string(),
            "size symbol `n` is 2 from input `a` axis 0 but 3 from input `b` axis 0"
        );
    }

    #[test]
    fn invalid_graphs_and_unbound_symbols() {
        let mut g = Graph::new();
        let x = g.input("x", f32_ty(vec![Dim::fixed(2)]));
        g.push(kiln_ir::Node {
            op: Op::Unary(UnaryOp::Exp),
            inputs: vec![x],
            ty: f32_ty(vec![Dim::fixed(3)]),
        });
        let inputs = HashMap::from([("x".to_string(), f32t(&[2], &[0.0; 2]))]);
        let e = run(&g, &inputs, &NoParams).unwrap_err();
        assert!(matches!(e, ExecError::Invalid(_)));
        assert!(
            e.to_string().starts_with("invalid graph at %1 (exp)"),
            "{e}"
        );

        // `m` only appears in an iota's shape: unbound unless given explicitly.
        let mut g = Graph::new();
        let i = g
            .add(
                Op::Iota {
                    dtype: DType::I64,
                    shape: vec![Dim::sym("m")],
                    axis: 0,
                },
                &[],
            )
            .unwrap();
        g.add_output("i", i);
        let e = run(&g, &HashMap::new(), &NoParams).unwrap_err();
        assert_eq!(
            e.to_string(),
            "size symbol `m` is not bound (needed by %0 (iota))"
        );
        let env = Bindings::from([("m".to_string(), 3)]);
        let out = run_with_bindings(&g, &HashMap::new(), &NoParams, &env).unwrap();
        assert_eq!(out["i"].as_i64().unwrap(), &[0, 1, 2]);
        let env = Bindings::from([("m".to_string(), -1)]);
        let e = run_with_bindings(&g, &HashMap::new(), &NoParams, &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%0 (iota): dimension m evaluates to -1, a negative size"
        );

        // Absurd sizes are an error, not an arithmetic overflow.
        let mut g = Graph::new();
        let m = Dim::sym("m");
        let i = g
            .add(
                Op::Iota {
                    dtype: DType::I64,
                    shape: vec![m.clone(), m.clone(), m],
                    axis: 0,
                },
                &[],
            )
            .unwrap();
        g.add_output("i", i);
        let env = Bindings::from([("m".to_string(), 1 << 30)]);
        let e = run_with_bindings(&g, &HashMap::new(), &NoParams, &env).unwrap_err();
        assert!(matches!(e, ExecError::BadDim { .. }), "{e}");
        assert!(e.to_string().contains("too many elements"), "{e}");
    }

    #[test]
    fn values_are_freed_after_their_last_use() {
        let g = small_graph();
        // %0 x (an output), %1 w (read by %3), %2 exp (read by %3), %3 add (an output).
        assert_eq!(last_uses(&g), vec![usize::MAX, 3, 3, usize::MAX]);
        let mut g = Graph::new();
        let x = g.input("x", f32_ty(vec![Dim::fixed(2)]));
        let unused = g.add(Op::Unary(UnaryOp::Neg), &[x]).unwrap();
        let y = g.add(Op::Unary(UnaryOp::Exp), &[x]).unwrap();
        g.add_output("y", y);
        assert_eq!(last_uses(&g), vec![2, unused.index(), usize::MAX]);
    }

    #[test]
    fn long_chains() {
        // 100 nodes over a 1000-element input, each value dropped once its readers ran.
        let mut g = Graph::new();
        let mut v = g.input("x", f32_ty(vec![Dim::fixed(1000)]));
        for _ in 0..50 {
            let e = g.add(Op::Unary(UnaryOp::Neg), &[v]).unwrap();
            v = g.add(Op::Binary(BinaryOp::Add), &[e, v]).unwrap();
        }
        g.add_output("y", v);
        let inputs = HashMap::from([("x".to_string(), f32t(&[1000], &[1.0; 1000]))]);
        let out = run(&g, &inputs, &NoParams).unwrap();
        assert!(out["y"].as_f32().unwrap().iter().all(|&y| y == 0.0));
    }
}

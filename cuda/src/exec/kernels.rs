//! The generated (NVRTC) kernels the executor launches, built from dtypes and concrete shapes
//! alone, with no device: elementwise bodies over broadcast operands, layout ops as strided
//! copies (the identity body over a strided operand), and the casts around the bf16 attention
//! and fp8 linear kernels. [`generated`] lists every one a run with given bindings launches, so
//! the test suite compiles them for sm_80 and sm_90 on a machine without a GPU.

use super::select::{Plan, Step};
use crate::codegen::elementwise::{broadcast_strides, ArgLayout, Elementwise, Plan as EwPlan};
use kiln_ir::{BinaryOp, Bindings, DType, Expr, Graph, Literal, Op};
use kiln_runtime::reference::{self, ExecError};

/// A generated kernel with its `meta` (output dims, then strided operands' strides).
pub type Kernel = (Elementwise, Vec<i64>);

/// `body` over operands of these dtypes and shapes (numpy broadcasting) into `shape`, or `None`
/// when they do not broadcast to it.
pub fn elementwise(body: &Expr, args: &[(DType, &[usize])], shape: &[usize]) -> Option<Kernel> {
    let shapes: Vec<&[usize]> = args.iter().map(|a| a.1).collect();
    let plan = EwPlan::new(&shapes).ok()?;
    if plan.out != shape {
        return None;
    }
    let ew = Elementwise {
        body: body.clone(),
        args: args.iter().map(|a| a.0).collect(),
        layouts: plan.layouts,
        rank: shape.len(),
    };
    Some((ew, plan.meta))
}

/// Row-major strides of `shape`.
fn dense_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i] as i64;
    }
    s
}

/// A permute, slice or expand of a dense `x` as a strided copy into `shape`: the kernel and
/// the element offset of the first element read.
pub fn layout(
    op: &Op,
    env: &Bindings,
    dtype: DType,
    x: &[usize],
    shape: &[usize],
) -> Result<Option<(Kernel, i64)>, ExecError> {
    let st = dense_strides(x);
    let (offset, strides) = match op {
        Op::Permute { perm } => (0, perm.iter().map(|&p| st[p]).collect::<Vec<i64>>()),
        Op::Slice { axis, start, .. } => {
            let s = start.eval(env).map_err(|e| ExecError::ShapeMismatch {
                node: kiln_ir::ValueId(0),
                op: "slice",
                detail: e.to_string(),
            })?;
            (s * st[*axis], st.clone())
        }
        Op::Expand { .. } => match broadcast_strides(x, shape) {
            Some(s) => (0, s),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    if strides.len() != shape.len() || offset < 0 {
        return Ok(None);
    }
    let ew = Elementwise {
        body: Expr::Arg(0),
        args: vec![dtype],
        layouts: vec![ArgLayout::Strided],
        rank: shape.len(),
    };
    let mut meta: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    meta.extend(strides);
    Ok(Some(((ew, meta), offset)))
}

/// `cast(x, to)`.
pub fn cast(to: DType) -> Expr {
    Expr::Cast(to, Box::new(Expr::Arg(0)))
}

/// An additive attention mask of `dtype` to bf16, with -inf and f32::MIN clamped to -1e30
/// (finite in bf16, where f32::MIN would round to -inf): a fully masked row then averages its
/// values as the reference does with finite masks, instead of turning into NaN (which would
/// reach other rows through 0 · NaN in the value products).
pub fn mask_to_bf16(dtype: DType) -> Expr {
    let floor = Expr::Const(Literal::scalar(dtype, -1e30));
    let clamped = Expr::Binary(BinaryOp::Max, Box::new(Expr::Arg(0)), Box::new(floor));
    Expr::Cast(DType::BF16, Box::new(clamped))
}

/// Every generated kernel a run of `graph` (planned as `plan`) with the size bindings `env`
/// launches, in node order (with repeats).
pub fn generated(graph: &Graph, plan: &Plan, env: &Bindings) -> Result<Vec<Kernel>, ExecError> {
    let ty = |v: kiln_ir::ValueId| -> Result<(DType, Vec<usize>), ExecError> {
        let n = graph.node(v).ok_or_else(|| ExecError::ShapeMismatch {
            node: v,
            op: "operand",
            detail: "no such node".into(),
        })?;
        Ok((n.ty.dtype, reference::node_shape(v, n, env)?))
    };
    let mut out = Vec::new();
    for (id, node) in graph.iter() {
        let step = &plan.steps[id.index()];
        let shape = || reference::node_shape(id, node, env);
        match step {
            Step::Elementwise(body) => {
                let args = node
                    .inputs
                    .iter()
                    .map(|v| ty(*v))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<(DType, &[usize])> =
                    args.iter().map(|(d, s)| (*d, s.as_slice())).collect();
                out.extend(elementwise(body, &refs, &shape()?));
            }
            Step::Layout => {
                let (d, x) = ty(node.inputs[0])?;
                out.extend(layout(&node.op, env, d, &x, &shape()?)?.map(|k| k.0));
            }
            Step::Attention { qkv, .. } => {
                if let Some(&m) = node.inputs.get(3) {
                    let (d, s) = ty(m)?;
                    out.extend(elementwise(&mask_to_bf16(d), &[(d, &s)], &s));
                }
                let (_, q) = ty(qkv[0])?;
                out.extend(elementwise(
                    &cast(DType::F32),
                    &[(DType::BF16, &q)],
                    &shape()?,
                ));
            }
            Step::Linear { input, .. } => {
                let w = graph.node(node.inputs[1]).and_then(|n| match n.op {
                    Op::Cast { .. } => graph.node(n.inputs[0]),
                    _ => Some(n),
                });
                if let Some(w) = w.filter(|w| w.ty.dtype == DType::F8E4M3) {
                    let n: usize = reference::node_shape(node.inputs[1], w, env)?
                        .iter()
                        .product();
                    let (d, x) = ty(*input)?;
                    out.extend(elementwise(&cast(DType::BF16), &[(w.ty.dtype, &[n])], &[n]));
                    out.extend(elementwise(&cast(DType::BF16), &[(d, &x)], &x));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

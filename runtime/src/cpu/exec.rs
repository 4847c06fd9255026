//! The run loop of the CPU backend: binds sizes from the inputs, walks the plan's steps in node
//! order with values in reusable f32 buffers, and returns the graph's outputs as tensors.

use super::plan::{Plan, Step};
use super::slots::SlotPlan;
use super::weights::Weights;
use crate::reference::{self, bind, Ctx, ExecError, ParamSource};
use crate::{Storage, Tensor};
use kiln_ir::{f8, verify, Bindings, DType, Graph, Node, ValueId};
use kiln_kernels::gemm::{matmul_f32, matmul_f32_batched, BatchStrides, Gemm};
use kiln_kernels::{gemm_bf16, gemv, rowwise, KernelError};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A graph ready to run on the CPU: its plan, memory plan and prepared weights, and the
/// buffers it reuses from run to run.
#[derive(Debug)]
pub struct CpuGraph {
    graph: Graph,
    plan: Plan,
    slots: SlotPlan,
    weights: Arc<Weights>,
    buffers: Mutex<Vec<Vec<f32>>>,
}

/// A value during a run.
enum Val<'a> {
    /// Not computed yet, or freed.
    Empty,
    /// A supplied input or parameter, possibly viewed under another shape (a reshape).
    Ext(&'a Tensor, Vec<usize>),
    /// Widened f32 elements in a buffer slot, under this shape.
    Buf(usize, Vec<usize>),
    /// A computed non-float value (ids, masks).
    Host(Tensor),
}

impl CpuGraph {
    /// Plans `graphs` (verified first) over `params`, sharing one set of prepared weights.
    pub fn compile(
        graphs: Vec<Graph>,
        params: &dyn ParamSource,
    ) -> Result<Vec<CpuGraph>, ExecError> {
        for g in &graphs {
            verify(g)?;
        }
        let plans: Vec<Plan> = graphs.iter().map(Plan::new).collect();
        let weights = Arc::new(Weights::prepare(&plans.iter().collect::<Vec<_>>(), params));
        Ok(graphs
            .into_iter()
            .zip(plans)
            .map(|(graph, plan)| {
                let slots = SlotPlan::new(&graph, &plan);
                CpuGraph {
                    buffers: Mutex::new(vec![Vec::new(); slots.count]),
                    graph,
                    plan,
                    slots,
                    weights: weights.clone(),
                }
            })
            .collect())
    }

    /// The graph this runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The kernel plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Bytes of the weights prepared at load (shared with the graphs compiled together).
    pub fn prepared_weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// The size bindings `inputs` and `params` give (checking every declared type).
    pub fn bind(
        &self,
        inputs: &HashMap<String, Tensor>,
        params: &dyn ParamSource,
    ) -> Result<Bindings, ExecError> {
        let sources = reference::sources(&self.graph, inputs, params)?;
        bind::bind(&sources, &Bindings::new())
    }

    /// Peak bytes of activation buffers a run with these bindings needs.
    pub fn activation_bytes(&self, env: &Bindings) -> Result<usize, ExecError> {
        let mut elems = vec![None; self.graph.nodes().len()];
        for (id, node) in self.graph.iter() {
            if self.slots.slot[id.index()].is_some() {
                let ctx = ctx(id, node, env);
                elems[id.index()] = Some(ctx.shape(&node.ty.shape)?.iter().product::<usize>());
            }
        }
        Ok(self.slots.peak_bytes(|i| elems[i]))
    }

    /// Refuses a run whose buffers would outgrow the memory available, before growing them.
    fn check_memory(&self, env: &Bindings, bufs: &[Vec<f32>]) -> Result<(), ExecError> {
        let needed = self.activation_bytes(env)?;
        let held: usize = bufs.iter().map(|b| b.capacity() * 4).sum();
        if needed <= held {
            return Ok(());
        }
        match available_memory() {
            Some(available) if needed - held > available => Err(ExecError::OutOfMemory {
                needed,
                available,
                detail: format!(
                    "{} buffers for {} nodes",
                    self.slots.count,
                    self.graph.nodes().len()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Runs the graph on `inputs` and `params` (the parameters it was compiled with); returns
    /// the outputs by name.
    pub fn run(
        &self,
        inputs: &HashMap<String, Tensor>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Tensor>, ExecError> {
        let sources = reference::sources(&self.graph, inputs, params)?;
        let env = bind::bind(&sources, &Bindings::new())?;
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let bufs: &mut Vec<Vec<f32>> = &mut guard;
        self.check_memory(&env, bufs)?;
        let mut vals: Vec<Val<'_>> = (0..self.graph.nodes().len()).map(|_| Val::Empty).collect();
        for s in &sources {
            vals[s.id.index()] = Val::Ext(s.tensor, s.tensor.shape().to_vec());
        }
        let last_use = reference::last_uses(&self.graph);
        for (id, node) in self.graph.iter() {
            let i = id.index();
            let step = &self.plan.steps[i];
            if !matches!(step, Step::Source | Step::Skip) {
                let ctx = ctx(id, node, &env);
                let shape = ctx.shape(&node.ty.shape)?;
                vals[i] = self.eval(&ctx, node, step, shape, &vals, bufs)?;
            }
            for v in node.inputs.iter().chain([&id]) {
                if last_use[v.index()] == i && !matches!(vals[v.index()], Val::Buf(..)) {
                    vals[v.index()] = Val::Empty;
                }
            }
        }
        let mut out = HashMap::new();
        for o in self.graph.outputs() {
            let node = self
                .graph
                .node(o.value)
                .ok_or_else(|| ExecError::ShapeMismatch {
                    node: o.value,
                    op: "output",
                    detail: format!("output {:?} has no node", o.name),
                })?;
            let t = to_tensor(&vals[o.value.index()], node.ty.dtype, bufs).ok_or_else(|| {
                ExecError::ShapeMismatch {
                    node: o.value,
                    op: "output",
                    detail: format!("output {:?} has no value", o.name),
                }
            })?;
            out.insert(o.name.clone(), t.into_owned());
        }
        Ok(out)
    }

    /// Computes one node: its step's kernel when the operands fit it, else the reference op.
    fn eval<'a>(
        &self,
        ctx: &Ctx<'_>,
        node: &Node,
        step: &Step,
        shape: Vec<usize>,
        vals: &[Val<'a>],
        bufs: &mut [Vec<f32>],
    ) -> Result<Val<'a>, ExecError> {
        let slot = self.slots.slot[ctx.node.index()];
        let arg = |k: usize| &vals[node.inputs[k].index()];
        if *step == Step::Alias {
            match arg(0) {
                Val::Buf(s, _) => return Ok(Val::Buf(*s, shape)),
                Val::Ext(t, _) if t.dtype() == DType::F32 => return Ok(Val::Ext(t, shape)),
                _ => {}
            }
        }
        if let Some(s) = slot {
            let mut out = std::mem::take(&mut bufs[s]);
            out.resize(shape.iter().product(), 0.0);
            let done = self.kernel(ctx, node, step, &shape, vals, bufs, &mut out);
            bufs[s] = out;
            if done? {
                return Ok(Val::Buf(s, shape));
            }
        }
        // The reference op on this node alone.
        let args = node
            .inputs
            .iter()
            .map(|v| {
                let dtype = self.graph.node(*v).map_or(DType::F32, |n| n.ty.dtype);
                to_tensor(&vals[v.index()], dtype, bufs)
                    .ok_or_else(|| ctx.mismatch(format!("operand {v} is not available")))
            })
            .collect::<Result<Vec<Cow<'_, Tensor>>, _>>()?;
        let refs: Vec<&Tensor> = args.iter().map(|c| c.as_ref()).collect();
        let t = reference::eval_op(ctx, &node.op, &refs)?;
        match slot {
            Some(s) => {
                let out = &mut bufs[s];
                out.clear();
                match t.storage() {
                    Storage::F32(v) => out.extend_from_slice(v),
                    st => out.extend((0..st.len()).map(|i| st.get(i).as_f64() as f32)),
                }
                Ok(Val::Buf(s, t.shape().to_vec()))
            }
            None => Ok(Val::Host(t)),
        }
    }

    /// Runs `step`'s kernel into `out` (sized for the result); `Ok(false)` when the operands do
    /// not fit the kernel (the caller then runs the reference op).
    #[allow(clippy::too_many_arguments)]
    fn kernel(
        &self,
        ctx: &Ctx<'_>,
        node: &Node,
        step: &Step,
        shape: &[usize],
        vals: &[Val<'_>],
        bufs: &[Vec<f32>],
        out: &mut [f32],
    ) -> Result<bool, ExecError> {
        let f32s = |k: usize| -> Option<(&[f32], &[usize])> {
            f32_data(&vals[node.inputs.get(k)?.index()], bufs)
        };
        let kerr = |e: KernelError| ctx.mismatch(e.to_string());
        match step {
            Step::Round(to) => {
                let Some((x, _)) = f32s(0) else {
                    return Ok(false);
                };
                round_into(*to, x, out);
            }
            Step::Linear { weight, transposed } => {
                let Some((x, xs)) = f32s(0) else {
                    return Ok(false);
                };
                let k = xs.last().copied().unwrap_or(0);
                let n = shape.last().copied().unwrap_or(0);
                if k == 0 || n == 0 {
                    out.fill(0.0);
                    return Ok(true);
                }
                let m = x.len() / k;
                if let Some(w) = self.weights.packed(weight, *transposed) {
                    if w.n() != n || w.k() != k {
                        return Ok(false);
                    }
                    gemm_bf16::matmul_bf16(m, x, w, out).map_err(kerr)?;
                } else {
                    let Some((w, _)) = f32s(1) else {
                        return Ok(false);
                    };
                    if m == 1 && *transposed {
                        gemv::gemv_f32(n, k, w, x, out).map_err(kerr)?;
                    } else {
                        matmul_f32(&Gemm::dense(m, n, k, false, *transposed), x, w, out)
                            .map_err(kerr)?;
                    }
                }
            }
            Step::MatMul { ta, tb } => {
                let (Some((a, sa)), Some((b, sb))) = (f32s(0), f32s(1)) else {
                    return Ok(false);
                };
                return matmul(*ta, *tb, a, sa, b, sb, shape, out).map_err(kerr);
            }
            Step::RmsNorm { eps } => {
                let (Some((x, _)), Some((w, _))) = (f32s(0), f32s(1)) else {
                    return Ok(false);
                };
                let cols = shape.last().copied().unwrap_or(0);
                if cols == 0 || w.len() != cols {
                    return Ok(false);
                }
                rowwise::rmsnorm(x.len() / cols, cols, x, w, *eps, out).map_err(kerr)?;
            }
            Step::Softmax => {
                let Some((x, _)) = f32s(0) else {
                    return Ok(false);
                };
                let cols = shape.last().copied().unwrap_or(0);
                if cols == 0 {
                    return Ok(false);
                }
                rowwise::softmax(x.len() / cols, cols, x, out).map_err(kerr)?;
            }
            Step::Embedding => {
                let Some((table, ts)) = f32s(0) else {
                    return Ok(false);
                };
                let Some(ids) = ints(&vals[node.inputs[1].index()]) else {
                    return Ok(false);
                };
                let (rows, cols) = (ts[0], ts[1]);
                for (o, &id) in out.chunks_exact_mut(cols.max(1)).zip(ids.iter()) {
                    let r = usize::try_from(id).ok().filter(|&r| r < rows).ok_or(
                        ExecError::IndexOutOfRange {
                            node: ctx.node,
                            op: ctx.op,
                            index: id,
                            size: rows,
                        },
                    )?;
                    o.copy_from_slice(&table[r * cols..(r + 1) * cols]);
                }
            }
            Step::Source | Step::Skip | Step::Alias | Step::Reference => return Ok(false),
        }
        Ok(true)
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (None where there is no such file).
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The node's evaluation context.
fn ctx<'e>(id: ValueId, node: &Node, env: &'e Bindings) -> Ctx<'e> {
    Ctx {
        node: id,
        op: node.op.name(),
        env,
    }
}

/// A value's f32 elements and shape, if it has them without conversion.
fn f32_data<'v>(v: &'v Val<'_>, bufs: &'v [Vec<f32>]) -> Option<(&'v [f32], &'v [usize])> {
    match v {
        Val::Ext(t, shape) => t.as_f32().map(|d| (d, shape.as_slice())),
        Val::Buf(s, shape) => {
            let n: usize = shape.iter().product();
            bufs.get(*s)
                .and_then(|b| b.get(..n))
                .map(|d| (d, shape.as_slice()))
        }
        _ => None,
    }
}

/// A value's i64 elements, if it is an i64 tensor.
fn ints<'v>(v: &'v Val<'_>) -> Option<&'v [i64]> {
    match v {
        Val::Ext(t, _) => t.as_i64(),
        Val::Host(t) => t.as_i64(),
        _ => None,
    }
}

/// A value as a tensor of its logical `dtype` (borrowed when it already is one).
fn to_tensor<'v>(v: &'v Val<'_>, dtype: DType, bufs: &[Vec<f32>]) -> Option<Cow<'v, Tensor>> {
    match v {
        Val::Empty => None,
        Val::Ext(t, shape) if t.shape() == shape.as_slice() => Some(Cow::Borrowed(*t)),
        Val::Ext(t, shape) => Tensor::new(shape.clone(), t.storage().clone())
            .ok()
            .map(Cow::Owned),
        Val::Host(t) => Some(Cow::Borrowed(t)),
        Val::Buf(s, shape) => {
            let n: usize = shape.iter().product();
            let data = bufs.get(*s)?.get(..n)?.to_vec();
            let t = Tensor::from_f32(shape.clone(), data).ok()?;
            Some(Cow::Owned(if dtype == DType::F32 {
                t
            } else {
                t.cast(dtype)
            }))
        }
    }
}

/// Rounds f32 values to `to` (a float dtype), keeping them widened.
fn round_into(to: DType, x: &[f32], out: &mut [f32]) {
    let round: fn(f32) -> f32 = match to {
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        DType::F8E4M3 => |v| f8::f8e4m3_to_f32(f8::f32_to_f8e4m3(v)),
        DType::F8E5M2 => |v| f8::f8e5m2_to_f32(f8::f32_to_f8e5m2(v)),
        _ => |v| v,
    };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = round(v);
    }
}

/// A batched product of activations `a[.., m, k] · b[.., k, n]` whose batch axes are equal or
/// one side has a single matrix; `Ok(false)` for other broadcasts.
#[allow(clippy::too_many_arguments)]
fn matmul(
    ta: bool,
    tb: bool,
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    shape: &[usize],
    out: &mut [f32],
) -> Result<bool, KernelError> {
    let (ra, rb, rc) = (sa.len(), sb.len(), shape.len());
    if ra < 2 || rb < 2 || rc < 2 {
        return Ok(false);
    }
    let (m, n) = (shape[rc - 2], shape[rc - 1]);
    let k = if ta { sa[ra - 2] } else { sa[ra - 1] };
    let batch: usize = shape[..rc - 2].iter().product();
    let per = |s: &[usize]| s[..s.len() - 2].iter().product::<usize>();
    let stride = |s: &[usize], r: usize| -> Option<usize> {
        if r > rc {
            return None;
        }
        match per(s) {
            1 => Some(0),
            p if p == batch && s[..r - 2] == shape[rc - r..rc - 2] => Some(s[r - 2] * s[r - 1]),
            _ => None,
        }
    };
    let (Some(a_stride), Some(b_stride)) = (stride(sa, ra), stride(sb, rb)) else {
        return Ok(false);
    };
    let p = Gemm::dense(m, n, k, ta, tb);
    if batch == 1 {
        matmul_f32(&p, a, b, out)?;
    } else {
        let strides = BatchStrides {
            a: a_stride,
            b: b_stride,
            c: m * n,
        };
        matmul_f32_batched(&p, batch, strides, a, b, out)?;
    }
    Ok(true)
}

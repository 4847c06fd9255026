//! The run loop of the CPU backend: binds sizes from the inputs, walks the plan's steps in node
//! order with values in reusable f32 buffers, and returns the graph's outputs as tensors.
//!
//! A steady decode step through [`CpuGraph::run_indexed`] allocates nothing
//! (`tests/decode_allocations.rs` counts it): layouts and shapes are inline arrays
//! ([`super::layout::Dims`]), a linear group's operands sit in inline vectors, the kernels keep
//! their scratch per thread, the run loop keeps its per-run vectors, maps and size bindings
//! between runs ([`Scratch`]), constants are computed once when compiled, the attention mask's
//! integer nodes have kernels ([`super::host`]), inputs and outputs go by position, a state's
//! handle is reused for the next state and a host f32 output is rewritten in place. The
//! by-name entry points ([`CpuGraph::run`], [`CpuGraph::run_values`]) allocate their maps.

use super::advice::HugePages;
use super::external::{Operand, Provider};
use super::host;
use super::layout::{Dims, Layout, MAX_RANK};
use super::legalize::legalize;
use super::moe::{moe_f32, MoeData};
use super::plan::{self, LinearLayer, MoeWeight, Plan, Step};
use super::slots::SlotPlan;
use super::state::{grown_capacity, narrow, narrow_mut, stored_narrow, CpuState};
use super::weights::{self, Weights};
use crate::executor::{output_positions, DeviceValue, NeededNodes, Value};
use crate::profile::Profile;
use crate::reference::{self, bind, Ctx, ExecError, ParamSource};
use crate::tensor::Elements;
use crate::{Storage, Tensor};
use half::bf16;
use kiln_ir::{verify, Bindings, DType, Graph, Node, Op, ValueId};
use kiln_kernels::attention::{
    attention_bf16_kv, attention_f32, AttnOptions, AttnShape, MaskView, Strided, Strides4,
};
use kiln_kernels::gemm::{matmul_f32, matmul_f32_batched, BatchStrides, Gemm};
use kiln_kernels::gemm_bf16::PackedBf16;
use kiln_kernels::layout::{copy_strided, copy_strided_convert};
use kiln_kernels::linear::{linear, Gate, Layer, Rope, Weight};
use kiln_kernels::rope::rope_rotate_half;
use kiln_kernels::{pages, recycle, refine, rowwise, KernelError};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A graph ready to run on the CPU: its plan, memory plan and prepared weights, and the
/// buffers it reuses from run to run.
#[derive(Debug)]
pub struct CpuGraph {
    graph: Graph,
    plan: Plan,
    slots: SlotPlan,
    /// Per node: the last node reading it, in the graph or in the plan ([`last_uses`]).
    last_use: Vec<usize>,
    /// The node of the linear group step computing a layer at another node.
    group_of: HashMap<usize, usize>,
    /// The nodes each set of wanted outputs needs.
    needed: NeededNodes,
    /// Per node: a constant's value, computed once when compiled (a run reads it in place).
    consts: Vec<Option<Tensor>>,
    weights: Arc<Weights>,
    /// The huge-page advice for the weights, shared by the graphs compiled together.
    huge_pages: Arc<HugePages>,
    scratch: Mutex<Scratch>,
    /// With `KILN_PROFILE` set: seconds and calls per kind of step, over all runs.
    profile: Option<Profile>,
}

/// Per layer of a linear group: inline for groups of up to four layers (a fused QKV has three),
/// so a decode step's linear steps do not allocate.
type Group<T> = SmallVec<[T; 4]>;

/// A value during a run.
enum Val<'a> {
    /// Not computed yet, or freed.
    Empty,
    /// A supplied input or parameter, possibly viewed under another shape (a reshape).
    Ext(&'a Tensor, Dims),
    /// Widened f32 elements in a buffer slot, dense or strided.
    Buf(usize, Layout),
    /// bf16 elements packed in a state's buffer slot ([`super::state::narrow`]), dense or
    /// strided; the value is their f32 widening.
    Narrow(usize, Layout),
    /// A computed non-float value (ids, masks).
    Host(Tensor),
}

/// Where a state's buffer (a slot past the slot plan's) stands during a run.
struct StateSlot {
    axis: usize,
    /// The filled part: an append must start from exactly this view.
    layout: Layout,
    capacity: usize,
}

/// The values of one run and the states among its buffers.
struct Run<'a> {
    vals: Vec<Val<'a>>,
    /// By buffer index.
    states: HashMap<usize, StateSlot>,
    /// Outputs computed by `concat` become states.
    keep_states: bool,
    /// Per node, whether the outputs asked for need it (`None`: all outputs were).
    needed: Option<Arc<Vec<bool>>>,
}

impl<'a> Run<'a> {
    /// Moves `state`'s buffer in as a new buffer; its value (the filled part).
    fn add_state(&mut self, bufs: &mut Vec<Vec<f32>>, state: CpuState) -> Val<'a> {
        let (axis, capacity, narrow) = (state.axis(), state.capacity(), state.is_narrow());
        let (data, layout) = state.into_parts();
        let s = bufs.len();
        bufs.push(data);
        self.states.insert(
            s,
            StateSlot {
                axis,
                layout,
                capacity,
            },
        );
        if narrow {
            Val::Narrow(s, layout)
        } else {
            Val::Buf(s, layout)
        }
    }
}

/// What a graph keeps from run to run, so that a steady decode step allocates nothing: the
/// buffers, and the run loop's per-run vectors and maps, emptied after each run.
#[derive(Default)]
struct Scratch {
    bufs: Vec<Vec<f32>>,
    /// Per node: its value during a run.
    vals: Vec<Val<'static>>,
    /// Per node: its concrete shape during a run.
    shapes: Vec<Dims>,
    states: HashMap<usize, StateSlot>,
    /// The size bindings of the last run.
    env: Bindings,
    sources: Vec<bind::Source<'static>>,
    /// Per input position: the state supplied for it, until the run moves it into a buffer.
    taken: Vec<Option<CpuState>>,
    /// The handles of the states the inputs brought, emptied: the outputs' states go back in
    /// them.
    handles: Vec<Arc<CpuState>>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} buffers", self.bufs.len())
    }
}

impl CpuGraph {
    /// Plans `graphs` (verified first) over `params`, sharing one set of prepared weights.
    pub fn compile(
        graphs: Vec<Graph>,
        params: &dyn ParamSource,
    ) -> Result<Vec<CpuGraph>, ExecError> {
        CpuGraph::compile_with(graphs, params, None)
    }

    /// [`CpuGraph::compile`], with the kernels `provider` accepts in place of native ones.
    pub fn compile_with(
        graphs: Vec<Graph>,
        params: &dyn ParamSource,
        provider: Option<&Arc<Provider>>,
    ) -> Result<Vec<CpuGraph>, ExecError> {
        for g in &graphs {
            verify(g)?;
            check_ranks(g)?;
        }
        let graphs: Vec<Graph> = graphs.iter().map(legalize).collect();
        let plans: Vec<Plan> = graphs
            .iter()
            .map(|g| Plan::with_provider(g, provider))
            .collect();
        let weights = Arc::new(Weights::prepare(&plans.iter().collect::<Vec<_>>(), params));
        let huge_pages = Arc::new(streamed_weights(&plans, params, &weights));
        Ok(graphs
            .into_iter()
            .zip(plans)
            .map(|(graph, plan)| {
                let slots = SlotPlan::new(&graph, &plan);
                CpuGraph {
                    consts: constants(&graph),
                    last_use: last_uses(&graph, &plan),
                    group_of: group_of(&plan),
                    needed: NeededNodes::default(),
                    scratch: Mutex::new(Scratch {
                        bufs: vec![Vec::new(); slots.count],
                        ..Scratch::default()
                    }),
                    profile: Profile::from_env(),
                    graph,
                    plan,
                    slots,
                    weights: weights.clone(),
                    huge_pages: huge_pages.clone(),
                }
            })
            .collect())
    }

    /// The graph this runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// With `KILN_PROFILE` set in the environment when compiled: time and calls per kind of
    /// step over all runs so far, longest first.
    pub fn profile(&self) -> Option<Vec<(String, f64, usize)>> {
        self.profile.as_ref().map(Profile::report)
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
        bind::bind(&source_types(&sources), &Bindings::new())
    }

    /// Peak bytes of activation buffers a run with these bindings needs.
    pub fn activation_bytes(&self, env: &Bindings) -> Result<usize, ExecError> {
        let mut shapes = Vec::new();
        self.shapes(env, &mut shapes)?;
        Ok(self.buffer_bytes(&shapes))
    }

    /// The concrete shape of every computed node (empty for sources and skipped nodes), into
    /// `shapes`.
    fn shapes(&self, env: &Bindings, shapes: &mut Vec<Dims>) -> Result<(), ExecError> {
        shapes.clear();
        for (id, node) in self.graph.iter() {
            shapes.push(match self.plan.steps[id.index()] {
                Step::Source | Step::Skip => Dims::default(),
                _ => ctx(id, node, env).shape_in(&node.ty.shape)?,
            });
        }
        Ok(())
    }

    /// Bytes of the buffers for values of these shapes (views and aliases hold none of their
    /// own).
    fn buffer_bytes(&self, shapes: &[Dims]) -> usize {
        let nodes = self.graph.nodes();
        self.slots.peak_bytes(|i| {
            self.plan.steps[i]
                .owns_buffer(&nodes[i])
                .then(|| shapes[i].iter().product())
        })
    }

    /// Refuses a run whose buffers would outgrow the memory available, before growing them.
    fn check_memory(&self, shapes: &[Dims], bufs: &[Vec<f32>]) -> Result<(), ExecError> {
        let needed = self.buffer_bytes(shapes);
        let held: usize = bufs.iter().map(|b| b.capacity() * 4).sum();
        if needed <= held {
            return Ok(());
        }
        match available_memory() {
            Some(available) if needed - held > available => Err(ExecError::OutOfMemory {
                needed,
                available,
                detail: format!(
                    "activation buffers: {} for {} nodes",
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
        reference::check_known_inputs(&self.graph, inputs.keys())?;
        let outputs = self.graph.outputs();
        let mut out = vec![None; outputs.len()];
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let host = |_: usize, name: &str| inputs.get(name);
        self.execute(&host, &mut guard, false, None, params, &mut out)?;
        drop(guard);
        outputs
            .iter()
            .zip(out)
            .filter_map(|(o, v)| Some((o.name.clone(), v?)))
            .map(|(name, v)| Ok((name, v.into_host()?)))
            .collect()
    }

    /// [`run`](Self::run) with values: a [`CpuState`] this graph (or one compiled with it)
    /// returned is run in place, and outputs computed by `concat` come back as states with
    /// room to grow (see [`super::state`]); other outputs are host tensors. With `wanted`,
    /// only those outputs are returned and only the steps they need run.
    pub fn run_values(
        &self,
        mut inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, Value>, ExecError> {
        let mut slots: Vec<Option<Value>> = self
            .graph
            .inputs()
            .map(|(name, _, _)| inputs.remove(name))
            .collect();
        reference::check_known_inputs(&self.graph, inputs.keys())?;
        let outputs = self.graph.outputs();
        let positions = match wanted {
            Some(w) => output_positions(&self.graph, w),
            None => (0..outputs.len()).collect(),
        };
        let mut out = vec![None; positions.len()];
        self.run_indexed(&mut slots, params, &positions, &mut out)?;
        Ok(positions
            .iter()
            .zip(out)
            .filter_map(|(&j, v)| Some((outputs[j].name.clone(), v?)))
            .collect())
    }

    /// [`GraphExecutor::run_indexed`](crate::executor::GraphExecutor::run_indexed) on the CPU:
    /// [`run_values`](Self::run_values) by position. A state's handle is reused for the state
    /// of the next outputs, and a host f32 tensor in `outputs` is rewritten in place, so a
    /// decode loop that hands back the same slots allocates nothing here.
    pub fn run_indexed(
        &self,
        inputs: &mut [Option<Value>],
        params: &dyn ParamSource,
        wanted: &[usize],
        outputs: &mut [Option<Value>],
    ) -> Result<(), ExecError> {
        let count = self.graph.inputs().count();
        if let Some(extra) = (count..inputs.len()).find(|&i| inputs[i].is_some()) {
            return Err(ExecError::UnknownInput(format!("#{extra}")));
        }
        if let Some(&j) = wanted.iter().find(|&&j| j >= self.graph.outputs().len()) {
            return Err(ExecError::UnknownOutput(format!("#{j}")));
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = &mut *guard;
        scratch.taken.clear();
        scratch.taken.resize_with(count, || None);
        for (slot, taken) in inputs.iter_mut().zip(&mut scratch.taken) {
            if !matches!(slot, Some(Value::Device(_))) {
                continue;
            }
            let Some(Value::Device(d)) = slot.take() else {
                continue;
            };
            match CpuState::take(d) {
                Ok((state, handle)) => {
                    *taken = Some(state);
                    // As many as the outputs can use.
                    if scratch.handles.len() < self.graph.outputs().len() {
                        scratch.handles.extend(handle);
                    }
                }
                Err(d) => *slot = Some(Value::Host(d.to_host()?)),
            }
        }
        let inputs = &*inputs;
        let host = |i: usize, _: &str| match inputs.get(i) {
            Some(Some(Value::Host(t))) => Some(t),
            _ => None,
        };
        self.execute(&host, scratch, true, Some(wanted), params, outputs)
    }

    /// Per node, whether computing the outputs `wanted` (positions in the graph's outputs)
    /// needs it (through the plan's operands: a linear group's step is needed when any of its
    /// layers is).
    fn needed(&self, wanted: &[usize]) -> Arc<Vec<bool>> {
        let nodes = self.graph.nodes();
        self.needed.get(&self.graph, wanted, |i| {
            let mut deps: Vec<usize> = self.plan.steps[i]
                .value_operands(&nodes[i])
                .iter()
                .chain(&nodes[i].inputs)
                .map(|v| v.index())
                .collect();
            deps.extend(self.group_of.get(&i));
            deps
        })
    }

    /// The run itself, on the host tensors `host(position, name)` gives and the states in
    /// `scratch.taken` (by input position), which are moved into buffers past the slot plan's
    /// (so kernels read them as any buffer); with `keep_states`, outputs computed by `concat`
    /// become states. `outputs[j]` receives output `wanted[j]` (every output, in order, without
    /// `wanted`).
    fn execute<'a>(
        &'a self,
        host: &dyn Fn(usize, &str) -> Option<&'a Tensor>,
        scratch: &mut Scratch,
        keep_states: bool,
        wanted: Option<&[usize]>,
        params: &'a dyn ParamSource,
        outputs: &mut [Option<Value>],
    ) -> Result<(), ExecError> {
        self.huge_pages.run_started();
        let Scratch {
            bufs,
            vals,
            shapes,
            states,
            env,
            sources,
            taken,
            handles,
        } = scratch;
        let mut typed: Vec<bind::Source<'_>> = recycle(std::mem::take(sources));
        let input = |i: usize, name: &str| match (host(i, name), taken.get(i)) {
            (Some(t), _) => Some((t.dtype(), t.shape())),
            (None, Some(Some(s))) => Some((s.dtype(), s.shape())),
            _ => None,
        };
        let walked = reference::each_source(&self.graph, params, &input, &mut |s| typed.push(s));
        let bound = walked.and_then(|()| bind::bind_into(&typed, env));
        *sources = recycle(typed);
        bound?;
        let env = &*env;
        bufs.truncate(self.slots.count);
        self.shapes(env, shapes)?;
        self.check_memory(shapes, bufs)?;
        let mut values: Vec<Val<'a>> = recycle(std::mem::take(vals));
        values.resize_with(self.graph.nodes().len(), || Val::Empty);
        states.clear();
        let mut run = Run {
            vals: values,
            states: std::mem::take(states),
            keep_states,
            needed: wanted.map(|w| self.needed(w)),
        };
        let mut position = 0;
        for (id, node) in self.graph.iter() {
            let v = match &node.op {
                Op::Input { name } => {
                    position += 1;
                    let state = taken.get_mut(position - 1).and_then(Option::take);
                    match (host(position - 1, name), state) {
                        (Some(t), _) => Val::Ext(t, Dims::of(t.shape())),
                        (None, Some(state)) => run.add_state(bufs, state),
                        (None, None) => continue,
                    }
                }
                Op::Param { name } => match params.get(name) {
                    Some(t) => Val::Ext(t, Dims::of(t.shape())),
                    None => continue,
                },
                _ => match &self.consts[id.index()] {
                    Some(t) => Val::Ext(t, Dims::of(t.shape())),
                    None => continue,
                },
            };
            run.vals[id.index()] = v;
        }
        let result = self.walk(env, shapes, &mut run, bufs, params);
        let out = result.and_then(|()| self.outputs(&mut run, bufs, wanted, outputs, handles));
        bufs.truncate(self.slots.count);
        *vals = recycle(run.vals);
        run.states.clear();
        *states = run.states;
        out
    }

    /// Computes every node in order.
    fn walk<'a>(
        &self,
        env: &Bindings,
        shapes: &mut [Dims],
        run: &mut Run<'a>,
        bufs: &mut Vec<Vec<f32>>,
        params: &dyn ParamSource,
    ) -> Result<(), ExecError> {
        for (id, node) in self.graph.iter() {
            let i = id.index();
            let step = &self.plan.steps[i];
            let needed = run.needed.as_ref().is_none_or(|n| n[i]) && self.consts[i].is_none();
            if needed && !matches!(step, Step::Source | Step::Skip | Step::Grouped) {
                let ctx = ctx(id, node, env);
                let started = self.profile.as_ref().map(|_| Instant::now());
                if let Step::Linear(layers) = step {
                    self.linear(&ctx, layers, shapes, &mut run.vals, bufs, params)?;
                    for c in layers.iter().filter_map(|l| l.append) {
                        let (cid, cnode) = (ValueId(c as u32), &self.graph.nodes()[c]);
                        let Op::Concat { axis } = cnode.op else {
                            return Err(ctx.mismatch(format!("%{c} is not a concat")));
                        };
                        let shape = shapes[c];
                        run.vals[c] = self.append(
                            &self::ctx(cid, cnode, env),
                            cnode,
                            axis,
                            shape,
                            run,
                            bufs,
                        )?;
                    }
                } else {
                    let shape = shapes[i];
                    run.vals[i] = match (step, &node.op) {
                        (Step::Concat, Op::Concat { axis })
                            if run.keep_states && self.last_use[i] == usize::MAX =>
                        {
                            self.append(&ctx, node, *axis, shape, run, bufs)?
                        }
                        _ => self.eval(&ctx, node, step, shape, &run.vals, bufs)?,
                    };
                }
                if let (Some(p), Some(t)) = (&self.profile, started) {
                    p.record(plan::kind(&step.name()), t.elapsed().as_secs_f64());
                }
            }
            for v in node.inputs.iter().chain([&id]) {
                let buffer = matches!(run.vals[v.index()], Val::Buf(..) | Val::Narrow(..));
                if self.last_use[v.index()] == i && !buffer {
                    run.vals[v.index()] = Val::Empty;
                }
            }
        }
        Ok(())
    }

    /// A `concat` that is a graph output, kept as a state: its operands after the first
    /// written into the first's spare capacity when that is a state filled exactly up to its
    /// view, else all operands copied into a new state with room to grow.
    fn append<'a>(
        &self,
        ctx: &Ctx<'_>,
        node: &Node,
        axis: usize,
        shape: Dims,
        run: &mut Run<'a>,
        bufs: &mut Vec<Vec<f32>>,
    ) -> Result<Val<'a>, ExecError> {
        // In place: the first operand is a whole state with room for the rest.
        let in_place = match &run.vals[node.inputs[0].index()] {
            Val::Buf(s, l) | Val::Narrow(s, l) => run.states.get(s).and_then(|state| {
                (state.axis == axis && state.layout == *l && shape[axis] <= state.capacity)
                    .then(|| (*s, l.shape[axis]))
            }),
            _ => None,
        };
        let (s, first, at) = match in_place {
            Some((s, filled)) => (s, 1, filled),
            None => {
                let fresh =
                    CpuState::zeroed(node.ty.dtype, &shape, axis, grown_capacity(shape[axis]))?;
                let (Val::Buf(s, _) | Val::Narrow(s, _)) = run.add_state(bufs, fresh) else {
                    return Err(ctx.mismatch("internal: a new state has no buffer"));
                };
                (s, 0, 0)
            }
        };
        let narrow_state = stored_narrow(node.ty.dtype);
        let layout = match run.states.get_mut(&s) {
            Some(state) => {
                state.layout.shape = shape;
                state.layout
            }
            None => return Err(ctx.mismatch("internal: a cache state lost its buffer")),
        };
        // Operands `first..` written one after another along the axis from position `at`.
        let mut data = std::mem::take(&mut bufs[s]);
        let mut at = at;
        let written = (first..node.inputs.len()).try_for_each(|k| {
            let (x, xl) = float_operand(ctx, &run.vals, node, k, bufs)?;
            let start = layout.offset + at * layout.strides[axis];
            let copied = if narrow_state {
                // Exact: the values are the bf16 values the graph computed, widened.
                let dst = narrow_mut(&mut data);
                let (src, st) = (&x[..], &xl.strides);
                copy_strided_convert(&xl.shape, src, xl.offset, st, dst, start, &layout.strides)
            } else {
                copy_strided(
                    &xl.shape,
                    &x,
                    xl.offset,
                    &xl.strides,
                    &mut data,
                    start,
                    &layout.strides,
                )
            };
            copied.map_err(|e| ctx.mismatch(e.to_string()))?;
            at += xl.shape[axis];
            Ok(())
        });
        bufs[s] = data;
        written.map(|()| {
            if narrow_state {
                Val::Narrow(s, layout)
            } else {
                Val::Buf(s, layout)
            }
        })
    }

    /// The graph's outputs `wanted` (all, without it) into `out`: a value in a state's buffer
    /// as that state (once; a second output of the same buffer is copied), in one of the
    /// `handles` the inputs' states came in where there is one; others as host tensors,
    /// rewriting an f32 tensor already in `out` in place.
    fn outputs(
        &self,
        run: &mut Run<'_>,
        bufs: &mut [Vec<f32>],
        wanted: Option<&[usize]>,
        out: &mut [Option<Value>],
        handles: &mut Vec<Arc<CpuState>>,
    ) -> Result<(), ExecError> {
        let all = self.graph.outputs();
        for (j, slot) in out.iter_mut().enumerate() {
            let Some(o) = wanted.map_or(all.get(j), |w| w.get(j).and_then(|&p| all.get(p))) else {
                *slot = None;
                continue;
            };
            let node = self
                .graph
                .node(o.value)
                .ok_or_else(|| ExecError::ShapeMismatch {
                    node: o.value,
                    op: "output",
                    detail: format!("output {:?} has no node", o.name),
                })?;
            let v = &run.vals[o.value.index()];
            if let Val::Buf(s, l) | Val::Narrow(s, l) = v {
                if let Some(meta) = run.states.get(s).filter(|meta| *l == meta.layout) {
                    let state = CpuState::from_parts(
                        std::mem::take(&mut bufs[*s]),
                        *l,
                        node.ty.dtype,
                        meta.axis,
                    );
                    run.states.remove(s);
                    *slot = Some(Value::Device(into_handle(state, handles)));
                    continue;
                }
            }
            if let (Some(Value::Host(t)), DType::F32, Some((d, l))) =
                (slot.as_mut(), node.ty.dtype, strided_data(v, bufs))
            {
                let mut copied = None;
                t.rewrite(&l.shape, |storage| {
                    if !matches!(storage, Storage::F32(_)) {
                        *storage = Storage::F32(Vec::new());
                    }
                    if let Storage::F32(data) = storage {
                        copied = dense_copy(d, &l, data);
                    }
                })
                .ok()
                .zip(copied)
                .ok_or_else(|| ExecError::ShapeMismatch {
                    node: o.value,
                    op: "output",
                    detail: format!("output {:?} could not be copied out", o.name),
                })?;
                continue;
            }
            let t = to_tensor(v, node.ty.dtype, bufs).ok_or_else(|| ExecError::ShapeMismatch {
                node: o.value,
                op: "output",
                detail: format!("output {:?} has no value", o.name),
            })?;
            *slot = Some(Value::Host(t.into_owned()));
        }
        Ok(())
    }

    /// Computes one node: its step's kernel when the operands fit it, else the reference op.
    #[allow(clippy::too_many_arguments)]
    fn eval<'a>(
        &self,
        ctx: &Ctx<'_>,
        node: &Node,
        step: &Step,
        shape: Dims,
        vals: &[Val<'a>],
        bufs: &mut [Vec<f32>],
    ) -> Result<Val<'a>, ExecError> {
        let slot = self.slots.slot[ctx.node.index()];
        let first = node.inputs.first().map(|v| &vals[v.index()]);
        match (step, first) {
            (Step::Alias, Some(Val::Buf(s, l)))
                if l.is_dense() || !matches!(node.op, Op::Reshape { .. }) =>
            {
                return Ok(Val::Buf(*s, l.reshaped(&shape)));
            }
            (Step::Alias, Some(Val::Ext(t, _))) if t.dtype() == DType::F32 => {
                return Ok(Val::Ext(t, shape));
            }
            (Step::Alias, Some(Val::Narrow(s, l)))
                if l.is_dense() || !matches!(node.op, Op::Reshape { .. }) =>
            {
                return Ok(Val::Narrow(*s, l.reshaped(&shape)));
            }
            (Step::View, Some(Val::Buf(s, l))) => {
                if let Some(l) = view(ctx, &node.op, l, &shape)? {
                    return Ok(Val::Buf(*s, l));
                }
            }
            (Step::View, Some(Val::Narrow(s, l))) => {
                if let Some(l) = view(ctx, &node.op, l, &shape)? {
                    return Ok(Val::Narrow(*s, l));
                }
            }
            _ => {}
        }
        if let Some(s) = slot {
            let mut out = std::mem::take(&mut bufs[s]);
            out.resize(shape.iter().product(), 0.0);
            let done = self.kernel(ctx, node, step, &shape, vals, bufs, &mut out);
            bufs[s] = out;
            if done? {
                if let (Step::Attention { bshd: true, .. }, &[b, h, q, d]) = (step, &shape[..]) {
                    // Stored [b, s, h, d]: this value is that buffer's [0, 2, 1, 3] view.
                    let stored = Layout::dense(&[b, q, h, d]);
                    return Ok(Val::Buf(s, stored.permuted(&[0, 2, 1, 3])));
                }
                return Ok(Val::Buf(s, Layout::dense(&shape)));
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
                Ok(Val::Buf(s, Layout::dense(t.shape())))
            }
            None => Ok(Val::Host(t)),
        }
    }

    /// Computes the layers of a linear step (one kernel call for the group) into their
    /// buffers.
    #[allow(clippy::too_many_arguments)]
    fn linear<'a>(
        &self,
        ctx: &Ctx<'_>,
        layers: &[LinearLayer],
        shapes: &mut [Dims],
        vals: &mut [Val<'a>],
        bufs: &mut [Vec<f32>],
        params: &dyn ParamSource,
    ) -> Result<(), ExecError> {
        let mut outs: Group<(usize, Vec<f32>, Dims)> = SmallVec::new();
        for l in layers {
            let s = self.slots.slot[l.node]
                .ok_or_else(|| ctx.mismatch(format!("linear %{} has no buffer", l.node)))?;
            let shape = shapes[l.node];
            let mut out = std::mem::take(&mut bufs[s]);
            out.resize(shape.iter().product(), 0.0);
            outs.push((s, out, shape));
        }
        let done = self.linear_into(ctx, layers, vals, bufs, params, &mut outs);
        for (l, (s, out, shape)) in layers.iter().zip(outs) {
            bufs[s] = out;
            let layout = match (l.heads, &shape[..]) {
                // Stored [b, s, h, d]: the value [b, h, s, d] is its permuted view.
                (Some(_), &[b, h, q, d]) => Layout::dense(&[b, q, h, d]).permuted(&[0, 2, 1, 3]),
                _ => Layout::dense(&shape),
            };
            vals[l.node] = Val::Buf(s, layout);
        }
        done
    }

    /// The kernel call of [`CpuGraph::linear`] into `outs` (slot, buffer, shape per layer).
    fn linear_into(
        &self,
        ctx: &Ctx<'_>,
        layers: &[LinearLayer],
        vals: &[Val<'_>],
        bufs: &[Vec<f32>],
        params: &dyn ParamSource,
        outs: &mut [(usize, Vec<f32>, Dims)],
    ) -> Result<(), ExecError> {
        let operand = |v: ValueId| {
            dense_f32(&vals[v.index()], bufs)
                .ok_or_else(|| ctx.mismatch(format!("operand {v} is not f32 data")))
        };
        let (x, xs) = operand(layers[0].x)?;
        let k = xs.last().copied().unwrap_or(0);
        let m = x
            .len()
            .checked_div(k)
            .unwrap_or_else(|| xs[..xs.len().saturating_sub(1)].iter().product());
        // A narrow weight not prepared at load (not expected: the plan prepares every weight
        // it selects) is packed here, so the kernel still rounds x as planned.
        let mut late: Vec<(&str, bool, PackedBf16)> = Vec::new();
        for (name, transposed) in layers.iter().flat_map(LinearLayer::weights) {
            let t = params
                .get(name)
                .ok_or_else(|| ctx.mismatch(format!("no parameter {name:?}")))?;
            // Read through `elements()`: an artifact's weights are borrowed from its map, and
            // `storage()` would decode a copy of each (a packed weight's, prepared, first).
            let direct = self.weights.packed(name, transposed).is_some()
                || matches!(
                    (t.elements(), transposed),
                    (Elements::F32(_), _) | (Elements::F8E4M3(_), true)
                );
            if !direct
                && !late
                    .iter()
                    .any(|(n, tr, _)| *n == name && *tr == transposed)
            {
                let p = weights::pack(t, transposed)
                    .ok_or_else(|| ctx.mismatch(format!("weight {name:?} cannot be prepared")))?;
                late.push((name, transposed, p));
            }
        }
        // A prepared weight is never an e4m3 one stored `[n, k]` (read in place), so the packed
        // form comes first, before reading a weight that may be held only packed.
        let weight = |name: &str, transposed: bool| {
            let packed = late
                .iter()
                .find(|(n, tr, _)| *n == name && *tr == transposed)
                .map(|(_, _, p)| p)
                .or(self.weights.packed(name, transposed));
            if let Some(p) = packed {
                return Ok(Weight::Bf16(p));
            }
            match params.get(name).map(Tensor::elements) {
                Some(Elements::F8E4M3(w)) if transposed => Ok(Weight::F8E4M3(w)),
                Some(Elements::F32(w)) if transposed => Ok(Weight::F32(w)),
                Some(Elements::F32(w)) => Ok(Weight::F32Kn(w)),
                _ => Err(ctx.mismatch(format!("weight {name:?} is not prepared"))),
            }
        };
        let scale = |name: &Option<String>| match name {
            Some(name) => params
                .get(name)
                .and_then(Tensor::as_f32)
                .map(Some)
                .ok_or_else(|| ctx.mismatch(format!("scale {name:?} is not an f32 parameter"))),
            None => Ok(None),
        };
        let mut operands: Group<_> = SmallVec::new();
        for l in layers {
            let bias = l.bias.map(operand).transpose()?;
            let add = l.add.map(operand).transpose()?;
            let rope = match l.rope {
                Some((c, s)) => Some((operand(c)?.0, operand(s)?.0)),
                None => None,
            };
            operands.push((bias, add, rope));
        }
        let mut group: Group<_> = SmallVec::new();
        for ((l, (bias, add, rope)), (_, out, _)) in layers.iter().zip(&operands).zip(outs) {
            let gate = match &l.gate {
                Some(g) => Some(Gate {
                    weight: weight(&g.weight, g.transposed)?,
                    scale: scale(&g.scale)?,
                }),
                None => None,
            };
            group.push(Layer {
                weight: weight(&l.weight, l.transposed)?,
                scale: scale(&l.scale)?,
                bias: bias.as_ref().map(|(b, _)| b.as_ref()),
                add: add.as_ref().map(|(a, _)| a.as_ref()),
                activation: l.activation,
                gate,
                rope: rope.as_ref().map(|(c, s)| Rope { cos: c, sin: s }),
                round_bf16: l.round_bf16,
                out,
            });
        }
        linear(m, k, &x, &mut group).map_err(|e| ctx.mismatch(e.to_string()))
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
        let strided = |k: usize| -> Option<(&[f32], Layout)> {
            strided_data(&vals[node.inputs.get(k)?.index()], bufs)
        };
        let kerr = |e: KernelError| ctx.mismatch(e.to_string());
        match step {
            Step::Rope {
                x,
                cos,
                sin,
                round_bf16,
            } => {
                let operand = |v: &ValueId| {
                    let (d, l) = strided_data(&vals[v.index()], bufs)?;
                    let strides = l.broadcast_to(shape)?;
                    Some((&d[l.offset.min(d.len())..], strides))
                };
                let (Some(x), Some(c), Some(s)) = (operand(x), operand(cos), operand(sin)) else {
                    return Ok(false);
                };
                let (x, c, s) = ((x.0, &x.1[..]), (c.0, &c.1[..]), (s.0, &s.1[..]));
                rope_rotate_half(shape, x, c, s, *round_bf16, out).map_err(kerr)?;
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
            Step::RefineLogits => {
                let (Some((c, _)), Some((x, _)), Some((sc, _)), Some((b, _))) =
                    (f32s(0), f32s(1), f32s(3), f32s(4))
                else {
                    return Ok(false);
                };
                let Val::Ext(r, _) = &vals[node.inputs[2].index()] else {
                    return Ok(false);
                };
                let (Elements::F8E4M3(r), &[n, k]) = (r.elements(), r.shape()) else {
                    return Ok(false);
                };
                let rows = c.len().checked_div(n).unwrap_or(0);
                refine::refine_logits(rows, n, k, c, x, r, sc, b, out).map_err(kerr)?;
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
            Step::Copy => {
                let Some((x, l)) = strided(0) else {
                    return Ok(false);
                };
                // A permute, slice or expand copies its view; a reshape copies the operand in
                // its own shape (the same element order).
                let l = view(ctx, &node.op, &l, shape)?.unwrap_or(l);
                let dense = Layout::dense(&l.shape);
                copy_strided(&l.shape, x, l.offset, &l.strides, out, 0, &dense.strides)
                    .map_err(kerr)?;
            }
            Step::Concat => {
                let Op::Concat { axis } = node.op else {
                    return Ok(false);
                };
                let dense = Layout::dense(shape);
                let mut at = 0;
                for k in 0..node.inputs.len() {
                    let Some((x, l)) = strided(k) else {
                        return Ok(false);
                    };
                    copy_strided(
                        &l.shape,
                        x,
                        l.offset,
                        &l.strides,
                        out,
                        at * dense.strides[axis],
                        &dense.strides,
                    )
                    .map_err(kerr)?;
                    at += l.shape[axis];
                }
            }
            Step::Fused(program) => {
                let mut args: SmallVec<[_; 8]> = SmallVec::new();
                for k in 0..node.inputs.len() {
                    let Some((x, l)) = strided(k) else {
                        return Ok(false);
                    };
                    let Some(strides) = l.broadcast_to(shape) else {
                        return Ok(false);
                    };
                    args.push((&x[l.offset.min(x.len())..], strides));
                }
                let args: SmallVec<[(&[f32], &[usize]); 8]> =
                    args.iter().map(|(x, s)| (*x, &s[..])).collect();
                program.run(shape, &args, out).map_err(kerr)?;
            }
            Step::LayerNorm { eps } => {
                let (Some((x, _)), Some((w, _)), Some((b, _))) = (f32s(0), f32s(1), f32s(2)) else {
                    return Ok(false);
                };
                let cols = shape.last().copied().unwrap_or(0);
                if cols == 0 || w.len() != cols || b.len() != cols {
                    return Ok(false);
                }
                rowwise::layernorm(x.len() / cols, cols, x, w, b, *eps, out).map_err(kerr)?;
            }
            Step::Attention {
                scale,
                causal,
                window,
                bshd,
            } => {
                // Keys and values may be a KV cache kept as bf16.
                let kv = |k: usize| -> Option<Kv<'_>> {
                    match &vals[node.inputs.get(k)?.index()] {
                        Val::Narrow(s, l) => Some(Kv::Bf16(narrow(bufs.get(*s)?), *l)),
                        v => strided_data(v, bufs).map(|(d, l)| Kv::F32(d, l)),
                    }
                };
                let (Some(q), Some(k), Some(v)) = (strided(0), kv(1), kv(2)) else {
                    return Ok(false);
                };
                let mask = match node.inputs.len() {
                    3 => None,
                    _ => match strided(3) {
                        Some(m) => Some(m),
                        None => return Ok(false),
                    },
                };
                let opts = AttnOptions {
                    scale: *scale as f32,
                    causal: *causal,
                    window: *window,
                };
                return attention(&opts, *bshd, q, [k, v], mask, shape, out).map_err(kerr);
            }
            Step::Moe { top_k, weights } => {
                let Some((x, xs)) = f32s(0) else {
                    return Ok(false);
                };
                let data = |w: &MoeWeight| -> Option<MoeData<'_>> {
                    match w {
                        MoeWeight::Value(v) => {
                            f32_data(&vals[v.index()], bufs).map(|d| MoeData::F32(d.0))
                        }
                        MoeWeight::Narrow { param, scale } => {
                            let Val::Ext(t, _) = &vals[param.index()] else {
                                return None;
                            };
                            let scale = match scale {
                                Some(s) => Some(f32_data(&vals[s.index()], bufs)?.0),
                                None => None,
                            };
                            Some(MoeData::Narrow {
                                elements: t.elements(),
                                scale,
                            })
                        }
                    }
                };
                let Some(data) = weights.iter().map(data).collect::<Option<Vec<_>>>() else {
                    return Ok(false);
                };
                let (Some(&gate), experts) = (data.first(), data.get(1..).unwrap_or_default())
                else {
                    return Ok(false);
                };
                let experts: Vec<[MoeData<'_>; 3]> = experts
                    .chunks_exact(3)
                    .map(|c| [c[0], c[1], c[2]])
                    .collect();
                let h = xs.last().copied().unwrap_or(0);
                moe_f32(*top_k, h, x, gate, &experts, out).map_err(kerr)?;
            }
            Step::External { provider, native } => {
                // Views (e.g. the KV cache grown in place) go as they are, with their strides.
                let views: Option<Vec<_>> = (0..node.inputs.len()).map(strided).collect();
                let Some(views) = views else {
                    provider.fell_back(native, "operands are not f32".into());
                    return self.kernel(ctx, node, native, shape, vals, bufs, out);
                };
                let ins: Vec<Operand<'_>> = views
                    .iter()
                    .map(|(d, l)| Operand {
                        data: &d[l.offset.min(d.len())..],
                        shape: &l.shape,
                        strides: &l.strides,
                    })
                    .collect();
                if !provider.run(native, &node.op, &ins, out, shape) {
                    return self.kernel(ctx, node, native, shape, vals, bufs, out);
                }
            }
            Step::Reference => {
                let int = |k: usize| {
                    let v = &vals[node.inputs.get(k)?.index()];
                    Some((ints(v)?, host_shape(v)?))
                };
                return Ok(match (&node.op, int(0), int(1)) {
                    (Op::Cast { to: DType::F32 }, Some((x, _)), _) => host::cast_to_f32(x, out),
                    (Op::Compare(op), Some(a), Some(b)) => host::compare(*op, a, b, shape, out),
                    _ => false,
                });
            }
            Step::Source
            | Step::Skip
            | Step::Alias
            | Step::View
            | Step::Linear(_)
            | Step::Grouped => return Ok(false),
        }
        Ok(true)
    }
}

/// The address ranges of every weight a linear step streams, for the huge-page advice
/// ([`HugePages`]): the packed copy where there is one, else the parameter read in place.
fn streamed_weights(plans: &[Plan], params: &dyn ParamSource, weights: &Weights) -> HugePages {
    let mut seen = std::collections::HashSet::new();
    let mut spans = Vec::new();
    for plan in plans {
        for step in &plan.steps {
            let Step::Linear(layers) = step else {
                continue;
            };
            for (name, transposed) in layers.iter().flat_map(LinearLayer::weights) {
                if !seen.insert((name, transposed)) {
                    continue;
                }
                if let Some(p) = weights.packed(name, transposed) {
                    spans.push(pages::span(p.words()));
                } else if let Some(t) = params.get(name) {
                    match t.elements() {
                        Elements::F32(v) => spans.push(pages::span(v)),
                        Elements::F8E4M3(v) => spans.push(pages::span(v)),
                        _ => {}
                    }
                }
            }
        }
    }
    HugePages::new(spans)
}

/// Refuses a graph with a value of more than [`MAX_RANK`] axes (the run loop's layouts hold
/// at most that many).
fn check_ranks(graph: &Graph) -> Result<(), ExecError> {
    match graph.iter().find(|(_, n)| n.ty.shape.len() > MAX_RANK) {
        Some((id, node)) => Err(ExecError::ShapeMismatch {
            node: id,
            op: node.op.name(),
            detail: format!(
                "rank {} exceeds the CPU backend's {MAX_RANK} axes",
                node.ty.shape.len()
            ),
        }),
        None => Ok(()),
    }
}

/// Per node: the value of a constant of fixed shape (`None` for other nodes, and for a
/// constant the reference op cannot compute, which then runs as its step says).
fn constants(graph: &Graph) -> Vec<Option<Tensor>> {
    let env = Bindings::new();
    graph
        .iter()
        .map(|(id, node)| match node.op {
            Op::Const { .. } => reference::eval_node(id, node, &env, &[]).ok(),
            _ => None,
        })
        .collect()
}

/// For each layer of a linear group computed at another node, that node.
fn group_of(plan: &Plan) -> HashMap<usize, usize> {
    let mut of = HashMap::new();
    for (h, step) in plan.steps.iter().enumerate() {
        if let Step::Linear(layers) = step {
            for l in layers.iter().filter(|l| l.node != h) {
                of.insert(l.node, h);
            }
        }
    }
    of
}

/// Per node: the last node whose op reads it ([`reference::last_uses`]; `usize::MAX` for an
/// output), or later if a fused step reads it at a later node (a linear layer computed at its
/// epilogue's node reads `x` there).
fn last_uses(graph: &Graph, plan: &Plan) -> Vec<usize> {
    let mut last = reference::last_uses(graph);
    for (i, node) in graph.nodes().iter().enumerate() {
        for v in plan.steps[i].value_operands(node) {
            let l = &mut last[v.index()];
            *l = (*l).max(i);
        }
    }
    last
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (None where there is no such file).
pub(super) fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The sources' declared and supplied types, for binding.
fn source_types<'a>(sources: &[(bind::Source<'a>, &'a Tensor)]) -> Vec<bind::Source<'a>> {
    sources.iter().map(|s| s.0).collect()
}

/// The node's evaluation context.
fn ctx<'e>(id: ValueId, node: &Node, env: &'e Bindings) -> Ctx<'e> {
    Ctx {
        node: id,
        op: node.op.name(),
        env,
    }
}

/// Operand `k` of `node` as f32 data and its layout: in place when it is f32, else (a float
/// input of another width) converted.
fn float_operand<'v>(
    ctx: &Ctx<'_>,
    vals: &'v [Val<'_>],
    node: &Node,
    k: usize,
    bufs: &'v [Vec<f32>],
) -> Result<(Cow<'v, [f32]>, Layout), ExecError> {
    let v = &vals[node.inputs[k].index()];
    if let Some((x, l)) = strided_data(v, bufs) {
        return Ok((Cow::Borrowed(x), l));
    }
    let t = to_tensor(v, DType::F32, bufs)
        .filter(|t| t.dtype().is_float())
        .ok_or_else(|| ctx.mismatch(format!("operand {k} is not a float value")))?;
    let wide = t.cast(DType::F32);
    let data = wide.as_f32().map(<[f32]>::to_vec).unwrap_or_default();
    Ok((Cow::Owned(data), Layout::dense(t.shape())))
}

/// A value's f32 elements and shape, if it has them without conversion.
fn f32_data<'v>(v: &'v Val<'_>, bufs: &'v [Vec<f32>]) -> Option<(&'v [f32], &'v [usize])> {
    match v {
        Val::Ext(t, shape) => t.as_f32().map(|d| (d, &shape[..])),
        Val::Buf(s, l) if l.is_dense() => {
            let n = l.numel();
            bufs.get(*s)
                .and_then(|b| b.get(l.offset..l.offset + n))
                .map(|d| (d, &l.shape[..]))
        }
        _ => None,
    }
}

/// A value's f32 buffer and layout (dense for inputs and parameters), if it is f32 data.
fn strided_data<'v>(v: &'v Val<'_>, bufs: &'v [Vec<f32>]) -> Option<(&'v [f32], Layout)> {
    match v {
        Val::Ext(t, shape) => t.as_f32().map(|d| (d, Layout::dense(shape))),
        Val::Buf(s, l) => bufs.get(*s).map(|b| (b.as_slice(), *l)),
        _ => None,
    }
}

/// A value's f32 elements in row-major order (copied only when strided or bf16) and its shape.
fn dense_f32<'v>(v: &'v Val<'_>, bufs: &'v [Vec<f32>]) -> Option<(Cow<'v, [f32]>, Dims)> {
    if let Some((d, shape)) = f32_data(v, bufs) {
        return Some((Cow::Borrowed(d), Dims::of(shape)));
    }
    if let Val::Narrow(s, l) = v {
        return Some((Cow::Owned(widened(*s, l, bufs)?), l.shape));
    }
    let (d, l) = strided_data(v, bufs)?;
    let mut out = vec![0.0; l.numel()];
    let dense = Layout::dense(&l.shape);
    copy_strided(
        &l.shape,
        d,
        l.offset,
        &l.strides,
        &mut out,
        0,
        &dense.strides,
    )
    .ok()?;
    Some((Cow::Owned(out), l.shape))
}

/// The elements of view `l` of the bf16 state buffer `s`, widened to dense row-major f32.
fn widened(s: usize, l: &Layout, bufs: &[Vec<f32>]) -> Option<Vec<f32>> {
    let src = narrow(bufs.get(s)?);
    let mut d = vec![0.0f32; l.numel()];
    let dense = Layout::dense(&l.shape);
    copy_strided_convert(
        &l.shape,
        src,
        l.offset,
        &l.strides,
        &mut d,
        0,
        &dense.strides,
    )
    .ok()?;
    Some(d)
}

/// The shape of an input, parameter or host value.
fn host_shape<'v>(v: &'v Val<'_>) -> Option<&'v [usize]> {
    match v {
        Val::Ext(_, shape) => Some(shape),
        Val::Host(t) => Some(t.shape()),
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
        Val::Ext(t, shape) if t.shape() == &shape[..] => Some(Cow::Borrowed(*t)),
        Val::Ext(t, shape) => Tensor::new(shape.to_vec(), t.storage().clone())
            .ok()
            .map(Cow::Owned),
        Val::Host(t) => Some(Cow::Borrowed(t)),
        Val::Narrow(s, l) => {
            let t = Tensor::from_f32(l.shape.to_vec(), widened(*s, l, bufs)?).ok()?;
            Some(Cow::Owned(if dtype == DType::F32 {
                t
            } else {
                t.cast(dtype)
            }))
        }
        Val::Buf(s, l) => {
            let mut data = Vec::new();
            dense_copy(bufs.get(*s)?, l, &mut data)?;
            let t = Tensor::from_f32(l.shape.to_vec(), data).ok()?;
            Some(Cow::Owned(if dtype == DType::F32 {
                t
            } else {
                t.cast(dtype)
            }))
        }
    }
}

/// The elements of view `l` of `buf` into `out` (replacing what it held), dense row-major.
fn dense_copy(buf: &[f32], l: &Layout, out: &mut Vec<f32>) -> Option<()> {
    out.clear();
    if l.is_dense() {
        out.extend_from_slice(buf.get(l.offset..l.offset + l.numel())?);
        return Some(());
    }
    out.resize(l.numel(), 0.0);
    let dense = Layout::dense(&l.shape);
    copy_strided(&l.shape, buf, l.offset, &l.strides, out, 0, &dense.strides).ok()
}

/// `state` as a device value, in one of the emptied `handles` when there is one (no
/// allocation), else in a new one.
fn into_handle(state: CpuState, handles: &mut Vec<Arc<CpuState>>) -> Arc<CpuState> {
    if let Some(mut handle) = handles.pop() {
        if let Some(slot) = Arc::get_mut(&mut handle) {
            *slot = state;
            return handle;
        }
    }
    Arc::new(state)
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

/// The layout of a view node's result over its operand's layout `l`: a permute, a slice or an
/// expand; `None` for other ops.
fn view(ctx: &Ctx<'_>, op: &Op, l: &Layout, shape: &[usize]) -> Result<Option<Layout>, ExecError> {
    Ok(match op {
        Op::Permute { perm } => Some(l.permuted(perm)),
        Op::Slice { axis, start, end } => {
            let (start, end) = (ctx.value(start)?, ctx.value(end)?);
            let size = l.shape[*axis];
            if start < 0 || start > end || end > size as i64 {
                return Err(ExecError::SliceOutOfRange {
                    node: ctx.node,
                    start,
                    end,
                    size,
                });
            }
            Some(l.sliced(*axis, start as usize, end as usize))
        }
        Op::Expand { .. } => l.broadcast_to(shape).map(|strides| Layout {
            shape: Dims::of(shape),
            strides,
            offset: l.offset,
        }),
        _ => None,
    })
}

/// A key or value operand of attention: f32, or bf16 (a KV cache kept narrow), with its layout.
enum Kv<'d> {
    F32(&'d [f32], Layout),
    Bf16(&'d [bf16], Layout),
}

impl Kv<'_> {
    fn layout(&self) -> &Layout {
        match self {
            Kv::F32(_, l) | Kv::Bf16(_, l) => l,
        }
    }
}

/// The strides of a rank-4 layout whose last axis is contiguous, and its element offset.
fn strides4(l: &Layout) -> Option<(Strides4, usize)> {
    (l.shape.len() == 4 && l.strides[3] == 1).then(|| {
        let st = Strides4 {
            batch: l.strides[0],
            head: l.strides[1],
            seq: l.strides[2],
        };
        (st, l.offset)
    })
}

/// The operand of attention over `data` at a [`strides4`] layout.
fn strided<T>(data: &[T], (strides, offset): (Strides4, usize)) -> Strided<'_, T> {
    Strided {
        data: &data[offset.min(data.len())..],
        strides,
    }
}

/// Attention on strided `q`, `k`, `v` (rank 4, last axis contiguous) and an optional additive
/// mask broadcast to the scores, stored `[b, h, s, d]` (or `[b, s, h, d]` with `bshd`);
/// `Ok(false)` when the operands do not fit the kernel.
fn attention(
    opts: &AttnOptions,
    bshd: bool,
    q: (&[f32], Layout),
    [k, v]: [Kv<'_>; 2],
    mask: Option<(&[f32], Layout)>,
    shape: &[usize],
    out: &mut [f32],
) -> Result<bool, KernelError> {
    let Some(qv) = strides4(&q.1).map(|st| strided(q.0, st)) else {
        return Ok(false);
    };
    let (Some(kst), Some(vst)) = (strides4(k.layout()), strides4(v.layout())) else {
        return Ok(false);
    };
    let (qs, ks, vs) = (&q.1.shape, &k.layout().shape, &v.layout().shape);
    let dims = AttnShape {
        batch: qs[0],
        q_heads: qs[1],
        kv_heads: ks[1],
        q_len: qs[2],
        kv_len: ks[2],
        head_dim: qs[3],
        v_dim: vs[3],
    };
    let scores = [dims.batch, dims.q_heads, dims.q_len, dims.kv_len];
    let mask = match &mask {
        None => None,
        Some((d, l)) => match l.broadcast_to(&scores) {
            Some(s) if s[3] == 1 || dims.kv_len <= 1 => Some(MaskView {
                data: &d[l.offset.min(d.len())..],
                strides: Strides4 {
                    batch: s[0],
                    head: s[1],
                    seq: s[2],
                },
            }),
            _ => return Ok(false),
        },
    };
    let (h, s, d) = (shape[1], shape[2], shape[3]);
    let out_strides = if bshd {
        Strides4 {
            batch: s * h * d,
            head: d,
            seq: h * d,
        }
    } else {
        Strides4::dense(h, s, d)
    };
    match (k, v) {
        (Kv::F32(kd, _), Kv::F32(vd, _)) => {
            let (k, v) = (strided(kd, kst), strided(vd, vst));
            attention_f32(&dims, opts, qv, k, v, mask, out, out_strides)?;
        }
        (Kv::Bf16(kd, _), Kv::Bf16(vd, _)) => {
            let (k, v) = (strided(kd, kst), strided(vd, vst));
            attention_bf16_kv(&dims, opts, qv, k, v, mask, out, out_strides)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::NoParams;
    use kiln_ir::trace::Tracer;
    use kiln_ir::{Dim, UnaryOp};

    /// A run whose memory plan exceeds the machine's memory is refused before any buffer grows,
    /// with the plan's estimate in the message.
    #[test]
    fn refuses_a_run_larger_than_memory() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [1i64]);
        // 2^40 elements: 4 TiB of f32, more than any machine this runs on.
        let big = x.expand(&[Dim::fixed(1 << 40)]).unwrap();
        let y = t.apply(Op::Unary(UnaryOp::Exp), &[&big]).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let plan = CpuGraph::compile(vec![g], &NoParams)
            .unwrap()
            .pop()
            .unwrap();
        let inputs = HashMap::from([(
            "x".to_string(),
            Tensor::from_f32(vec![1], vec![0.5]).unwrap(),
        )]);
        let err = plan.run(&inputs, &NoParams).unwrap_err();
        let ExecError::OutOfMemory { needed, .. } = &err else {
            panic!("expected OutOfMemory, got {err}");
        };
        // The exp result, plus the expand's copy (an input is not viewed in place).
        assert_eq!(*needed, 8usize << 40);
        assert!(err.to_string().contains("memory plan"), "{err}");
    }

    /// A value of more axes than the run loop's inline layouts hold is refused when the graph
    /// is compiled (an error, not a panic), and a state of that rank too.
    #[test]
    fn refuses_ranks_past_the_inline_layouts() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [1i64; MAX_RANK + 1]);
        let y = t.apply(Op::Unary(UnaryOp::Exp), &[&x]).unwrap();
        t.output("y", &y);
        let err = CpuGraph::compile(vec![t.finish().unwrap()], &NoParams).unwrap_err();
        assert!(err.to_string().contains("rank 9"), "{err}");
        assert!(CpuState::zeroed(DType::F32, &[1; MAX_RANK + 1], 0, 4).is_err());
    }
}

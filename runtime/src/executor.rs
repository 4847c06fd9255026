//! The interface between the models that run graphs ([`GraphLm`](crate::GraphLm),
//! [`EncoderRunner`](crate::encoder::EncoderRunner)) and the backends that run them: the CPU
//! backend here ([`crate::cpu::CpuGraph`]) and the CUDA backend of `kiln-cuda`. A backend may
//! keep values on its device between runs (a causal LM's KV cache): they travel as
//! [`Value::Device`] and are only copied to the host when asked ([`Value::into_host`]).

use crate::cpu::CpuGraph;
use crate::reference::{ExecError, ParamSource};
use crate::Tensor;
use kiln_ir::{DType, Graph};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

/// A value held by a backend on its device.
pub trait DeviceValue: Send + Sync {
    /// The element type.
    fn dtype(&self) -> DType;
    /// The shape.
    fn shape(&self) -> &[usize];
    /// A copy on the host.
    fn to_host(&self) -> Result<Tensor, ExecError>;
    /// For the backend that made it, to get its own type back.
    fn as_any(&self) -> &dyn Any;
    /// For the backend that made it, to take its own type back (and reuse it in place).
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// A graph input or output: on the host, or on a backend's device.
#[derive(Clone)]
pub enum Value {
    /// A host tensor.
    Host(Tensor),
    /// A value on a device.
    Device(Arc<dyn DeviceValue>),
}

impl Value {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Value::Host(t) => t.dtype(),
            Value::Device(d) => d.dtype(),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Host(t) => t.shape(),
            Value::Device(d) => d.shape(),
        }
    }

    /// The value as a host tensor (copied from the device if it is there).
    pub fn into_host(self) -> Result<Tensor, ExecError> {
        match self {
            Value::Host(t) => Ok(t),
            Value::Device(d) => d.to_host(),
        }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if matches!(self, Value::Host(_)) {
            "host"
        } else {
            "device"
        };
        write!(f, "{place} {}{:?}", self.dtype(), self.shape())
    }
}

/// A graph compiled for one backend, ready to run.
pub trait GraphExecutor: Send + Sync {
    /// The graph it runs.
    fn graph(&self) -> &Graph;

    /// Runs the graph on `inputs` and `params` (the parameters it was compiled with); returns
    /// the outputs by name, on the backend's device where it has one.
    fn run(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Value>, ExecError>;

    /// [`run`](Self::run) returning only the outputs named in `wanted`; a backend may skip the
    /// work only the others need (the CPU backend does).
    fn run_outputs(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
        wanted: &[&str],
    ) -> Result<HashMap<String, Value>, ExecError> {
        let mut out = self.run(inputs, params)?;
        out.retain(|name, _| wanted.contains(&name.as_str()));
        Ok(out)
    }

    /// [`run_outputs`](Self::run_outputs) by position, for a loop that runs the graph step
    /// after step (a decode loop): nothing is looked up by name, and a backend may reuse what
    /// the caller hands back. `inputs[i]` is the graph's input `i` in [`Graph::inputs`] order
    /// (`None`: not supplied); host tensors are read where they are and left there, device
    /// values are taken (their slots left `None`). `outputs[j]` receives the output
    /// `wanted[j]` (a position in [`Graph::outputs`]); a host tensor already there may be
    /// rewritten in place. The default goes through [`run_outputs`](Self::run_outputs).
    fn run_indexed(
        &self,
        inputs: &mut [Option<Value>],
        params: &dyn ParamSource,
        wanted: &[usize],
        outputs: &mut [Option<Value>],
    ) -> Result<(), ExecError> {
        let graph = self.graph();
        let mut named = HashMap::with_capacity(inputs.len());
        for ((name, _, _), slot) in graph.inputs().zip(inputs.iter_mut()) {
            let value = match slot {
                Some(Value::Host(t)) => Value::Host(t.clone()),
                Some(Value::Device(_)) => match slot.take() {
                    Some(v) => v,
                    None => continue,
                },
                None => continue,
            };
            named.insert(name.to_string(), value);
        }
        let names = wanted
            .iter()
            .map(|&j| match graph.outputs().get(j) {
                Some(o) => Ok(o.name.as_str()),
                None => Err(ExecError::UnknownOutput(format!("#{j}"))),
            })
            .collect::<Result<Vec<&str>, _>>()?;
        let mut out = self.run_outputs(named, params, &names)?;
        for (slot, name) in outputs.iter_mut().zip(&names) {
            *slot = out.remove(*name);
        }
        Ok(())
    }

    /// Where it runs, e.g. `cpu` or `cuda (NVIDIA H200)`.
    fn backend(&self) -> String;

    /// How many nodes each kind of kernel computes, e.g. `linear×7 rmsnorm×3`.
    fn kernel_summary(&self) -> String;

    /// Time and calls per kind of kernel over all runs so far, longest first, when profiling
    /// was asked for (`KILN_PROFILE`).
    fn profile(&self) -> Option<Vec<(String, f64, usize)>> {
        None
    }

    /// Rows `rows` (along axis 0, in that order) of a value this executor returned.
    fn select_rows(&self, value: Value, rows: &[usize]) -> Result<Value, ExecError> {
        let t = value.into_host()?;
        t.select_rows(rows)
            .map(Value::Host)
            .ok_or_else(|| ExecError::ShapeMismatch {
                node: kiln_ir::ValueId(0),
                op: "select_rows",
                detail: format!("rows {rows:?} out of range for shape {:?}", t.shape()),
            })
    }

    /// [`run`](Self::run) with host tensors in and out.
    fn run_host(
        &self,
        inputs: &HashMap<String, Tensor>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Tensor>, ExecError> {
        let inputs = inputs
            .iter()
            .map(|(k, t)| (k.clone(), Value::Host(t.clone())))
            .collect();
        self.run(inputs, params)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.into_host()?)))
            .collect()
    }
}

/// Which nodes the outputs a run asks for need, per set of outputs (indices into
/// [`Graph::outputs`]), remembered (a generation loop asks for the same outputs every step).
/// Shared by the backends that skip the work of outputs nobody asked for.
#[derive(Debug, Default)]
pub struct NeededNodes {
    known: std::sync::Mutex<Vec<Needed>>,
}

/// The outputs asked for and, per node, whether they need it.
type Needed = (Vec<usize>, Arc<Vec<bool>>);

impl NeededNodes {
    /// Per node of `graph`, whether computing the outputs `wanted` (indices into
    /// [`Graph::outputs`]) needs it, where `deps(i)` lists the nodes node `i`'s computation
    /// reads (its operands, and whatever a backend's fused step adds).
    pub fn get(
        &self,
        graph: &Graph,
        wanted: &[usize],
        deps: impl Fn(usize) -> Vec<usize>,
    ) -> Arc<Vec<bool>> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, need)) = known.iter().find(|(w, _)| w[..] == *wanted) {
            return need.clone();
        }
        let n = graph.nodes().len();
        let mut need = vec![false; n];
        for &o in wanted {
            if let Some(o) = graph.outputs().get(o) {
                need[o.value.index()] = true;
            }
        }
        // Until nothing changes: a fused step may sit after a node it computes.
        let mut changed = true;
        while changed {
            changed = false;
            for i in (0..n).rev() {
                if !need[i] {
                    continue;
                }
                for d in deps(i) {
                    changed |= !std::mem::replace(&mut need[d], true);
                }
            }
        }
        let need = Arc::new(need);
        known.push((wanted.to_vec(), need.clone()));
        need
    }
}

/// The positions in [`Graph::outputs`] of the outputs named in `wanted` (each position once,
/// in the graph's order).
pub fn output_positions(graph: &Graph, wanted: &[&str]) -> Vec<usize> {
    (0..graph.outputs().len())
        .filter(|&j| wanted.contains(&graph.outputs()[j].name.as_str()))
        .collect()
}

impl GraphExecutor for CpuGraph {
    fn graph(&self) -> &Graph {
        CpuGraph::graph(self)
    }

    fn run(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Value>, ExecError> {
        CpuGraph::run_values(self, inputs, params, None)
    }

    fn run_outputs(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
        wanted: &[&str],
    ) -> Result<HashMap<String, Value>, ExecError> {
        CpuGraph::run_values(self, inputs, params, Some(wanted))
    }

    fn run_indexed(
        &self,
        inputs: &mut [Option<Value>],
        params: &dyn ParamSource,
        wanted: &[usize],
        outputs: &mut [Option<Value>],
    ) -> Result<(), ExecError> {
        CpuGraph::run_indexed(self, inputs, params, wanted, outputs)
    }

    fn backend(&self) -> String {
        "cpu".into()
    }

    fn kernel_summary(&self) -> String {
        self.plan().summary()
    }

    fn profile(&self) -> Option<Vec<(String, f64, usize)>> {
        CpuGraph::profile(self)
    }

    fn run_host(
        &self,
        inputs: &HashMap<String, Tensor>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Tensor>, ExecError> {
        CpuGraph::run(self, inputs, params)
    }
}

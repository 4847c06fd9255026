//! The CUDA backend's executor: runs an optimized graph on the GPU.
//!
//! Three stages, each printable: [`select`] chooses a kernel per node ([`select::Plan`]);
//! [`CudaGraph::compile`] uploads the parameters the kernels read, once, in their declared
//! dtype (shared by the graphs compiled together, e.g. a causal LM's prefill and decode); the
//! run loop ([`run`]) binds sizes from the inputs, launches every step on the device's stream
//! and frees each value after its last reader (buffers return to the caching allocator, so a
//! decode loop at steady state does not call the driver to allocate). Values stay on the
//! device: a causal LM's KV cache moves between steps as [`DevTensor`]s, and only what the
//! caller reads (logits) is copied back. Nodes without a kernel run the reference executor's
//! op on the host, so coverage never changes results. With a [`external::Provider`]
//! ([`CudaGraph::compile_with`], `--codegen mlir`) the nodes it accepts run its PTX kernels,
//! falling back to the backend's own step when it has none for the shapes at hand.

pub mod external;
pub mod host;
pub mod kernels;
mod run;
pub mod select;

use crate::alloc::Buffer;
use crate::blas::Blas;
use crate::codegen::elementwise::Elementwise;
use crate::device::Device;
use crate::CudaError;
use cudarc::driver::CudaFunction;
use kiln_ir::{DType, Graph, Op};
use kiln_runtime::executor::{DeviceValue, GraphExecutor, NeededNodes, Value};
use kiln_runtime::profile::Profile;
use kiln_runtime::reference::{self, ExecError, ParamSource};
use kiln_runtime::Tensor;
use select::{Plan, Step};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A device with its BLAS handles and the parameters uploaded to it.
pub struct Backend {
    dev: Device,
    blas: Blas,
    params: Mutex<HashMap<String, Arc<Buffer>>>,
    /// The error flag of kernels that report bad input (integer division by zero).
    flag: Buffer,
}

impl Backend {
    /// Opens CUDA device `ordinal` with cuBLAS; an error (never a panic) without a driver, a
    /// device or the libraries.
    pub fn open(ordinal: usize) -> Result<Arc<Backend>, CudaError> {
        let dev = Device::open(ordinal)?;
        let blas = Blas::new(&dev)?;
        let flag = dev.filled(4, 0)?;
        Ok(Arc::new(Backend {
            dev,
            blas,
            params: Mutex::default(),
            flag,
        }))
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// cuBLAS.
    pub fn blas(&self) -> &Blas {
        &self.blas
    }

    /// Bytes of parameters on the device.
    pub fn param_bytes(&self) -> usize {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|b| b.len())
            .sum()
    }
}

/// A dense row-major tensor on the device.
#[derive(Clone)]
pub struct DevTensor {
    buf: Arc<Buffer>,
    dtype: DType,
    shape: Vec<usize>,
    backend: Arc<Backend>,
}

impl DevTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }
}

impl DeviceValue for DevTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn to_host(&self) -> Result<Tensor, ExecError> {
        let bytes = self.backend.dev.download(&self.buf).map_err(backend_err)?;
        if bytes.len() < self.bytes() {
            return Err(backend_err(CudaError::Args(format!(
                "a device value of {} bytes holds {}",
                self.bytes(),
                bytes.len()
            ))));
        }
        host::from_bytes(self.dtype, &self.shape, &bytes)
            .map_err(|e| backend_err(CudaError::Args(e.to_string())))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

fn backend_err(e: CudaError) -> ExecError {
    ExecError::Backend {
        backend: "cuda",
        detail: e.to_string(),
    }
}

/// A generated elementwise kernel ready to launch on concrete sizes.
struct Prepared {
    f: CudaFunction,
    meta: Buffer,
    divides: bool,
}

/// A generated kernel and the sizes (its `meta`) it was prepared for.
type KernelKey = (Elementwise, Vec<i64>);

/// A provider's PTX entry point, loaded, with its declared parameters.
struct PtxEntry {
    f: CudaFunction,
    params: Vec<external::Param>,
}

/// A graph compiled for a CUDA device.
pub struct CudaGraph {
    graph: Graph,
    plan: Plan,
    /// Per node: the last step reading it (`usize::MAX` for outputs).
    last_use: Vec<usize>,
    backend: Arc<Backend>,
    /// The constants, by node index, on the device.
    consts: HashMap<usize, DevTensor>,
    kernels: Mutex<HashMap<KernelKey, Arc<Prepared>>>,
    /// The provider of [`Step::External`] kernels, if any.
    provider: Option<Arc<external::Provider>>,
    /// Its entry points loaded so far, by PTX content hash and entry name.
    ptx_entries: Mutex<HashMap<(u128, String), Arc<PtxEntry>>>,
    profile: Option<Profile>,
    /// The nodes each set of wanted outputs needs.
    needed: NeededNodes,
}

impl CudaGraph {
    /// Plans `graphs` (verified first) and uploads the parameters their kernels read.
    pub fn compile(
        backend: &Arc<Backend>,
        graphs: Vec<Graph>,
        params: &dyn ParamSource,
    ) -> Result<Vec<CudaGraph>, ExecError> {
        Self::compile_with(backend, graphs, params, None)
    }

    /// [`CudaGraph::compile`], with the nodes `provider` accepts running its kernels.
    pub fn compile_with(
        backend: &Arc<Backend>,
        graphs: Vec<Graph>,
        params: &dyn ParamSource,
        provider: Option<&Arc<external::Provider>>,
    ) -> Result<Vec<CudaGraph>, ExecError> {
        let mut out = Vec::new();
        for graph in graphs {
            let graph = select::legalize(&graph)?;
            let plan = Plan::with_provider(&graph, provider.map(|p| &**p));
            let nodes = graph.nodes();
            let mut last_use: Vec<usize> = (0..nodes.len()).collect();
            let mut wanted = Vec::new();
            for (i, (step, node)) in plan.steps.iter().zip(nodes).enumerate() {
                if matches!(step, Step::Source | Step::Skip) {
                    continue;
                }
                for v in step.operands(node) {
                    last_use[v.index()] = i;
                    if let Some(Op::Param { name }) = graph.node(v).map(|n| &n.op) {
                        wanted.push(name.clone());
                    }
                }
                if let Step::Linear { weight, .. } = step {
                    wanted.push(weight.clone());
                }
            }
            for o in graph.outputs() {
                last_use[o.value.index()] = usize::MAX;
            }
            upload_params(backend, &wanted, params)?;
            let mut consts = HashMap::new();
            for (id, node) in graph.iter() {
                if plan.steps[id.index()] == Step::Const {
                    let t = reference::eval_node(id, node, &kiln_ir::Bindings::new(), &[])?;
                    let buf = backend
                        .dev
                        .upload(&host::to_bytes(&t))
                        .map_err(backend_err)?;
                    let dt = DevTensor {
                        buf: Arc::new(buf),
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                        backend: backend.clone(),
                    };
                    consts.insert(id.index(), dt);
                }
            }
            out.push(CudaGraph {
                graph,
                plan,
                last_use,
                consts,
                backend: backend.clone(),
                kernels: Mutex::default(),
                provider: provider.cloned(),
                ptx_entries: Mutex::default(),
                profile: Profile::from_env(),
                needed: NeededNodes::default(),
            });
        }
        Ok(out)
    }

    /// The kernel plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

fn upload_params(
    backend: &Backend,
    names: &[String],
    params: &dyn ParamSource,
) -> Result<(), ExecError> {
    let mut held = backend.params.lock().unwrap_or_else(|e| e.into_inner());
    for name in names {
        if held.contains_key(name) {
            continue;
        }
        let t = params
            .get(name)
            .ok_or_else(|| ExecError::MissingParam(name.clone()))?;
        let buf = backend
            .dev
            .upload(&host::to_bytes(t))
            .map_err(backend_err)?;
        held.insert(name.clone(), Arc::new(buf));
    }
    Ok(())
}

impl GraphExecutor for CudaGraph {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn run(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
    ) -> Result<HashMap<String, Value>, ExecError> {
        run::run(self, inputs, params, None)
    }

    fn run_outputs(
        &self,
        inputs: HashMap<String, Value>,
        params: &dyn ParamSource,
        wanted: &[&str],
    ) -> Result<HashMap<String, Value>, ExecError> {
        run::run(self, inputs, params, Some(wanted))
    }

    fn backend(&self) -> String {
        format!("cuda ({})", self.backend.dev.name())
    }

    fn kernel_summary(&self) -> String {
        self.plan.summary()
    }

    fn profile(&self) -> Option<Vec<(String, f64, usize)>> {
        self.profile.as_ref().map(Profile::report)
    }
}

//! Where models run (`--device cpu|cuda|auto`): a model's graphs are compiled for the CUDA
//! backend ([`compile`]; no CPU plan is made) when that is asked for (or, with `auto`, when a
//! CUDA device, driver and cuBLAS are present). Without them `cuda` is an error naming what is
//! missing and `auto` stays on the CPU.

use kiln_cuda::exec::external::Provider;
use kiln_cuda::exec::{Backend, CudaGraph};
use kiln_ir::Graph;
use kiln_runtime::deploy::Compile;
use kiln_runtime::{GraphExecutor, ModelError, Params};
use std::sync::{Arc, OnceLock};

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device 0; an error without one.
    Cuda,
    /// CUDA device 0 when there is one, else the CPU.
    Auto,
}

/// The process's CUDA backend on device 0, opened once; why not, as text.
pub fn cuda_backend() -> Result<Arc<Backend>, String> {
    static BACKEND: OnceLock<Result<Arc<Backend>, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| Backend::open(0).map_err(|e| e.to_string()))
        .clone()
}

/// The backend `placement` resolves to: `Some` for CUDA, `None` for the CPU.
pub fn resolve(placement: Placement) -> Result<Option<Arc<Backend>>, String> {
    match placement {
        Placement::Cpu => Ok(None),
        Placement::Cuda => cuda_backend().map(Some),
        Placement::Auto => Ok(cuda_backend().ok()),
    }
}

/// The function that compiles a model's graphs for `backend` (parameters uploaded once, shared
/// by the graphs), with `provider`'s kernels where it has them (`--codegen mlir`); its errors
/// name `--device cuda`.
pub fn compile(backend: Arc<Backend>, provider: Option<Arc<Provider>>) -> Box<Compile> {
    Box::new(move |graphs: Vec<Graph>, params: &Params| {
        Ok(
            CudaGraph::compile_with(&backend, graphs, params, provider.as_ref())
                .map_err(|e| ModelError(format!("--device cuda: {e}")))?
                .into_iter()
                .map(|g| Box::new(g) as Box<dyn GraphExecutor>)
                .collect(),
        )
    })
}

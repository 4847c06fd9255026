//! `--codegen native|mlir`: whose kernels the backends run. `native` (the default) is the
//! hand-written kernels (`kiln-kernels` on the CPU, NVRTC's on CUDA); `mlir` (feature `mlir`)
//! compiles a loaded model's graphs with [`kiln_compiler::mlir::MlirProvider`] hooked into the
//! CPU backend ([`kiln_runtime::cpu::external`], [`compile`]), or on `--device cuda` with
//! [`kiln_compiler::mlir::MlirCudaProvider`]'s PTX hooked into the CUDA backend
//! ([`kiln_cuda::exec::external`], [`cuda_provider`]): fused elementwise bodies, norms, softmax,
//! products of activations and attention run as MLIR kernels, anything MLIR cannot lower keeps
//! its native kernel.

use kiln_cuda::exec::external::Provider as CudaProvider;
use kiln_runtime::deploy::{self, Compile};
use std::sync::Arc;

/// Whose kernels the CPU backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codegen {
    /// `kiln-kernels`' kernels.
    #[default]
    Native,
    /// MLIR-JIT kernels where MLIR lowers the node (needs the `mlir` feature).
    Mlir,
}

/// Why `--codegen mlir` cannot be had in this build, or `None` when it can.
pub fn unavailable(codegen: Codegen) -> Option<&'static str> {
    (codegen == Codegen::Mlir && !cfg!(feature = "mlir")).then_some(
        "--codegen mlir: this kiln was built without MLIR support (rebuild with \
         `--features mlir`, see DEVELOPERS.md)",
    )
}

/// The function that compiles a model's graphs for the CPU backend with `codegen`'s kernels.
pub fn compile(codegen: Codegen) -> Result<Box<Compile>, String> {
    match codegen {
        Codegen::Native => Ok(Box::new(deploy::cpu)),
        Codegen::Mlir => imp::compile(),
    }
}

/// The CUDA backend's kernel provider for `codegen` (`None`: its own kernels only).
pub fn cuda_provider(codegen: Codegen) -> Result<Option<Arc<CudaProvider>>, String> {
    match codegen {
        Codegen::Native => Ok(None),
        Codegen::Mlir => imp::cuda_provider().map(Some),
    }
}

#[cfg(feature = "mlir")]
mod imp {
    use kiln_compiler::mlir::{MlirCudaProvider, MlirProvider};
    use kiln_cuda::exec::external::Provider as CudaProvider;
    use kiln_ir::Graph;
    use kiln_runtime::cpu::external::Provider;
    use kiln_runtime::cpu::CpuGraph;
    use kiln_runtime::deploy::Compile;
    use kiln_runtime::{GraphExecutor, ModelError, Params};
    use std::sync::Arc;

    /// The CPU backend's plans with MLIR kernels (one kernel cache for every graph).
    pub fn compile() -> Result<Box<Compile>, String> {
        let provider = Provider::new(Arc::new(MlirProvider::new()));
        Ok(Box::new(move |graphs: Vec<Graph>, params: &Params| {
            Ok(CpuGraph::compile_with(graphs, params, Some(&provider))
                .map_err(|e| ModelError(e.to_string()))?
                .into_iter()
                .map(|g| Box::new(g) as Box<dyn GraphExecutor>)
                .collect())
        }))
    }

    /// MLIR PTX kernels for the CUDA backend.
    pub fn cuda_provider() -> Result<Arc<CudaProvider>, String> {
        Ok(CudaProvider::new(Arc::new(MlirCudaProvider::new())))
    }
}

#[cfg(not(feature = "mlir"))]
mod imp {
    use super::{unavailable, Codegen};
    use kiln_cuda::exec::external::Provider;
    use kiln_runtime::deploy::Compile;
    use std::sync::Arc;

    pub fn compile() -> Result<Box<Compile>, String> {
        Err(unavailable(Codegen::Mlir).unwrap_or_default().to_string())
    }

    pub fn cuda_provider() -> Result<Arc<Provider>, String> {
        Err(unavailable(Codegen::Mlir).unwrap_or_default().to_string())
    }
}

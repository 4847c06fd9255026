//! `--codegen native|mlir`: whose kernels the backends run. `native` (the default) is the
//! hand-written kernels (`kiln-kernels` on the CPU, NVRTC's on CUDA); `mlir` (feature `mlir`)
//! compiles a loaded model's graphs with [`kiln_compiler::mlir::MlirProvider`] hooked into the
//! CPU backend ([`kiln_runtime::cpu::external`], [`compile`]), or on `--device cuda` with
//! [`kiln_compiler::mlir::MlirCudaProvider`]'s PTX hooked into the CUDA backend
//! ([`kiln_cuda::exec::external`], [`cuda_provider`]): fused elementwise bodies, norms, softmax,
//! products of activations and attention run as MLIR kernels, anything MLIR cannot lower keeps
//! its native kernel. An artifact compiled with `--emit-mlir` carries its kernels' MLIR
//! ([`carried_mlir`]); [`compile`] hands it to the provider, which compiles from it the
//! kernels whose carried module is exactly its own lowering (`kiln_compiler::mlir::carry`).
//! The CUDA backend lowers its PTX kernels afresh (an artifact carries CPU kernels only).

use kiln_cuda::exec::external::Provider as CudaProvider;
use kiln_ir::Graph;
use kiln_runtime::artifact::MlirRecord;
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
pub fn unavailable(codegen: Codegen) -> Option<String> {
    (codegen == Codegen::Mlir)
        .then(|| missing("--codegen mlir"))
        .flatten()
}

/// In a build without the `mlir` feature, the error for `flag`, which needs it; else `None`.
pub fn missing(flag: &str) -> Option<String> {
    (!cfg!(feature = "mlir")).then(|| {
        format!(
            "{flag}: this kiln was built without MLIR support (rebuild with `--features mlir`, \
             see DEVELOPERS.md)"
        )
    })
}

/// The function that compiles a model's graphs for the CPU backend with `codegen`'s kernels;
/// with `mlir`, compiling from `carried` (an artifact's MLIR) what it can.
pub fn compile(codegen: Codegen, carried: Option<&MlirRecord>) -> Result<Box<Compile>, String> {
    match codegen {
        Codegen::Native => Ok(Box::new(deploy::cpu)),
        Codegen::Mlir => imp::compile(carried),
    }
}

/// The MLIR an artifact of `graphs` carries (`kiln compile --emit-mlir`): every distinct kernel
/// of their `--codegen mlir` CPU plans, see `kiln_compiler::mlir::carry::record`. Needs the
/// `mlir` feature (`Err` says so without it).
pub fn carried_mlir(graphs: &[Graph]) -> Result<MlirRecord, String> {
    imp::carried_mlir(graphs)
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
    use kiln_compiler::mlir::{carry, MlirCudaProvider, MlirProvider};
    use kiln_cuda::exec::external::Provider as CudaProvider;
    use kiln_ir::Graph;
    use kiln_runtime::artifact::MlirRecord;
    use kiln_runtime::cpu::external::Provider;
    use kiln_runtime::cpu::CpuGraph;
    use kiln_runtime::deploy::Compile;
    use kiln_runtime::{GraphExecutor, ModelError, Params};
    use std::sync::Arc;

    /// The CPU backend's plans with MLIR kernels (one kernel cache for every graph), compiled
    /// from `carried` where it holds them.
    pub fn compile(carried: Option<&MlirRecord>) -> Result<Box<Compile>, String> {
        let mlir = match carried {
            Some(r) => MlirProvider::carrying(r.clone()),
            None => MlirProvider::new(),
        };
        let provider = Provider::new(Arc::new(mlir));
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

    pub fn carried_mlir(graphs: &[Graph]) -> Result<MlirRecord, String> {
        Ok(carry::record(graphs))
    }
}

#[cfg(not(feature = "mlir"))]
mod imp {
    use super::{missing, unavailable, Codegen};
    use kiln_cuda::exec::external::Provider;
    use kiln_ir::Graph;
    use kiln_runtime::artifact::MlirRecord;
    use kiln_runtime::deploy::Compile;
    use std::sync::Arc;

    pub fn compile(_: Option<&MlirRecord>) -> Result<Box<Compile>, String> {
        Err(unavailable(Codegen::Mlir).unwrap_or_default())
    }

    pub fn cuda_provider() -> Result<Arc<Provider>, String> {
        Err(unavailable(Codegen::Mlir).unwrap_or_default())
    }

    pub fn carried_mlir(_: &[Graph]) -> Result<MlirRecord, String> {
        Err(missing("--emit-mlir").unwrap_or_default())
    }
}

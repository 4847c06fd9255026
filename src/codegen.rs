//! `--codegen native|mlir`: whose kernels the CPU backend runs. `native` (the default) is the
//! hand-written kernels of `kiln-kernels`; `mlir` (feature `mlir`) recompiles a loaded model's
//! graphs with [`kiln_compiler::mlir::MlirProvider`] hooked into the CPU backend
//! ([`kiln_runtime::cpu::external`]) when a model's graphs are compiled ([`compile`]): fused
//! elementwise bodies, norms, softmax and products of activations run as MLIR-JIT kernels,
//! anything MLIR cannot lower keeps its native kernel.

use kiln_runtime::deploy::{self, Compile};

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

#[cfg(feature = "mlir")]
mod imp {
    use kiln_compiler::mlir::MlirProvider;
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
}

#[cfg(not(feature = "mlir"))]
mod imp {
    use super::{unavailable, Codegen};
    use kiln_runtime::deploy::Compile;

    pub fn compile() -> Result<Box<Compile>, String> {
        Err(unavailable(Codegen::Mlir).unwrap_or_default().to_string())
    }
}

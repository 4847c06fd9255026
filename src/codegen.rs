//! `--codegen native|mlir`: whose kernels the CPU backend runs. `native` (the default) is the
//! hand-written kernels of `kiln-kernels`; `mlir` (feature `mlir`) recompiles a loaded model's
//! graphs with [`kiln_compiler::mlir::MlirProvider`] hooked into the CPU backend
//! ([`kiln_runtime::cpu::external`]): fused elementwise bodies, norms, softmax and products of
//! activations run as MLIR-JIT kernels, anything MLIR cannot lower keeps its native kernel.

use kiln_runtime::deploy::{CausalModel, EncoderModel, Model};

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

/// `model` with its graphs planned for `codegen` (unchanged for [`Codegen::Native`]).
pub fn apply(model: Model, codegen: Codegen) -> Result<Model, String> {
    Ok(match model {
        Model::Causal(m) => Model::Causal(causal(m, codegen)?),
        Model::Encoder(e) => Model::Encoder(encoder(e, codegen)?),
    })
}

/// A causal LM with its graphs planned for `codegen`.
pub fn causal(m: CausalModel, codegen: Codegen) -> Result<CausalModel, String> {
    if codegen == Codegen::Native {
        return Ok(m);
    }
    imp::causal(m)
}

/// An encoder with its graph planned for `codegen`.
pub fn encoder(e: EncoderModel, codegen: Codegen) -> Result<EncoderModel, String> {
    if codegen == Codegen::Native {
        return Ok(e);
    }
    imp::encoder(e)
}

#[cfg(feature = "mlir")]
mod imp {
    use kiln_compiler::mlir::MlirProvider;
    use kiln_runtime::cpu::external::Provider;
    use kiln_runtime::cpu::CpuGraph;
    use kiln_runtime::deploy::{CausalModel, EncoderModel};
    use kiln_runtime::encoder::EncoderRunner;
    use kiln_runtime::{GraphExecutor, GraphLm};
    use std::sync::Arc;

    /// The CPU backend's plans of `graphs` with MLIR kernels.
    fn plan(
        graphs: Vec<kiln_ir::Graph>,
        params: &kiln_runtime::Params,
    ) -> Result<Vec<Box<dyn GraphExecutor>>, String> {
        let provider = Provider::new(Arc::new(MlirProvider::new()));
        Ok(CpuGraph::compile_with(graphs, params, Some(&provider))
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|g| Box::new(g) as Box<dyn GraphExecutor>)
            .collect())
    }

    pub fn causal(m: CausalModel) -> Result<CausalModel, String> {
        let (layers, vocab) = (m.info.num_layers, m.info.vocab_size);
        m.map_lm(|lm| {
            let (prefill, decode, _) = lm.parts();
            let graphs = vec![prefill.clone(), decode.clone()];
            let params = lm.into_params();
            let mut it = plan(graphs, &params)?.into_iter();
            let (Some(p), Some(d)) = (it.next(), it.next()) else {
                return Err("internal: expected two planned graphs".to_string());
            };
            Ok(GraphLm::with_executors(p, d, params, layers, vocab))
        })
    }

    pub fn encoder(e: EncoderModel) -> Result<EncoderModel, String> {
        let token_types = e.info.uses_token_types;
        e.map_runner(|runner| {
            let graph = runner.parts().0.clone();
            let params = runner.into_params();
            let plan = plan(vec![graph], &params)?
                .pop()
                .ok_or("internal: expected one planned graph")?;
            Ok(EncoderRunner::with_executor(plan, params, token_types))
        })
    }
}

#[cfg(not(feature = "mlir"))]
mod imp {
    use super::{unavailable, Codegen};
    use kiln_runtime::deploy::{CausalModel, EncoderModel};

    fn refused() -> String {
        unavailable(Codegen::Mlir).unwrap_or_default().to_string()
    }

    pub fn causal(_: CausalModel) -> Result<CausalModel, String> {
        Err(refused())
    }

    pub fn encoder(_: EncoderModel) -> Result<EncoderModel, String> {
        Err(refused())
    }
}

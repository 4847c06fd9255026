//! Where models run (`--device cpu|cuda|auto`): a model is loaded and planned for the CPU, then
//! its graphs are compiled for the CUDA backend when that is asked for (or, with `auto`, when
//! a CUDA device, driver and cuBLAS are present). Without them `cuda` is an error naming what
//! is missing and `auto` stays on the CPU.

use kiln_cuda::exec::{Backend, CudaGraph};
use kiln_runtime::deploy::{CausalModel, EncoderModel, Model};
use kiln_runtime::encoder::EncoderRunner;
use kiln_runtime::{GraphExecutor, GraphLm};
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

/// `model` with its graphs compiled for `backend` (the CPU plan is dropped).
pub fn to_cuda(model: Model, backend: &Arc<Backend>) -> Result<Model, String> {
    Ok(match model {
        Model::Causal(m) => Model::Causal(causal_to_cuda(m, backend)?),
        Model::Encoder(e) => Model::Encoder(encoder_to_cuda(e, backend)?),
    })
}

/// A causal LM with its prefill and decode graphs compiled for `backend`.
pub fn causal_to_cuda(m: CausalModel, backend: &Arc<Backend>) -> Result<CausalModel, String> {
    let (layers, vocab) = (m.info.num_layers, m.info.vocab_size);
    m.map_lm(|lm| {
        let (prefill, decode, _) = lm.parts();
        let graphs = vec![prefill.clone(), decode.clone()];
        let params = lm.into_params();
        let compiled = CudaGraph::compile(backend, graphs, &params).map_err(|e| e.to_string())?;
        let mut it = compiled
            .into_iter()
            .map(|g| Box::new(g) as Box<dyn GraphExecutor>);
        let (Some(p), Some(d)) = (it.next(), it.next()) else {
            return Err("internal: expected two compiled graphs".to_string());
        };
        Ok(GraphLm::with_executors(p, d, params, layers, vocab))
    })
}

/// An encoder with its graph compiled for `backend`.
pub fn encoder_to_cuda(e: EncoderModel, backend: &Arc<Backend>) -> Result<EncoderModel, String> {
    let token_types = e.info.uses_token_types;
    e.map_runner(|runner| {
        let graph = runner.parts().0.clone();
        let params = runner.into_params();
        let compiled = CudaGraph::compile(backend, vec![graph], &params)
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or("internal: expected one compiled graph")?;
        Ok(EncoderRunner::with_executor(
            Box::new(compiled),
            params,
            token_types,
        ))
    })
}

//! The compile side of artifacts: a Hugging Face model directory loaded as for running
//! (traced, optimized for the target, lowered to the precision, weights bound and converted),
//! then written with `kiln_runtime::artifact::write`, with the kernels' MLIR when asked
//! (`--emit-mlir`). The same directory and options always give the same bytes.

use crate::codegen;
use crate::load::{self, LoadError, LoadOptions};
use kiln_compiler::pipeline::Report;
use kiln_ir::Graph;
use kiln_models::{Head, ModelDir};
use kiln_runtime::artifact::{format, write, Manifest};
use std::path::Path;

/// How to compile.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompileOptions {
    /// Target and precision (the optimizer always runs).
    pub load: LoadOptions,
    /// The longest sequence the artifact will accept.
    pub max_seq: Option<usize>,
    /// The largest batch the artifact will accept.
    pub max_batch: Option<usize>,
    /// Carry the kernels' MLIR (`--emit-mlir`; needs the `mlir` feature, see
    /// [`crate::codegen::carried_mlir`]).
    pub emit_mlir: bool,
}

/// Compiles the model directory `dir` into artifact bytes, with the optimizer's reports.
pub fn compile(dir: &Path, opts: &CompileOptions) -> Result<(Vec<u8>, Vec<Report>), LoadError> {
    if load::is_artifact(dir) {
        return Err(LoadError::Unsupported(format!(
            "{} is a file; kiln compile takes a model directory",
            dir.display()
        )));
    }
    if opts.emit_mlir && !format::runs_here(opts.load.target.name) {
        return Err(LoadError::Unsupported(format!(
            "--emit-mlir carries the CPU backend's MLIR kernels; the target is {}",
            opts.load.target.name
        )));
    }
    let head = ModelDir::open(dir)?.config.head;
    let causal = head == Head::CausalLm;
    let manifest = |model| Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        target: opts.load.target.name.to_string(),
        precision: opts.load.precision.name().to_string(),
        max_seq: opts.max_seq,
        max_batch: opts.max_batch,
        graphs: format::graph_names(causal)
            .iter()
            .map(|s| s.to_string())
            .collect(),
        model,
    };
    let mlir = |graphs: &[Graph]| {
        opts.emit_mlir
            .then(|| codegen::carried_mlir(graphs).map_err(LoadError::Unsupported))
            .transpose()
    };
    let (bytes, reports) = if causal {
        let lm = load::causal_lm_with(dir, &opts.load)?;
        let (prefill, decode, params) = lm.model.lm.parts();
        let graphs = [prefill.clone(), decode.clone()];
        let bytes = write::to_bytes(
            &manifest(lm.model.info.clone()),
            &graphs,
            params,
            &lm.model.assets,
            mlir(&graphs)?.as_ref(),
        );
        (bytes, lm.reports)
    } else {
        let enc = load::encoder_with(dir, &opts.load)?;
        let (graph, params) = enc.model.runner.parts();
        let graphs = std::slice::from_ref(graph);
        let bytes = write::to_bytes(
            &manifest(enc.model.info.clone()),
            graphs,
            params,
            &enc.model.assets,
            mlir(graphs)?.as_ref(),
        );
        (bytes, enc.reports)
    };
    Ok((bytes?, reports))
}

//! Loading a model for running, from a Hugging Face model directory (parse the config, trace
//! the family's graphs, optimize them unless asked not to, lower the precision, bind the
//! weights) or from an artifact (`kiln compile`'s output, read by `kiln_runtime::artifact`),
//! into the runtime's ready-to-use [`CausalModel`] or [`EncoderModel`].

use crate::codegen::{self, Codegen};
use crate::placement::{self, Placement};
use kiln_compiler::cost::Target;
use kiln_compiler::pipeline::{optimize, run_lowered, Limits, OptimizeError, Report};
use kiln_compiler::precision::{
    lower_precision, Precision, PrecisionError, BOUND_SUFFIX, E4M3_MAX, RESIDUAL_SUFFIX,
    ROUNDED_SUFFIX, SCALE_SUFFIX,
};
use kiln_ir::{DType, Graph};
use kiln_models::encoder::{base_model_prefix, trace_encoder};
use kiln_models::nn::adapt_param_names;
use kiln_models::pooling::{self, Pooling};
use kiln_models::{config::Family, CausalGraphs, Head, ModelDir, ModelError};
use kiln_runtime::artifact::{Artifact, ArtifactError, MlirRecord};
use kiln_runtime::deploy::{CausalModel, Compile, EncoderModel, InputLimits, Model};
use kiln_runtime::info::{Assets, ModelInfo};
use kiln_runtime::weights::{Checkpoint, Convert, WeightsError};
pub use kiln_runtime::Params;
use kiln_runtime::Tensor;
use std::path::Path;

/// Loading a model failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory or its config is unusable, or tracing failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The weights are unusable (missing tensor, wrong shape, corrupt file).
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The model cannot do what was asked (e.g. generate with an encoder).
    #[error("{0}")]
    Unsupported(String),
    /// The optimizer failed (a kiln bug, not a problem with the model).
    #[error(transparent)]
    Optimize(#[from] OptimizeError),
    /// The precision cannot be run on the target.
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    /// The artifact is unusable.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

/// How a model is prepared for running.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Run the optimizer over the traced graphs (on by default; off to compare).
    pub optimize: bool,
    /// The machine the cost model optimizes for.
    pub target: Target,
    /// Numeric precision (f32 by default); lowered after optimizing, see
    /// [`kiln_compiler::precision`]. Weights are then bound converted (`Convert::Cast`).
    pub precision: Precision,
    /// Where the model runs (the CPU by default).
    pub placement: Placement,
    /// Whose kernels the CPU backend runs (`--codegen`, native by default).
    pub codegen: Codegen,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            optimize: true,
            target: Target::cpu(),
            precision: Precision::F32,
            placement: Placement::Cpu,
            codegen: Codegen::Native,
        }
    }
}

/// The graphs as they will run: optimized for the target when asked, lowered to the precision
/// asked for, then (when optimizing) given the passes that follow lowering
/// ([`kiln_compiler::pipeline::lowered_passes`]); one report per optimized graph.
pub fn prepare(
    graphs: Vec<Graph>,
    opts: &LoadOptions,
) -> Result<(Vec<Graph>, Vec<Report>), LoadError> {
    let mut out = Vec::with_capacity(graphs.len());
    let mut reports = Vec::with_capacity(graphs.len());
    let (target, limits) = (&opts.target, &Limits::default());
    for g in graphs {
        if opts.optimize {
            let (optimized, mut report) = optimize(&g, target, limits)?;
            let lowered = lower_precision(&optimized, opts.precision, target)?;
            out.push(run_lowered(&lowered, target, limits, &mut report)?);
            reports.push(report);
        } else {
            out.push(lower_precision(&g, opts.precision, target)?);
        }
    }
    Ok((out, reports))
}

/// How the weights are bound for `precision`: exactly for f32, converted to the narrower
/// declared dtypes otherwise.
fn convert_for(precision: Precision) -> Convert {
    match precision {
        Precision::F32 => Convert::Exact,
        _ => Convert::Cast,
    }
}

/// Opens the directory's weights, adapts the graphs' parameter names to the names the
/// checkpoint uses (base-model prefix present or not, legacy `gamma`/`beta`, as
/// `from_pretrained` does), and binds the first graph's parameters (all graphs of a model share
/// them).
fn bind(
    dir: &ModelDir,
    graphs: &[&Graph],
    convert: Convert,
) -> Result<(Vec<Graph>, Params), LoadError> {
    let ckpt = Checkpoint::open_many(&dir.weight_files()?)?;
    let prefix = base_model_prefix(&dir.config.model_type);
    // An fp8 weight's scale and residual and a weight's rounded copy are named after the
    // weight, and follow its renaming.
    let has = |n: &str| ckpt.info(n).is_some() || ckpt.info(derived_from(n)).is_some();
    let adapted: Vec<Graph> = graphs
        .iter()
        .map(|g| adapt_param_names(g, prefix, has))
        .collect();
    let params = match adapted.first() {
        Some(g) => bind_with_copies(&ckpt, g, convert)?,
        None => Params::new(),
    };
    Ok((adapted, params))
}

/// The weight a derived parameter's name is made from (`w` for `w.scale`, `w.rounded`,
/// `w.residual`, `w.residual.scale`, `w.residual.bound`), else the name itself.
fn derived_from(name: &str) -> &str {
    let mut n = name;
    for suffix in [SCALE_SUFFIX, BOUND_SUFFIX, ROUNDED_SUFFIX, RESIDUAL_SUFFIX] {
        n = n.strip_suffix(suffix).unwrap_or(n);
    }
    n
}

/// Binds `g`'s parameters ([`bind_scaled`]), then each rounded copy `<w>.rounded` as `w` cast
/// to its declared dtype (see [`ROUNDED_SUFFIX`]).
fn bind_with_copies(ckpt: &Checkpoint, g: &Graph, convert: Convert) -> Result<Params, LoadError> {
    let copies: Vec<(&str, &str, DType)> = g
        .params()
        .filter_map(|(n, _, t)| Some((n, n.strip_suffix(ROUNDED_SUFFIX)?, t.dtype)))
        .collect();
    if copies.is_empty() {
        return bind_scaled(ckpt, g, convert);
    }
    let mut originals = Graph::new();
    for (name, _, ty) in g.params() {
        if !copies.iter().any(|c| c.0 == name) {
            originals.param(name, ty.clone());
        }
    }
    let mut params = bind_scaled(ckpt, &originals, convert)?;
    for (name, weight, dtype) in copies {
        let w = params.get(weight).ok_or_else(|| {
            LoadError::Unsupported(format!(
                "internal: {name} copies {weight}, which is not bound"
            ))
        })?;
        let copy = w.cast(dtype);
        params.insert(name.to_string(), copy);
    }
    Ok(params)
}

/// Binds `g`'s parameters; fp8 (e4m3) weights with a `<name>.scale` parameter are stored
/// scaled: `scale = amax(|w|) / 448` (1 for all zeros), the weight bound as `w / scale` in e4m3
/// and the scale as an f32 scalar (see [`kiln_compiler::precision`]).
fn bind_scaled(ckpt: &Checkpoint, g: &Graph, convert: Convert) -> Result<Params, LoadError> {
    let names: std::collections::HashSet<&str> = g.params().map(|(n, _, _)| n).collect();
    let scaled = |name: &str, dtype: DType| {
        dtype == DType::F8E4M3 && names.contains(format!("{name}{SCALE_SUFFIX}").as_str())
    };
    if !g.params().any(|(n, _, t)| scaled(n, t.dtype)) {
        return Ok(ckpt.bind(g, convert)?);
    }
    // Bind everything but the scales and residuals, the scaled weights as f32, then scale
    // them (and make their residuals).
    let mut plain = Graph::new();
    let mut fp8 = Vec::new();
    for (name, _, ty) in g.params() {
        let derived = derived_from(name);
        if derived != name
            && g.params()
                .any(|(n, _, t)| n == derived && scaled(n, t.dtype))
        {
            continue;
        }
        let mut ty = ty.clone();
        if scaled(name, ty.dtype) {
            fp8.push(name.to_string());
            ty.dtype = DType::F32;
        }
        plain.param(name, ty);
    }
    let mut params = ckpt.bind(&plain, convert)?;
    for name in fp8 {
        let w = params
            .remove(&name)
            .ok_or_else(|| LoadError::Unsupported(format!("internal: {name} not bound")))?;
        let data = w
            .as_f32()
            .ok_or_else(|| LoadError::Unsupported(format!("internal: {name} not f32")))?;
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        // Per-channel scales `[rows, 1]` or `[1, cols]` (the declared scale says which), else
        // one per tensor.
        let scale_ty = g
            .params()
            .find(|(n, ..)| *n == scale_name)
            .map(|(_, _, t)| t);
        let per_row = scale_ty
            .and_then(|t| t.shape.get(1))
            .and_then(|d| d.as_fixed())
            == Some(1);
        let (rows, cols, per_channel) = match (w.shape(), scale_ty.map_or(0, |t| t.rank())) {
            (&[r, c], 2) => (r, c, true),
            _ => (1, data.len(), false),
        };
        let of: fn(usize, usize) -> usize = if per_channel && !per_row {
            |i, cols| i % cols
        } else {
            |i, cols| i / cols
        };
        let groups = if per_channel && !per_row { cols } else { rows };
        let (scales, stored) = e4m3_scaled(data, groups, |i| of(i, cols));
        let bad = |e: kiln_runtime::tensor::ShapeMismatch| LoadError::Unsupported(e.to_string());
        let stored = Tensor::from_f32(w.shape().to_vec(), stored)
            .map_err(bad)?
            .cast(DType::F8E4M3);
        let residual = format!("{name}{RESIDUAL_SUFFIX}");
        if names.contains(residual.as_str()) {
            if !(per_channel && per_row) {
                return Err(LoadError::Unsupported(format!(
                    "internal: {residual} needs per-row scales"
                )));
            }
            let widened = stored.cast(DType::F32);
            let coarse: Vec<f32> = widened
                .as_f32()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, &v)| v * scales[i / cols])
                .collect();
            for (part, tensor) in residual_parts(rows, cols, data, &coarse).map_err(bad)? {
                params.insert(format!("{residual}{part}"), tensor);
            }
        }
        params.insert(name.clone(), stored);
        let scale_shape = match (per_channel, per_row) {
            (false, _) => vec![],
            (true, true) => vec![rows, 1],
            (true, false) => vec![1, cols],
        };
        params.insert(
            scale_name,
            Tensor::from_f32(scale_shape, scales).map_err(bad)?,
        );
    }
    Ok(params)
}

/// fp8 scaling of `data`, its elements grouped by `of(i)` into `groups` channels: each channel's
/// scale `amax(|w|) / 448` (1 for an all-zero or non-finite channel) and every element divided
/// by its channel's scale, clamped to e4m3's range.
fn e4m3_scaled(data: &[f32], groups: usize, of: impl Fn(usize) -> usize) -> (Vec<f32>, Vec<f32>) {
    let mut amax = vec![0.0f32; groups];
    for (i, x) in data.iter().enumerate() {
        let g = of(i);
        amax[g] = amax[g].max(x.abs());
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| {
            if a > 0.0 && a.is_finite() {
                a / E4M3_MAX
            } else {
                1.0
            }
        })
        .collect();
    let scaled = data
        .iter()
        .enumerate()
        .map(|(i, x)| (x / scales[of(i)]).clamp(-E4M3_MAX, E4M3_MAX))
        .collect();
    (scales, scaled)
}

/// The residual of an fp8 weight `w` (`rows × cols`, row-major) stored as `coarse` (its e4m3
/// values times their scales): `r = w − coarse` stored in e4m3 with one scale per row
/// (`amax / 448`, 1 for a zero row), and each stored residual row's L2 norm as a bound,
/// rounded up to f32 (see [`kiln_ir::Op::RefineLogits`]). As `(suffix, tensor)`: the
/// residual (`""`), its scale and its bound.
fn residual_parts(
    rows: usize,
    cols: usize,
    w: &[f32],
    coarse: &[f32],
) -> Result<[(String, Tensor); 3], kiln_runtime::tensor::ShapeMismatch> {
    let r: Vec<f32> = w.iter().zip(coarse).map(|(w, c)| w - c).collect();
    let (scales, scaled) = e4m3_scaled(&r, rows, |i| i / cols);
    let stored = Tensor::from_f32(vec![rows, cols], scaled)?.cast(DType::F8E4M3);
    let widened = stored.cast(DType::F32);
    let widened = widened.as_f32().unwrap_or_default();
    let bounds: Vec<f32> = widened
        .chunks(cols.max(1))
        .zip(&scales)
        .map(|(row, &scale)| {
            let sq: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum();
            let b = sq.sqrt() * f64::from(scale);
            let f = b as f32;
            if f64::from(f) < b {
                f.next_up()
            } else {
                f
            }
        })
        .collect();
    Ok([
        (String::new(), stored),
        (
            SCALE_SUFFIX.to_string(),
            Tensor::from_f32(vec![rows], scales)?,
        ),
        (
            BOUND_SUFFIX.to_string(),
            Tensor::from_f32(vec![rows], bounds)?,
        ),
    ])
}

/// The causal LM graphs of a config, or why it has none.
pub fn causal_graphs(dir: &ModelDir) -> Result<CausalGraphs, LoadError> {
    let cfg = &dir.config;
    if cfg.head != Head::CausalLm {
        return Err(LoadError::Unsupported(format!(
            "{} is a {} model with a {:?} head, not a causal LM",
            dir.path.display(),
            cfg.model_type,
            cfg.head
        )));
    }
    let graphs = match &cfg.family {
        Family::Decoder(d) => d.trace(),
        Family::Gpt2(g) => g.trace(),
        Family::Bert(_) | Family::DistilBert(_) => {
            return Err(LoadError::Unsupported(format!(
                "{} is an encoder ({}), not a causal LM",
                dir.path.display(),
                cfg.model_type
            )))
        }
    };
    Ok(graphs.map_err(ModelError::from)?)
}

/// A causal LM loaded from a directory or an artifact, with the optimizer's reports for its
/// prefill and decode graphs (empty when not optimized or from an artifact).
pub struct CausalLm {
    /// The model.
    pub model: CausalModel,
    /// The optimizer's reports.
    pub reports: Vec<Report>,
}

/// An encoder (BERT, DistilBERT) loaded from a directory or an artifact, with the optimizer's
/// report (empty when not optimized or from an artifact).
pub struct Encoder {
    /// The model.
    pub model: EncoderModel,
    /// The optimizer's reports.
    pub reports: Vec<Report>,
}

/// Whether `path` is an artifact (a file) rather than a model directory.
pub fn is_artifact(path: &Path) -> bool {
    path.is_file()
}

/// Opens the artifact at `path`, refusing options that would need recompiling it: an artifact's
/// graphs are already optimized and lowered, so only its own precision (or the default) fits.
/// Returns the model and the precision it was compiled for.
fn artifact(path: &Path, opts: &LoadOptions) -> Result<(Model, String), LoadError> {
    let art = Artifact::open(path)?;
    let precision = &art.manifest.precision;
    if !opts.optimize || (opts.precision != Precision::F32 && opts.precision.name() != precision) {
        return Err(LoadError::Unsupported(format!(
            "{} is an artifact compiled for {precision} with the optimizer; --precision and \
             --no-optimize apply when compiling (kiln compile) or loading a model directory",
            path.display()
        )));
    }
    let precision = precision.clone();
    let compile = backend(opts, art.mlir())?;
    Ok((art.into_model(&*compile)?, precision))
}

/// How a loaded model's graphs are compiled: for the CUDA backend when the placement resolves
/// to it, else for the CPU backend, either with `opts.codegen`'s kernels (MLIR ones compiled
/// from `carried`, an artifact's MLIR, where it holds them).
fn backend(opts: &LoadOptions, carried: Option<&MlirRecord>) -> Result<Box<Compile>, LoadError> {
    let cuda = placement::resolve(opts.placement)
        .map_err(|why| LoadError::Unsupported(format!("--device cuda: {why}")))?;
    match cuda {
        Some(b) => Ok(placement::compile(
            b,
            codegen::cuda_provider(opts.codegen).map_err(LoadError::Unsupported)?,
        )),
        None => codegen::compile(opts.codegen, carried).map_err(LoadError::Unsupported),
    }
}

/// A model opened by [`model_with`].
pub struct Opened {
    /// The model.
    pub model: Model,
    /// The optimizer's reports (empty when not optimized or from an artifact).
    pub reports: Vec<Report>,
    /// The precision it runs in: the artifact's, or the requested one for a directory.
    pub precision: String,
}

/// Opens `path` (a directory or an artifact) as whichever model it holds.
pub fn model_with(path: &Path, opts: &LoadOptions) -> Result<Opened, LoadError> {
    if is_artifact(path) {
        let (model, precision) = artifact(path, opts)?;
        return Ok(Opened {
            model,
            reports: Vec::new(),
            precision,
        });
    }
    let (model, reports) = if ModelDir::open(path)?.config.head == Head::CausalLm {
        let lm = causal_lm_with(path, opts)?;
        (Model::Causal(lm.model), lm.reports)
    } else {
        let enc = encoder_with(path, opts)?;
        (Model::Encoder(enc.model), enc.reports)
    };
    Ok(Opened {
        model,
        reports,
        precision: opts.precision.name().to_string(),
    })
}

/// Opens `path` (a directory: trace, optimize and bind; or an artifact) as a causal LM.
pub fn causal_lm(path: &Path) -> Result<CausalLm, LoadError> {
    causal_lm_with(path, &LoadOptions::default())
}

/// [`causal_lm`] with explicit options.
pub fn causal_lm_with(path: &Path, opts: &LoadOptions) -> Result<CausalLm, LoadError> {
    if is_artifact(path) {
        return match artifact(path, opts)?.0 {
            Model::Causal(model) => Ok(CausalLm {
                model,
                reports: Vec::new(),
            }),
            Model::Encoder(m) => Err(not_causal(path, &m.info.model_type)),
        };
    }
    let dir = ModelDir::open(path)?;
    let graphs = causal_graphs(&dir)?;
    let (ready, reports) = prepare(vec![graphs.prefill, graphs.decode], opts)?;
    let (bound, params) = bind(
        &dir,
        &ready.iter().collect::<Vec<_>>(),
        convert_for(opts.precision),
    )?;
    let [prefill, decode]: [Graph; 2] = bound
        .try_into()
        .map_err(|_| LoadError::Unsupported("internal: expected two graphs".into()))?;
    let max_positions = match &dir.config.family {
        Family::Gpt2(g) => Some(g.n_positions),
        _ => None,
    };
    let info = ModelInfo {
        model_type: dir.config.model_type.clone(),
        head: dir.config.head,
        vocab_size: graphs.vocab_size,
        max_positions,
        num_layers: graphs.num_layers,
        uses_token_types: false,
        pooling: Pooling::default(),
        labels: dir.config.labels.clone(),
        eos_token_ids: dir.config.eos_token_ids.clone(),
    };
    let model = CausalModel::new_on(
        &*backend(opts, None)?,
        prefill,
        decode,
        params,
        info,
        assets(&dir)?,
        InputLimits::default(),
    )
    .map_err(|e| LoadError::Unsupported(e.to_string()))?;
    Ok(CausalLm { model, reports })
}

fn not_causal(path: &Path, model_type: &str) -> LoadError {
    LoadError::Unsupported(format!(
        "{} is an encoder ({model_type}), not a causal LM",
        path.display()
    ))
}

/// The tokenizer and generation config of a directory, as their bytes.
pub fn assets(dir: &ModelDir) -> Result<Assets, LoadError> {
    let read = |name: &str| -> Result<Option<Vec<u8>>, LoadError> {
        let p = dir.path.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        std::fs::read(&p).map(Some).map_err(|e| {
            LoadError::Model(ModelError::Io {
                path: p,
                message: e.to_string(),
            })
        })
    };
    Ok(Assets {
        origin: dir.path.display().to_string(),
        tokenizer_json: read("tokenizer.json")?,
        generation_config_json: read("generation_config.json")?,
    })
}

/// Opens `path` (a directory: trace the encoder with its head, optimize and bind; or an
/// artifact) as an encoder.
pub fn encoder(path: &Path) -> Result<Encoder, LoadError> {
    encoder_with(path, &LoadOptions::default())
}

/// [`encoder`] with explicit options.
pub fn encoder_with(path: &Path, opts: &LoadOptions) -> Result<Encoder, LoadError> {
    if is_artifact(path) {
        return match artifact(path, opts)?.0 {
            Model::Encoder(model) => Ok(Encoder {
                model,
                reports: Vec::new(),
            }),
            Model::Causal(_) => Err(not_encoder(path)),
        };
    }
    let dir = ModelDir::open(path)?;
    let graph = trace_encoder(&dir.config)?;
    let (ready, reports) = prepare(vec![graph.graph], opts)?;
    let (vocab_size, max_positions) = match &dir.config.family {
        Family::Bert(c) => (c.vocab_size, c.max_position_embeddings),
        Family::DistilBert(c) => (c.vocab_size, c.max_position_embeddings),
        Family::Decoder(_) | Family::Gpt2(_) => return Err(not_encoder(path)),
    };
    let ready: Vec<&Graph> = ready.iter().collect();
    let (mut bound, params) = bind(&dir, &ready, convert_for(opts.precision))?;
    let info = ModelInfo {
        model_type: dir.config.model_type.clone(),
        head: dir.config.head,
        vocab_size,
        max_positions: Some(max_positions),
        num_layers: 0,
        uses_token_types: graph.uses_token_types,
        pooling: pooling::load(&dir.path)?,
        labels: dir.config.labels.clone(),
        eos_token_ids: dir.config.eos_token_ids.clone(),
    };
    let model = EncoderModel::new_on(
        &*backend(opts, None)?,
        bound.pop().unwrap_or_default(),
        params,
        info,
        assets(&dir)?,
        InputLimits::default(),
    )
    .map_err(|e| LoadError::Unsupported(e.to_string()))?;
    Ok(Encoder { model, reports })
}

fn not_encoder(path: &Path) -> LoadError {
    LoadError::Unsupported(format!("{} is a causal LM, not an encoder", path.display()))
}

//! Loading a Hugging Face model directory for running: parse the config, trace the family's
//! graphs, optimize them (unless asked not to), bind the weights, and wrap them for generation
//! or encoding.

use kiln_compiler::cost::Target;
use kiln_compiler::pipeline::{optimize, Limits, OptimizeError, Report};
use kiln_compiler::precision::{
    lower_precision, Precision, PrecisionError, E4M3_MAX, SCALE_SUFFIX,
};
use kiln_ir::{DType, Graph};
use kiln_models::encoder::{base_model_prefix, trace_encoder, EncoderGraph};
use kiln_models::nn::adapt_param_names;
use kiln_models::{config::Family, CausalGraphs, Head, ModelDir, ModelError};
use kiln_runtime::cpu::CpuGraph;
use kiln_runtime::weights::{Checkpoint, Convert, WeightsError};
use kiln_runtime::{GraphLm, ModelError as ModelRunError, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Bound parameters by name.
pub type Params = HashMap<String, Tensor>;

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
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            optimize: true,
            target: Target::cpu(),
            precision: Precision::F32,
        }
    }
}

/// The graphs as they will run: optimized for the target when asked (one report each), then
/// lowered to the precision asked for.
pub fn prepare(
    graphs: Vec<Graph>,
    opts: &LoadOptions,
) -> Result<(Vec<Graph>, Vec<Report>), LoadError> {
    let mut out = Vec::with_capacity(graphs.len());
    let mut reports = Vec::with_capacity(graphs.len());
    for g in graphs {
        let g = if opts.optimize {
            let (optimized, report) = optimize(&g, &opts.target, &Limits::default())?;
            reports.push(report);
            optimized
        } else {
            g
        };
        out.push(lower_precision(&g, opts.precision, &opts.target)?);
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

/// A causal LM ready to generate.
pub struct CausalLm {
    /// The directory it came from.
    pub dir: ModelDir,
    /// The model, run by the reference executor.
    pub lm: GraphLm<Params>,
    /// Positions the model supports, when it has a hard limit (GPT-2's learned positions).
    pub max_positions: Option<usize>,
    /// The optimizer's reports for the prefill and decode graphs (empty when not optimized).
    pub reports: Vec<Report>,
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
    // An fp8 weight's scale is named after the weight, and follows its renaming.
    let has = |n: &str| {
        ckpt.info(n).is_some()
            || n.strip_suffix(SCALE_SUFFIX)
                .is_some_and(|w| ckpt.info(w).is_some())
    };
    let adapted: Vec<Graph> = graphs
        .iter()
        .map(|g| adapt_param_names(g, prefix, has))
        .collect();
    let params = match adapted.first() {
        Some(g) => bind_scaled(&ckpt, g, convert)?,
        None => Params::new(),
    };
    Ok((adapted, params))
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
    // Bind everything but the scales, the scaled weights as f32, then scale them.
    let mut plain = Graph::new();
    let mut fp8 = Vec::new();
    for (name, _, ty) in g.params() {
        if name
            .strip_suffix(SCALE_SUFFIX)
            .is_some_and(|w| g.params().any(|(n, _, t)| n == w && scaled(n, t.dtype)))
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
        let mut amax = vec![0.0f32; groups];
        for (i, x) in data.iter().enumerate() {
            let g = of(i, cols);
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
        let stored: Vec<f32> = data
            .iter()
            .enumerate()
            .map(|(i, x)| (x / scales[of(i, cols)]).clamp(-E4M3_MAX, E4M3_MAX))
            .collect();
        let bad = |e: kiln_runtime::tensor::ShapeMismatch| LoadError::Unsupported(e.to_string());
        let stored = Tensor::from_f32(w.shape().to_vec(), stored).map_err(bad)?;
        params.insert(name.clone(), stored.cast(DType::F8E4M3));
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

/// Opens `path`, traces and optimizes the causal LM, and binds its weights.
pub fn causal_lm(path: &Path) -> Result<CausalLm, LoadError> {
    causal_lm_with(path, &LoadOptions::default())
}

/// [`causal_lm`] with explicit options.
pub fn causal_lm_with(path: &Path, opts: &LoadOptions) -> Result<CausalLm, LoadError> {
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
    let lm = GraphLm::new(
        prefill,
        decode,
        params,
        graphs.num_layers,
        graphs.vocab_size,
    )
    .map_err(|e| LoadError::Unsupported(e.to_string()))?;
    Ok(CausalLm {
        dir,
        lm,
        max_positions,
        reports,
    })
}

/// An encoder (BERT, DistilBERT) ready to run on padded batches.
pub struct Encoder {
    /// The directory it came from.
    pub dir: ModelDir,
    /// The traced graph.
    pub graph: EncoderGraph,
    /// The graph planned for the CPU backend.
    plan: CpuGraph,
    params: Params,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The longest input the model's position table allows.
    pub max_positions: usize,
    /// The optimizer's report (empty when not optimized).
    pub reports: Vec<Report>,
}

/// An encoder's outputs for a batch padded on the right to `seq` tokens.
pub struct EncoderOutput {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// The head's logits, when the model has a head.
    pub logits: Option<Tensor>,
    /// `[batch * seq]` 0/1, 1 for real tokens.
    pub mask: Vec<i64>,
    /// The padded length.
    pub seq: usize,
}

/// Opens `path`, traces the encoder with its head, optimizes it, and binds its weights.
pub fn encoder(path: &Path) -> Result<Encoder, LoadError> {
    encoder_with(path, &LoadOptions::default())
}

/// [`encoder`] with explicit options.
pub fn encoder_with(path: &Path, opts: &LoadOptions) -> Result<Encoder, LoadError> {
    let dir = ModelDir::open(path)?;
    let mut graph = trace_encoder(&dir.config)?;
    let (ready, reports) = prepare(vec![graph.graph], opts)?;
    graph.graph = ready.into_iter().next().unwrap_or_default();
    let (vocab_size, max_positions) = match &dir.config.family {
        Family::Bert(c) => (c.vocab_size, c.max_position_embeddings),
        Family::DistilBert(c) => (c.vocab_size, c.max_position_embeddings),
        Family::Decoder(_) | Family::Gpt2(_) => {
            return Err(LoadError::Unsupported(format!(
                "{} is a causal LM, not an encoder",
                path.display()
            )))
        }
    };
    let (mut bound, params) = bind(&dir, &[&graph.graph], convert_for(opts.precision))?;
    graph.graph = bound.pop().unwrap_or_default();
    let plan = CpuGraph::compile(vec![graph.graph.clone()], &params)
        .map_err(|e| LoadError::Unsupported(e.to_string()))?
        .pop()
        .ok_or_else(|| LoadError::Unsupported("internal: expected one planned graph".into()))?;
    Ok(Encoder {
        dir,
        graph,
        plan,
        params,
        vocab_size,
        max_positions,
        reports,
    })
}

impl Encoder {
    /// The graph as planned for the CPU backend.
    pub fn plan(&self) -> &CpuGraph {
        &self.plan
    }

    /// The bound parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Runs a batch of token-id sequences (each non-empty), padded on the right with id 0.
    pub fn run(&self, batch: &[Vec<u32>]) -> Result<EncoderOutput, ModelRunError> {
        let rows = batch.len();
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask) = (
            Vec::with_capacity(rows * seq),
            Vec::with_capacity(rows * seq),
        );
        for row in batch {
            let pad = seq - row.len();
            ids.extend(
                row.iter()
                    .map(|&t| i64::from(t))
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, pad)));
        }
        let tensor = |data: Vec<i64>| {
            Tensor::from_i64(vec![rows, seq], data).map_err(|e| ModelRunError(e.to_string()))
        };
        let mut inputs = HashMap::from([
            ("input_ids".to_string(), tensor(ids)?),
            ("attention_mask".to_string(), tensor(mask.clone())?),
        ]);
        if self.graph.uses_token_types {
            inputs.insert("token_type_ids".into(), tensor(vec![0; rows * seq])?);
        }
        let mut out = self
            .plan
            .run(&inputs, &self.params)
            .map_err(|e| ModelRunError(e.to_string()))?;
        let last_hidden_state = out
            .remove("last_hidden_state")
            .ok_or_else(|| ModelRunError("the graph has no last_hidden_state output".into()))?;
        Ok(EncoderOutput {
            last_hidden_state,
            logits: out.remove("logits"),
            mask,
            seq,
        })
    }
}

/// Loads `tokenizer.json` of a model directory with the `tokenizers` crate. Truncation and
/// padding settings saved in the file are switched off: kiln pads batches itself and refuses
/// over-long inputs rather than silently cutting them.
pub fn tokenizer(dir: &ModelDir) -> Result<tokenizers::Tokenizer, LoadError> {
    let path = dir.tokenizer_file()?;
    let fail = |what: &str, e: tokenizers::Error| {
        LoadError::Unsupported(format!("{}: cannot {what}: {e}", path.display()))
    };
    let mut tok =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| fail("load the tokenizer", e))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| fail("switch off truncation", e))?;
    Ok(tok)
}

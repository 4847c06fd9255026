//! Ready-to-use models: a causal LM ([`CausalModel`]: generate text, or one forward pass) or
//! an encoder ([`EncoderModel`]: embed, or raw outputs), each with its settings and assets.
//! An artifact opens into one ([`Model::open`]); `kiln::load` builds the same types from a
//! model directory, so the CLI treats both alike. [`CausalModel::new_on`] and
//! [`EncoderModel::new_on`] are the one place the executors are constructed, by a [`Compile`]
//! function for the backend that runs the model ([`cpu`] unless told otherwise), once.
//!
//! A model opened from an artifact runs on weights used in place from the file while their
//! checksum is still being computed ([`WeightCheck`]): every method that hands out something
//! computed from the weights waits for the verdict first (generation: before the first piece of
//! text), and returns [`ArtifactError::Checksum`] for a corrupt file. The public `lm` and
//! `runner` fields do not wait: call `verify` before using them directly.

use crate::artifact::{Artifact, ArtifactError, WeightCheck};
use crate::background::Background;
use crate::cpu::CpuGraph;
use crate::encoder::{EncoderOutput, EncoderRunner};
use crate::generate::{self, ConfigError, GenerateError, GenerationConfig, Stopper, StreamError};
use crate::info::{AssetError, Assets, Head, InputError, ModelInfo};
use crate::{GraphExecutor, GraphLm, LanguageModel, ModelError, Params, Tensor};
use kiln_ir::Graph;
use std::borrow::Cow;
use std::path::Path;
use tokenizers::Tokenizer;

/// Compiles a model's graphs, which share `params`, for the backend that runs them: one
/// executor per graph, in order. [`cpu`] is the default; the `kiln` crate supplies the CUDA
/// backend's and the CPU backend with MLIR kernels.
pub type Compile = dyn Fn(Vec<Graph>, &Params) -> Result<Vec<Box<dyn GraphExecutor>>, ModelError>;

/// The CPU backend with its native kernels.
pub fn cpu(graphs: Vec<Graph>, params: &Params) -> Result<Vec<Box<dyn GraphExecutor>>, ModelError> {
    Ok(CpuGraph::compile(graphs, params)
        .map_err(|e| ModelError(e.to_string()))?
        .into_iter()
        .map(|g| Box::new(g) as Box<dyn GraphExecutor>)
        .collect())
}

/// `graphs` compiled by `compile`, exactly `N` executors.
fn compiled<const N: usize>(
    compile: &Compile,
    graphs: [Graph; N],
    params: &Params,
) -> Result<[Box<dyn GraphExecutor>; N], ModelError> {
    compile(graphs.into(), params)?
        .try_into()
        .map_err(|v: Vec<_>| {
            ModelError(format!(
                "internal: {} executors compiled for {N} graphs",
                v.len()
            ))
        })
}

/// What a model holds besides its executors and parameters.
struct Setup {
    info: ModelInfo,
    assets: Assets,
    limits: InputLimits,
    started: Started,
}

/// InputLimits fixed when compiling (`kiln compile --max-seq/--max-batch`); none for a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputLimits {
    /// The longest sequence (prompt and generated tokens together).
    pub max_seq: Option<usize>,
    /// The most rows in one batch (texts, or beams).
    pub max_batch: Option<usize>,
}

/// Why using a model failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The artifact is unusable.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The tokenizer or generation config is missing or unusable.
    #[error(transparent)]
    Asset(#[from] AssetError),
    /// Input the model cannot take (ids, lengths, batch sizes, empty text, settings).
    #[error("{0}")]
    Input(String),
    /// The model failed on valid input.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl DeployError {
    /// True for errors of the caller's input or files (as opposed to failures inside kiln).
    pub fn is_input(&self) -> bool {
        !matches!(self, DeployError::Model(_))
    }
}

impl From<InputError> for DeployError {
    fn from(e: InputError) -> Self {
        DeployError::Input(e.to_string())
    }
}

impl From<ConfigError> for DeployError {
    fn from(e: ConfigError) -> Self {
        DeployError::Input(e.to_string())
    }
}

impl From<StreamError> for DeployError {
    fn from(e: StreamError) -> Self {
        DeployError::Model(ModelError(e.to_string()))
    }
}

impl From<GenerateError> for DeployError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::Config(c) => c.into(),
            GenerateError::InvalidPrompt { .. } => DeployError::Input(e.to_string()),
            other => DeployError::Model(ModelError(other.to_string())),
        }
    }
}

fn check_batch(rows: usize, limits: &InputLimits) -> Result<(), DeployError> {
    match limits.max_batch {
        Some(max) if rows > max => Err(DeployError::Input(format!(
            "a batch of {rows} rows, but this model was compiled for at most {max} (--max-batch)"
        ))),
        _ => Ok(()),
    }
}

/// A generated continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The new token ids.
    pub ids: Vec<u32>,
    /// The new text (cut before a stop string).
    pub text: String,
}

/// A causal LM with its settings and assets.
pub struct CausalModel {
    /// The model.
    pub lm: GraphLm<Params>,
    /// Its settings.
    pub info: ModelInfo,
    /// Its tokenizer and generation config.
    pub assets: Assets,
    /// Compile-time limits.
    pub limits: InputLimits,
    /// Work started when the model was opened.
    started: Started,
}

/// Work started when a model is opened, on threads of its own, that the model waits for where
/// it needs it: parsing the tokenizer, and (from an artifact) the weights' checksum.
#[derive(Clone)]
struct Started {
    /// The tokenizer; `None` inside when it cannot be parsed (parsing it again where it is
    /// needed gives the error).
    tokenizer: Background<Option<Tokenizer>>,
    /// The weights' checksum.
    check: Option<WeightCheck>,
}

/// Starts parsing `assets`' tokenizer on a thread of its own.
pub(crate) fn parse_tokenizer(assets: &Assets) -> Background<Option<Tokenizer>> {
    let assets = assets.clone();
    Background::spawn("kiln-tokenizer", move || assets.tokenizer().ok())
}

impl Started {
    /// For a model directory: starts parsing `assets`' tokenizer.
    fn new(assets: &Assets) -> Started {
        Started {
            tokenizer: parse_tokenizer(assets),
            check: None,
        }
    }

    /// Waits for the weights' checksum, if there is one.
    fn verified(&self) -> Result<(), DeployError> {
        Ok(self.check.as_ref().map_or(Ok(()), WeightCheck::wait)?)
    }

    /// The tokenizer (waiting for it), or why `assets` have none.
    fn tokenizer<'a>(&'a self, assets: &Assets) -> Result<Cow<'a, Tokenizer>, DeployError> {
        match self.tokenizer.get() {
            Some(Some(t)) => Ok(Cow::Borrowed(t)),
            _ => Ok(Cow::Owned(assets.tokenizer()?)),
        }
    }
}

impl CausalModel {
    /// A model from its prefill and decode graphs and bound parameters, on the CPU backend.
    pub fn new(
        prefill: Graph,
        decode: Graph,
        params: Params,
        info: ModelInfo,
        assets: Assets,
        limits: InputLimits,
    ) -> Result<Self, DeployError> {
        Self::new_on(&cpu, prefill, decode, params, info, assets, limits)
    }

    /// [`CausalModel::new`] with the graphs compiled by `compile`.
    pub fn new_on(
        compile: &Compile,
        prefill: Graph,
        decode: Graph,
        params: Params,
        info: ModelInfo,
        assets: Assets,
        limits: InputLimits,
    ) -> Result<Self, DeployError> {
        let started = Started::new(&assets);
        let setup = Setup {
            info,
            assets,
            limits,
            started,
        };
        Self::with(compile, [prefill, decode], params, setup)
    }

    fn with(
        compile: &Compile,
        graphs: [Graph; 2],
        params: Params,
        setup: Setup,
    ) -> Result<Self, DeployError> {
        let [prefill, decode] = compiled(compile, graphs, &params)?;
        let (layers, vocab) = (setup.info.num_layers, setup.info.vocab_size);
        Ok(CausalModel {
            lm: GraphLm::with_executors(prefill, decode, params, layers, vocab),
            info: setup.info,
            assets: setup.assets,
            limits: setup.limits,
            started: setup.started,
        })
    }

    /// Waits until the weights are known to be intact (at once for a model directory).
    pub fn verify(&self) -> Result<(), DeployError> {
        self.started.verified()
    }

    /// The model's generation config (see [`Assets::generation_config`]).
    pub fn generation_config(&self) -> Result<GenerationConfig, DeployError> {
        Ok(self.assets.generation_config(&self.info)?)
    }

    /// Logits `[1, len, vocab]` of one sequence.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor, DeployError> {
        self.info.check_ids(ids, self.limits.max_seq)?;
        let logits = self.lm.forward(ids);
        self.verify()?;
        Ok(logits?)
    }

    /// Tokenizes `prompt` and generates a continuation with `cfg`, calling `on_text` with each
    /// piece of new text as it is decoded (stop strings cut, as transformers' streamers).
    pub fn generate_streaming(
        &mut self,
        prompt: &str,
        cfg: &GenerationConfig,
        seed: u64,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generated, DeployError> {
        cfg.validate()?;
        if prompt.is_empty() {
            return Err(DeployError::Input(
                "the prompt is empty: give some text to continue".into(),
            ));
        }
        let tok = self.started.tokenizer(&self.assets)?;
        let prompt_ids = tok
            .encode(prompt, true)
            .map_err(|e| DeployError::Input(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec();
        if prompt_ids.is_empty() {
            return Err(DeployError::Input(
                "the prompt tokenizes to no tokens".into(),
            ));
        }
        self.info.check_ids(&prompt_ids, self.limits.max_seq)?;
        check_batch(cfg.num_beams.max(1), &self.limits)?;
        if let Some(max) = self.info.position_limit(self.limits.max_seq) {
            let budget = cfg.new_token_budget(prompt_ids.len())?;
            if prompt_ids.len() + budget > max {
                return Err(DeployError::Input(format!(
                    "the prompt has {} tokens and up to {budget} new ones are asked for, but the model supports at most {max} positions; lower --max-new-tokens",
                    prompt_ids.len()
                )));
            }
        }
        let mut stopper = Stopper::from_config(&tok, cfg, 1);
        let mut failure: Option<DeployError> = None;
        let started = &self.started;
        let generated = generate::generate(
            &mut self.lm,
            std::slice::from_ref(&prompt_ids),
            cfg,
            seed,
            &mut |row, token| {
                // Nothing computed from the weights leaves before they are known to be intact.
                if let Err(e) = started.verified() {
                    failure = Some(e);
                    return false;
                }
                match stopper.push(row, token) {
                    Ok(step) => {
                        if !step.text.is_empty() {
                            on_text(&step.text);
                        }
                        !step.stop
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        false
                    }
                }
            },
        );
        // A corrupt file explains any failure better than what it caused.
        self.verify()?;
        let generated = generated?;
        if let Some(e) = failure {
            return Err(e);
        }
        let tail = stopper.finish(0)?;
        if !tail.is_empty() {
            on_text(&tail);
        }
        Ok(Generated {
            prompt_ids,
            ids: generated.into_iter().next().unwrap_or_default(),
            text: stopper.text(0).to_string(),
        })
    }

    /// [`generate_streaming`](Self::generate_streaming) without streaming.
    pub fn generate(
        &mut self,
        prompt: &str,
        cfg: &GenerationConfig,
        seed: u64,
    ) -> Result<Generated, DeployError> {
        self.generate_streaming(prompt, cfg, seed, &mut |_| {})
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.lm.vocab_size()
    }
}

/// An encoder with its settings and assets.
pub struct EncoderModel {
    /// The encoder.
    pub runner: EncoderRunner<Params>,
    /// Its settings.
    pub info: ModelInfo,
    /// Its tokenizer.
    pub assets: Assets,
    /// Compile-time limits.
    pub limits: InputLimits,
    /// Work started when the model was opened.
    started: Started,
}

/// An encoder run on texts.
pub struct Encoded {
    /// The token ids of each text.
    pub ids: Vec<Vec<u32>>,
    /// The outputs.
    pub out: EncoderOutput,
}

impl EncoderModel {
    /// The tokenizer (parsed once, in the background from the moment the model was opened).
    pub fn tokenizer(&self) -> Result<Cow<'_, Tokenizer>, DeployError> {
        self.started.tokenizer(&self.assets)
    }

    /// An encoder from its graph and bound parameters, on the CPU backend.
    pub fn new(
        graph: Graph,
        params: Params,
        info: ModelInfo,
        assets: Assets,
        limits: InputLimits,
    ) -> Result<Self, DeployError> {
        Self::new_on(&cpu, graph, params, info, assets, limits)
    }

    /// [`EncoderModel::new`] with the graph compiled by `compile`.
    pub fn new_on(
        compile: &Compile,
        graph: Graph,
        params: Params,
        info: ModelInfo,
        assets: Assets,
        limits: InputLimits,
    ) -> Result<Self, DeployError> {
        let started = Started::new(&assets);
        let setup = Setup {
            info,
            assets,
            limits,
            started,
        };
        Self::with(compile, graph, params, setup)
    }

    fn with(
        compile: &Compile,
        graph: Graph,
        params: Params,
        setup: Setup,
    ) -> Result<Self, DeployError> {
        let [plan] = compiled(compile, [graph], &params)?;
        Ok(EncoderModel {
            runner: EncoderRunner::with_executor(plan, params, setup.info.uses_token_types),
            info: setup.info,
            assets: setup.assets,
            limits: setup.limits,
            started: setup.started,
        })
    }

    /// Waits until the weights are known to be intact (at once for a model directory).
    pub fn verify(&self) -> Result<(), DeployError> {
        self.started.verified()
    }

    /// Runs token-id sequences (checked) as one right-padded batch.
    pub fn run(&self, batch: &[Vec<u32>]) -> Result<EncoderOutput, DeployError> {
        check_batch(batch.len(), &self.limits)?;
        for ids in batch {
            self.info.check_ids(ids, self.limits.max_seq)?;
        }
        let out = self.runner.run(batch);
        self.verify()?;
        Ok(out?)
    }

    /// Tokenizes `texts` (with special tokens, as transformers' tokenizer call does) and runs
    /// them as one batch.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Encoded, DeployError> {
        if texts.is_empty() {
            return Err(DeployError::Input("give at least one text".into()));
        }
        if let Some(i) = texts.iter().position(|t| t.as_ref().trim().is_empty()) {
            return Err(DeployError::Input(format!(
                "text number {} is empty",
                i + 1
            )));
        }
        let tok = self.started.tokenizer(&self.assets)?;
        let mut ids = Vec::with_capacity(texts.len());
        for text in texts {
            let text = text.as_ref();
            ids.push(
                tok.encode(text, true)
                    .map_err(|e| DeployError::Input(format!("cannot tokenize {text:?}: {e}")))?
                    .get_ids()
                    .to_vec(),
            );
        }
        let out = self.run(&ids)?;
        Ok(Encoded { ids, out })
    }

    /// One sentence embedding per text, pooled as the model's settings say.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, DeployError> {
        Ok(self.encode(texts)?.out.pool(&self.info.pooling)?)
    }
}

/// A model opened from an artifact.
#[allow(clippy::large_enum_variant)] // made once per process: its size does not matter
pub enum Model {
    /// A causal LM.
    Causal(CausalModel),
    /// An encoder.
    Encoder(EncoderModel),
}

impl Model {
    /// Opens and checks the artifact at `path` and builds its model on the CPU backend (the
    /// weights' checksum is still being computed: see the module docs).
    pub fn open(path: &Path) -> Result<Model, DeployError> {
        Ok(Artifact::open(path)?.into_model(&cpu)?)
    }

    /// Waits until the weights are known to be intact (at once for a model directory).
    pub fn verify(&self) -> Result<(), DeployError> {
        match self {
            Model::Causal(m) => m.verify(),
            Model::Encoder(m) => m.verify(),
        }
    }
}

impl Artifact {
    /// The model this artifact holds, its graphs compiled by `compile`, waiting for the
    /// weights' checksum before its first output.
    pub fn into_model(self, compile: &Compile) -> Result<Model, ArtifactError> {
        let started = Started {
            tokenizer: self.tokenizer.clone(),
            check: Some(self.check.clone()),
        };
        let limits = InputLimits {
            max_seq: self.manifest.max_seq,
            max_batch: self.manifest.max_batch,
        };
        let head = self.manifest.model.head;
        let setup = Setup {
            info: self.manifest.model,
            assets: self.assets,
            limits,
            started,
        };
        let origin = self.origin.clone();
        let malformed = |e: DeployError| ArtifactError::Malformed {
            origin,
            message: e.to_string(),
        };
        let mut graphs = self.graphs.into_iter();
        let (first, second) = (graphs.next(), graphs.next());
        match (head, first, second) {
            (Head::CausalLm, Some(prefill), Some(decode)) => Ok(Model::Causal(
                CausalModel::with(compile, [prefill, decode], self.params, setup)
                    .map_err(malformed)?,
            )),
            (Head::CausalLm, ..) => Err(ArtifactError::Malformed {
                origin: self.origin,
                message: "a causal LM needs prefill and decode graphs".into(),
            }),
            (_, Some(graph), None) => Ok(Model::Encoder(
                EncoderModel::with(compile, graph, self.params, setup).map_err(malformed)?,
            )),
            _ => Err(ArtifactError::Malformed {
                origin: self.origin,
                message: "an encoder needs exactly one graph".into(),
            }),
        }
    }
}

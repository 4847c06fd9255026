//! What a model needs besides its graphs and weights to be used: its head, sizes, pooling,
//! labels and end-of-sequence ids ([`ModelInfo`]), and its tokenizer and generation config
//! ([`Assets`]). `kiln::load` builds them from a Hugging Face directory; artifacts store them.

use crate::generate::GenerationConfig;
use crate::pooling::Pooling;
use serde::{Deserialize, Serialize};

/// What the model computes on top of its base (from `architectures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// Next-token logits (`*ForCausalLM`, `GPT2LMHeadModel`).
    CausalLm,
    /// The last hidden state (`*Model`).
    Base,
    /// Masked-token logits (`*ForMaskedLM`).
    MaskedLm,
    /// Sequence classification logits (`*ForSequenceClassification`).
    SequenceClassification,
}

/// A model's settings that running it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// The `model_type` of `config.json` (e.g. `llama`).
    pub model_type: String,
    /// The head; [`Head::CausalLm`] models have prefill and decode graphs, the others one
    /// encoder graph.
    pub head: Head,
    /// Vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// Positions the model supports, when it has a hard limit (learned position tables).
    pub max_positions: Option<usize>,
    /// Layers (KV-cache entries) of a causal LM; 0 for encoders.
    pub num_layers: usize,
    /// The encoder graph takes `token_type_ids`.
    pub uses_token_types: bool,
    /// Sentence-embedding pooling (encoders).
    pub pooling: Pooling,
    /// Class labels in id order (classification heads).
    pub labels: Vec<String>,
    /// `eos_token_id` of `config.json` (used when the generation config has none).
    pub eos_token_ids: Vec<u32>,
}

/// Input the model cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (ids must be below {vocab})")]
    TokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A sequence longer than the model (or the artifact's `--max-seq`) allows.
    #[error("the input has {len} tokens but the model supports at most {max} positions")]
    TooLong {
        /// Tokens given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An empty sequence.
    #[error("the input has no tokens")]
    Empty,
}

impl ModelInfo {
    /// The most positions a sequence may use: the model's limit and `max_seq`, whichever is
    /// smaller.
    pub fn position_limit(&self, max_seq: Option<usize>) -> Option<usize> {
        match (self.max_positions, max_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Refuses empty sequences, ids outside the vocabulary and sequences longer than
    /// [`position_limit`](Self::position_limit).
    pub fn check_ids(&self, ids: &[u32], max_seq: Option<usize>) -> Result<(), InputError> {
        if ids.is_empty() {
            return Err(InputError::Empty);
        }
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(InputError::TokenId {
                id,
                vocab: self.vocab_size,
            });
        }
        match self.position_limit(max_seq) {
            Some(max) if ids.len() > max => Err(InputError::TooLong {
                len: ids.len(),
                max,
            }),
            _ => Ok(()),
        }
    }
}

/// The tokenizer or generation config is missing or unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    /// No `tokenizer.json`.
    #[error("{origin} has no tokenizer.json: it is needed to turn text into tokens")]
    NoTokenizer {
        /// The model directory or artifact.
        origin: String,
    },
    /// `tokenizer.json` does not load.
    #[error("{origin}: cannot load tokenizer.json: {message}")]
    Tokenizer {
        /// The model directory or artifact.
        origin: String,
        /// What the `tokenizers` crate said.
        message: String,
    },
    /// `generation_config.json` is unusable.
    #[error("{origin}: generation_config.json: {message}")]
    GenerationConfig {
        /// The model directory or artifact.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// A model's tokenizer and generation config, as the bytes of their JSON files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assets {
    /// Where they come from (a directory or an artifact), for messages.
    pub origin: String,
    /// `tokenizer.json`.
    pub tokenizer_json: Option<Vec<u8>>,
    /// `generation_config.json`.
    pub generation_config_json: Option<Vec<u8>>,
}

impl Assets {
    /// The tokenizer, with the truncation and padding settings saved in the file switched off:
    /// kiln pads batches itself and refuses over-long inputs rather than silently cutting them.
    /// Parsed by [`crate::tokenizer_json`] (as the `tokenizers` crate does, faster, and without
    /// its panics on malformed sections).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, AssetError> {
        let bytes = self
            .tokenizer_json
            .as_deref()
            .ok_or_else(|| AssetError::NoTokenizer {
                origin: self.origin.clone(),
            })?;
        let fail = |message: String| AssetError::Tokenizer {
            origin: self.origin.clone(),
            message,
        };
        let mut tok = crate::tokenizer_json::parse(bytes).map_err(fail)?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| fail(e.to_string()))?;
        Ok(tok)
    }

    /// The generation config: `generation_config.json` (transformers' defaults without one),
    /// with `info`'s end-of-sequence ids when it names none, as transformers derives it from
    /// `config.json`.
    pub fn generation_config(&self, info: &ModelInfo) -> Result<GenerationConfig, AssetError> {
        let fail = |message: String| AssetError::GenerationConfig {
            origin: self.origin.clone(),
            message,
        };
        let mut cfg = match &self.generation_config_json {
            Some(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|e| fail(e.to_string()))?;
                GenerationConfig::from_json_str(text).map_err(|e| fail(e.to_string()))?
            }
            None => GenerationConfig::default(),
        };
        if cfg.eos_token_id.is_empty() {
            cfg.eos_token_id = info.eos_token_ids.clone();
        }
        Ok(cfg)
    }
}

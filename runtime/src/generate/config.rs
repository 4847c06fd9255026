//! [`GenerationConfig`]: the generation settings kiln reads from a model's
//! `generation_config.json`, with transformers' defaults for absent keys, and their validation.
//!
//! # Defaults
//!
//! Keys that are absent or `null` take the values transformers 5 fills in at `generate` time
//! (`GenerationConfig._get_default_generation_params` in
//! `transformers/generation/configuration_utils.py`): `do_sample` false, `temperature` 1.0,
//! `top_k` 50, `top_p` 1.0, `min_p` unset, `repetition_penalty` 1.0, `num_beams` 1,
//! `length_penalty` 1.0, `early_stopping` false, no `max_new_tokens`, no `max_length`.
//! Keys kiln does not know are ignored; the names of known transformers settings that would
//! change the output but that kiln does not implement (for example `no_repeat_ngram_size` or
//! `suppress_tokens`) are collected in [`GenerationConfig::unsupported`] so that a front end
//! can warn about them.
//!
//! # Length
//!
//! [`GenerationConfig::new_token_budget`] follows `GenerationMixin._prepare_generated_length`:
//! `max_new_tokens` wins; otherwise an explicit `max_length` counts the prompt (for a batch, the
//! longest prompt, which is the padded length transformers sees) and must exceed it; otherwise
//! 20 new tokens are generated (transformers' default `max_length` of 20 is then taken as new
//! tokens; kiln does not cap it by `max_position_embeddings`).
//!
//! # Validation rules ([`GenerationConfig::validate`])
//!
//! Mirrors the checks transformers makes when it builds the processors that a configuration
//! actually uses, so a `generation_config.json` that transformers accepts is accepted here:
//!
//! * always: `num_beams` ≥ 1, `max_new_tokens` ≥ 1 when given, `repetition_penalty` > 0 and
//!   finite (transformers only builds the penalty when it is not 1.0, and then requires > 0);
//! * with `num_beams` > 1: `length_penalty` finite, and `do_sample` false (beam *sampling* is not
//!   implemented by kiln);
//! * only with `do_sample` (the sampling warpers do not exist otherwise, and transformers merely
//!   warns about their settings): `temperature` > 0 and finite, `top_p` in [0, 1] (transformers'
//!   `TopPLogitsWarper` range; 0 keeps only the most likely token), `min_p` in [0, 1]. `top_k`
//!   is unsigned and 0 disables it, as in transformers.
//!
//! # Temperature 0
//!
//! transformers rejects `temperature == 0` when sampling. The rule kiln's command line follows
//! is that **temperature 0 means greedy decoding**: [`GenerationConfig::set_temperature`] with
//! 0 turns sampling off (and leaves the temperature at 1.0); any positive temperature turns
//! sampling on.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;

/// The number of new tokens generated when neither `max_new_tokens` nor `max_length` is set.
pub const DEFAULT_NEW_TOKENS: usize = 20;

/// Why a generation configuration could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a valid `generation_config.json` (bad JSON, a value of the wrong type).
    #[error("invalid generation config: {0}")]
    Json(String),
    /// A value is out of range; the message names the key and the value.
    #[error("{0}")]
    Invalid(String),
}

/// transformers' `early_stopping` for beam search (`true`, `false` or `"never"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `false` (the default): stop when the best running beam, at its current length, could not
    /// beat the worst of the `num_beams` finished hypotheses.
    #[default]
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses have finished.
    AllFinished,
    /// `"never"`: stop only when no running beam could possibly beat the finished ones (with a
    /// positive length penalty, judged at the maximum length); the canonical beam search.
    Never,
}

impl Serialize for EarlyStopping {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EarlyStopping::Heuristic => s.serialize_bool(false),
            EarlyStopping::AllFinished => s.serialize_bool(true),
            EarlyStopping::Never => s.serialize_str("never"),
        }
    }
}

/// The configuration that drives [`generate`](super::generate).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationConfig {
    /// How many tokens to generate at most (takes precedence over `max_length`).
    pub max_new_tokens: Option<usize>,
    /// The maximum total length, prompt included (used only without `max_new_tokens`).
    pub max_length: Option<usize>,
    /// Sample (true) or decode greedily / by beam search (false).
    pub do_sample: bool,
    /// Divides the logits before sampling (sampling only).
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (ties kept; 0 disables; sampling only).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`
    /// (1.0 disables; sampling only).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (sampling only).
    pub min_p: Option<f64>,
    /// Penalty for tokens already in the row (prompt included); 1.0 disables.
    pub repetition_penalty: f64,
    /// Beam width; 1 means no beam search.
    pub num_beams: usize,
    /// Exponent of the generated length that divides finished beams' scores.
    pub length_penalty: f64,
    /// When beam search stops.
    pub early_stopping: EarlyStopping,
    /// Tokens that end a row (may be empty).
    pub eos_token_id: Vec<u32>,
    /// The padding token, if any (kiln never emits it).
    pub pad_token_id: Option<u32>,
    /// The beginning-of-sequence token, if any (informational; prompts carry their own).
    pub bos_token_id: Option<u32>,
    /// Strings that end generation (applied by [`Stopper`](super::Stopper), which needs a
    /// tokenizer; [`generate`](super::generate) itself ignores them).
    pub stop_strings: Vec<String>,
    /// Names of settings in the source file that change transformers' output but that kiln does
    /// not implement (ignored). Not serialized.
    #[serde(skip)]
    pub unsupported: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: None,
            max_length: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            eos_token_id: Vec::new(),
            pad_token_id: None,
            bos_token_id: None,
            stop_strings: Vec::new(),
            unsupported: Vec::new(),
        }
    }
}

/// `true`, `false` or a string, as `early_stopping` is written.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawEarlyStopping {
    Bool(bool),
    Str(String),
}

/// A token id or a list of them (`eos_token_id`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawIds {
    One(i64),
    Many(Vec<i64>),
}

/// A string or a list of them (`stop_strings`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawStrings {
    One(String),
    Many(Vec<String>),
}

/// The file as written: every key optional, `null` allowed.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    max_new_tokens: Option<i64>,
    max_length: Option<i64>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    num_beams: Option<i64>,
    length_penalty: Option<f64>,
    early_stopping: Option<RawEarlyStopping>,
    eos_token_id: Option<RawIds>,
    pad_token_id: Option<i64>,
    bos_token_id: Option<i64>,
    stop_strings: Option<RawStrings>,
}

/// Settings that change transformers' output which kiln does not implement, with the value
/// transformers treats as "off".
fn is_unsupported(key: &str, value: &serde_json::Value) -> bool {
    use serde_json::Value;
    let num = |v: &Value| v.as_f64();
    match key {
        "min_length"
        | "min_new_tokens"
        | "no_repeat_ngram_size"
        | "encoder_no_repeat_ngram_size" => num(value).is_some_and(|x| x > 0.0),
        "typical_p" | "encoder_repetition_penalty" => num(value).is_some_and(|x| x != 1.0),
        "epsilon_cutoff" | "eta_cutoff" => num(value).is_some_and(|x| x > 0.0 && x < 1.0),
        "num_return_sequences" | "num_beam_groups" => num(value).is_some_and(|x| x > 1.0),
        "guidance_scale" => num(value).is_some_and(|x| x != 1.0),
        "diversity_penalty" => num(value).is_some_and(|x| x != 0.0),
        "remove_invalid_values" | "renormalize_logits" => value.as_bool() == Some(true),
        "bad_words_ids"
        | "suppress_tokens"
        | "begin_suppress_tokens"
        | "forced_bos_token_id"
        | "forced_eos_token_id"
        | "sequence_bias"
        | "exponential_decay_length_penalty"
        | "top_h"
        | "watermarking_config"
        | "force_words_ids"
        | "constraints"
        | "penalty_alpha"
        | "dola_layers" => !value.is_null(),
        _ => false,
    }
}

fn non_negative(key: &str, v: Option<i64>) -> Result<Option<usize>, ConfigError> {
    match v {
        None => Ok(None),
        Some(x) => usize::try_from(x).map(Some).map_err(|_| {
            ConfigError::Invalid(format!("{key} must be a non-negative integer, got {x}"))
        }),
    }
}

fn token_id(key: &str, v: i64) -> Result<u32, ConfigError> {
    u32::try_from(v).map_err(|_| {
        ConfigError::Invalid(format!(
            "{key} must be a token id (0 to 4294967295), got {v}"
        ))
    })
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json`. Does not [`validate`](Self::validate).
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_json_value(&value)
    }

    /// Reads a `generation_config.json` file. Does not [`validate`](Self::validate).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Builds the configuration from parsed JSON (an object). Does not
    /// [`validate`](Self::validate).
    pub fn from_json_value(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let object = value
            .as_object()
            .ok_or_else(|| ConfigError::Json("a generation config must be a JSON object".into()))?;
        let raw = RawConfig::deserialize(value).map_err(|e| ConfigError::Json(e.to_string()))?;
        let d = GenerationConfig::default();
        let early_stopping = match raw.early_stopping {
            None | Some(RawEarlyStopping::Bool(false)) => EarlyStopping::Heuristic,
            Some(RawEarlyStopping::Bool(true)) => EarlyStopping::AllFinished,
            Some(RawEarlyStopping::Str(s)) if s == "never" => EarlyStopping::Never,
            Some(RawEarlyStopping::Str(s)) => {
                return Err(ConfigError::Invalid(format!(
                    "early_stopping must be true, false or \"never\", got \"{s}\""
                )))
            }
        };
        let eos_token_id = match raw.eos_token_id {
            None => Vec::new(),
            Some(RawIds::One(x)) => vec![token_id("eos_token_id", x)?],
            Some(RawIds::Many(xs)) => xs
                .into_iter()
                .map(|x| token_id("eos_token_id", x))
                .collect::<Result<_, _>>()?,
        };
        let stop_strings = match raw.stop_strings {
            None => Vec::new(),
            Some(RawStrings::One(s)) => vec![s],
            Some(RawStrings::Many(v)) => v,
        };
        let mut unsupported: Vec<String> = object
            .iter()
            .filter(|(k, v)| is_unsupported(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        unsupported.sort();
        Ok(GenerationConfig {
            max_new_tokens: non_negative("max_new_tokens", raw.max_new_tokens)?,
            max_length: non_negative("max_length", raw.max_length)?,
            do_sample: raw.do_sample.unwrap_or(d.do_sample),
            temperature: raw.temperature.unwrap_or(d.temperature),
            top_k: non_negative("top_k", raw.top_k)?.unwrap_or(d.top_k),
            top_p: raw.top_p.unwrap_or(d.top_p),
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty.unwrap_or(d.repetition_penalty),
            num_beams: non_negative("num_beams", raw.num_beams)?.unwrap_or(d.num_beams),
            length_penalty: raw.length_penalty.unwrap_or(d.length_penalty),
            early_stopping,
            eos_token_id,
            // transformers only warns about a negative pad id; it is treated as absent here.
            pad_token_id: raw.pad_token_id.and_then(|x| u32::try_from(x).ok()),
            bos_token_id: raw
                .bos_token_id
                .map(|x| token_id("bos_token_id", x))
                .transpose()?,
            stop_strings,
            unsupported,
        })
    }

    /// The CLI's temperature rule: 0 means greedy (`do_sample = false`, temperature left at
    /// 1.0); anything else turns sampling on with that temperature (validated later).
    pub fn set_temperature(&mut self, temperature: f64) {
        if temperature == 0.0 {
            self.do_sample = false;
            self.temperature = 1.0;
        } else {
            self.do_sample = true;
            self.temperature = temperature;
        }
    }

    /// Checks the values the configured decoding mode uses (see the module documentation for
    /// the rules). Errors name the key and the value, e.g. `top_p must be in [0, 1], got 1.5`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1, got 0".into());
        }
        if self.max_new_tokens == Some(0) {
            return bad("max_new_tokens must be greater than 0, got 0".into());
        }
        let rp = self.repetition_penalty;
        if !(rp > 0.0 && rp.is_finite()) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, got {rp}"
            ));
        }
        if self.num_beams > 1 {
            if self.do_sample {
                return bad(format!(
                    "beam sampling (num_beams = {} with do_sample = true) is not supported; \
                     set do_sample = false for beam search or num_beams = 1 for sampling",
                    self.num_beams
                ));
            }
            if !self.length_penalty.is_finite() {
                return bad(format!(
                    "length_penalty must be finite, got {}",
                    self.length_penalty
                ));
            }
        }
        if self.do_sample {
            let t = self.temperature;
            if t == 0.0 {
                return bad(
                    "temperature must be > 0 when sampling, got 0 (for greedy decoding set \
                            do_sample = false; on the command line, temperature 0 means greedy)"
                        .into(),
                );
            }
            if !(t > 0.0 && t.is_finite()) {
                return bad(format!("temperature must be a finite number > 0, got {t}"));
            }
            let p = self.top_p;
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("top_p must be in [0, 1], got {p}"));
            }
            if let Some(m) = self.min_p {
                if !(0.0..=1.0).contains(&m) {
                    return bad(format!("min_p must be in [0, 1], got {m}"));
                }
            }
        }
        Ok(())
    }

    /// How many new tokens each row may get, given the longest prompt of the batch (see the
    /// module documentation). Errors when `max_length` leaves no room after the prompt.
    pub fn new_token_budget(&self, longest_prompt: usize) -> Result<usize, ConfigError> {
        match (self.max_new_tokens, self.max_length) {
            (Some(n), _) => Ok(n),
            (None, Some(m)) => {
                if m <= longest_prompt {
                    Err(ConfigError::Invalid(format!(
                        "the prompt is {longest_prompt} tokens long but max_length is {m}; \
                         increase max_length or set max_new_tokens"
                    )))
                } else {
                    Ok(m - longest_prompt)
                }
            }
            (None, None) => Ok(DEFAULT_NEW_TOKENS),
        }
    }
}

impl<'de> Deserialize<'de> for GenerationConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        GenerationConfig::from_json_value(&value).map_err(serde::de::Error::custom)
    }
}

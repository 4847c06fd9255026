//! Reading `config.json`: dispatch on `model_type` (as transformers' AutoConfig) and on
//! `architectures` (the head, as AutoModelFor...), with transformers' defaults for absent
//! optional keys. Architecture sizes (`vocab_size`, `hidden_size`, layer and head counts, MLP
//! width) are required: a config without them is malformed, and defaulting them would silently
//! build a different model.

use crate::llama::{DecoderConfig, LayerConfig};
use crate::rope::{Rope, RopeScaling};
use crate::{bert, distilbert, gpt2, moe, ModelError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The `model_type`s kiln supports.
pub const SUPPORTED_MODEL_TYPES: [&str; 7] = [
    "llama",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
    "bert",
    "distilbert",
];

pub use kiln_runtime::info::Head;

/// A family's configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    /// llama, mistral, qwen2, mixtral.
    Decoder(DecoderConfig),
    /// gpt2.
    Gpt2(gpt2::Gpt2Config),
    /// bert.
    Bert(bert::BertConfig),
    /// distilbert.
    DistilBert(distilbert::DistilBertConfig),
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The `model_type`.
    pub model_type: String,
    /// The head from `architectures` (the family's usual head when absent).
    pub head: Head,
    /// The family's settings.
    pub family: Family,
    /// Class labels (`id2label`) in id order, for classification heads.
    pub labels: Vec<String>,
    /// `eos_token_id` (one id or a list; empty when absent).
    pub eos_token_ids: Vec<u32>,
    /// Where it was read from.
    pub path: PathBuf,
}

/// Reads and parses `config.json` at `path`.
pub fn load(path: &Path) -> Result<ModelConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    parse(&text, path)
}

fn config_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A family's `config.json`: deserialized with transformers' defaults, then checked.
pub trait FamilyConfig: DeserializeOwned {
    /// Checks sizes and options, refusing settings kiln does not implement (the path is for
    /// messages).
    fn validate(&self, path: &Path) -> Result<(), ModelError>;

    /// Parses and checks the config object of `path`.
    fn from_json(obj: &Map<String, Value>, path: &Path) -> Result<Self, ModelError> {
        let cfg: Self = fields(obj, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// serde default for flags that transformers turns on by default.
pub(crate) fn yes() -> bool {
    true
}

/// serde default: BERT-style models' 512 positions.
pub(crate) fn positions_512() -> usize {
    512
}

/// serde default: the erf GELU activation's name.
pub(crate) fn gelu() -> String {
    "gelu".into()
}

/// Deserializes `obj` into `T`, naming a missing or mistyped key in the error.
pub(crate) fn fields<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    path: &Path,
) -> Result<T, ModelError> {
    serde_json::from_value(Value::Object(obj.clone())).map_err(|e| {
        let msg = e.to_string();
        match msg.strip_prefix("missing field ") {
            Some(key) => config_err(path, format!("required key {key} is missing")),
            None => config_err(path, msg),
        }
    })
}

/// Parses the text of a `config.json` (the path is for messages).
pub fn parse(text: &str, path: &Path) -> Result<ModelConfig, ModelError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| config_err(path, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(config_err(path, "expected a JSON object"));
    };
    let model_type = match obj.get("model_type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(config_err(path, "model_type must be a string")),
        None => return Err(config_err(path, "required key `model_type` is missing")),
    };
    let family = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" | "mixtral" => {
            Family::Decoder(decoder(&model_type, &obj, path)?)
        }
        "gpt2" => Family::Gpt2(gpt2::Gpt2Config::from_json(&obj, path)?),
        "bert" => Family::Bert(bert::BertConfig::from_json(&obj, path)?),
        "distilbert" => Family::DistilBert(distilbert::DistilBertConfig::from_json(&obj, path)?),
        _ => {
            return Err(ModelError::UnknownModelType {
                path: path.to_path_buf(),
                found: model_type,
                supported: SUPPORTED_MODEL_TYPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            })
        }
    };
    let head = head(&model_type, &obj, path)?;
    let labels = labels(&obj, path, head)?;
    let eos_token_ids = eos_ids(&obj, path)?;
    Ok(ModelConfig {
        model_type,
        head,
        family,
        labels,
        eos_token_ids,
        path: path.to_path_buf(),
    })
}

fn head(model_type: &str, obj: &Map<String, Value>, path: &Path) -> Result<Head, ModelError> {
    let decoder_family = !matches!(model_type, "bert" | "distilbert");
    let arch = match obj.get("architectures") {
        Some(Value::Array(a)) => a.first().and_then(Value::as_str),
        _ => None,
    };
    let Some(arch) = arch else {
        return Ok(if decoder_family {
            Head::CausalLm
        } else {
            Head::Base
        });
    };
    let head = if arch.ends_with("ForCausalLM") || arch == "GPT2LMHeadModel" {
        Head::CausalLm
    } else if arch.ends_with("ForMaskedLM") {
        Head::MaskedLm
    } else if arch.ends_with("ForSequenceClassification") {
        Head::SequenceClassification
    } else if arch.ends_with("Model") {
        Head::Base
    } else {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "architecture {arch:?} is not supported (kiln supports *ForCausalLM, *ForMaskedLM, *ForSequenceClassification and *Model)"
            ),
        });
    };
    let ok = match head {
        Head::CausalLm => decoder_family,
        Head::Base => true,
        Head::MaskedLm | Head::SequenceClassification => !decoder_family,
    };
    if !ok {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "architecture {arch:?} is not supported for model_type {model_type:?}"
            ),
        });
    }
    Ok(head)
}

fn eos_ids(obj: &Map<String, Value>, path: &Path) -> Result<Vec<u32>, ModelError> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| config_err(path, format!("eos_token_id {v} is not a token id")))
    };
    match obj.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(ids)) => ids.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// `id2label` in id order; for a classifier without it, transformers' default names
/// `LABEL_0..LABEL_{n-1}` with `n = num_labels` (2 when absent).
fn labels(obj: &Map<String, Value>, path: &Path, head: Head) -> Result<Vec<String>, ModelError> {
    let Some(Value::Object(map)) = obj.get("id2label") else {
        if head != Head::SequenceClassification {
            return Ok(Vec::new());
        }
        let n = match obj.get("num_labels") {
            None => 2,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    config_err(path, format!("num_labels {v} is not a positive integer"))
                })?,
        };
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    };
    let mut labels = vec![None; map.len()];
    for (k, v) in map {
        let idx = k.parse::<usize>().ok().filter(|&i| i < labels.len());
        match (idx, v.as_str()) {
            (Some(i), Some(name)) => labels[i] = Some(name.to_string()),
            _ => {
                return Err(config_err(
                    path,
                    format!("id2label entry {k:?}: {v} is not id → label"),
                ))
            }
        }
    }
    labels
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| config_err(path, "id2label ids must be 0..n-1"))
}

/// The keys shared by the Llama-family configs; defaults as transformers' config classes.
#[derive(Deserialize)]
struct RawDecoder {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
}

fn unsupported(path: &Path, message: String) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        message,
    }
}

fn decoder(
    model_type: &str,
    obj: &Map<String, Value>,
    path: &Path,
) -> Result<DecoderConfig, ModelError> {
    let raw: RawDecoder = fields(obj, path)?;
    let act = raw.hidden_act.as_deref().unwrap_or("silu");
    if act != "silu" {
        return Err(unsupported(
            path,
            format!("hidden_act {act:?} is not supported (only silu)"),
        ));
    }
    if raw.mlp_bias {
        return Err(unsupported(path, "mlp_bias = true is not supported".into()));
    }
    let heads = raw.num_attention_heads;
    let kv_heads = raw.num_key_value_heads.unwrap_or(match model_type {
        "mistral" | "mixtral" => 8,
        _ => heads,
    });
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(config_err(
            path,
            format!("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"),
        ));
    }
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
        None => {
            return Err(config_err(
                path,
                format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                    raw.hidden_size
                ),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(config_err(
            path,
            format!("head_dim ({head_dim}) must be even for RoPE"),
        ));
    }
    let sliding_window = match model_type {
        "mistral" => raw.sliding_window.or(Some(4096)),
        "mixtral" => raw.sliding_window,
        "qwen2" if raw.use_sliding_window => {
            return Err(unsupported(
                path,
                "qwen2 with use_sliding_window = true is not supported".into(),
            ))
        }
        _ => None,
    };
    let moe = match model_type {
        "mixtral" => Some(moe::MoeConfig {
            num_local_experts: raw.num_local_experts.unwrap_or(8),
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(2),
        }),
        _ => None,
    };
    if let Some(m) = &moe {
        if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_local_experts {
            return Err(config_err(
                path,
                "num_experts_per_tok must be in 1..=num_local_experts",
            ));
        }
    }
    let default_theta = if model_type == "mixtral" {
        1e6
    } else {
        10000.0
    };
    let default_max_pos = match model_type {
        "llama" => 2048,
        "qwen2" => 32768,
        _ => 4096 * 32,
    };
    let max_pos = raw.max_position_embeddings.unwrap_or(default_max_pos);
    let rope = rope_config(obj, path, head_dim, default_theta, max_pos)?;
    let eps = raw
        .rms_norm_eps
        .unwrap_or(if model_type == "mixtral" { 1e-5 } else { 1e-6 });
    Ok(DecoderConfig {
        vocab_size: raw.vocab_size,
        num_hidden_layers: raw.num_hidden_layers,
        tie_word_embeddings: raw.tie_word_embeddings,
        layer: LayerConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta: rope.theta,
            qkv_bias: model_type == "qwen2" || raw.attention_bias,
            o_bias: raw.attention_bias,
            sliding_window,
            moe,
        },
        rope,
        max_position_embeddings: max_pos,
    })
}

/// RoPE settings from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5).
fn rope_config(
    obj: &Map<String, Value>,
    path: &Path,
    dim: usize,
    default_theta: f64,
    max_pos: usize,
) -> Result<Rope, ModelError> {
    let params = obj
        .get("rope_parameters")
        .or_else(|| obj.get("rope_scaling"))
        .and_then(Value::as_object);
    let num =
        |key: &str| -> Option<f64> { params.and_then(|p| p.get(key)).and_then(Value::as_f64) };
    let theta = obj
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| num("rope_theta"))
        .unwrap_or(default_theta);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |key: &str| {
        num(key).ok_or_else(|| {
            config_err(
                path,
                format!("rope scaling {kind:?} needs a numeric {key:?}"),
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "dynamic" => RopeScaling::Dynamic {
            factor: need("factor")?,
            max_position_embeddings: num("original_max_position_embeddings").map_or(max_pos, |v| v as usize),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(unsupported(
                path,
                format!("rope type {other:?} is not supported (kiln supports default, linear, dynamic, llama3)"),
            ))
        }
    };
    Ok(Rope {
        theta,
        dim,
        scaling,
    })
}

//! Encoder models (BERT, DistilBERT): one graph over a padded batch, with the head chosen by
//! the config's `architectures`.
//!
//! Every encoder graph takes `input_ids` and `attention_mask` (i64 `[batch, seq]`, the mask 0/1
//! with 1 for real tokens) and, for BERT, `token_type_ids` (i64 `[batch, seq]`; all zeros for a
//! single segment). Positions are `0..seq`. It returns `last_hidden_state` (f32
//! `[batch, seq, hidden]`) and, per head, `logits`: `[batch, seq, vocab]` for masked LM,
//! `[batch, num_labels]` for sequence classification.

use crate::config::{Family, Head, ModelConfig};
use crate::{bert, distilbert, nn, ModelError};
use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{Dim, Graph};

/// A traced encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderGraph {
    /// The graph (inputs and outputs as in the [module docs](self)).
    pub graph: Graph,
    /// The graph takes `token_type_ids`.
    pub uses_token_types: bool,
}

/// What an encoder computes on top of `last_hidden_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderHead {
    /// Only `last_hidden_state` (`BertModel`, `DistilBertModel`).
    Base,
    /// Vocabulary `logits[batch, seq, vocab]` (`*ForMaskedLM`).
    MaskedLm,
    /// Class `logits[batch, num_labels]` from the first token (`*ForSequenceClassification`).
    SequenceClassification {
        /// Number of classes.
        num_labels: usize,
    },
}

impl EncoderHead {
    /// The checkpoint prefix of the base model's parameters: empty for a bare base model,
    /// `{base}.` (`bert.`, `distilbert.`) under a head.
    pub fn prefix(self, base: &str) -> String {
        match self {
            EncoderHead::Base => String::new(),
            _ => format!("{base}."),
        }
    }
}

/// transformers' `base_model_prefix` of a model type, with the dot (`bert.`), for
/// [`nn::adapt_param_names`]; empty when unknown.
pub fn base_model_prefix(model_type: &str) -> &'static str {
    match model_type {
        "bert" => "bert.",
        "distilbert" => "distilbert.",
        "gpt2" => "transformer.",
        "llama" | "mistral" | "qwen2" | "mixtral" => "model.",
        _ => "",
    }
}

/// Traces the encoder a config describes, with its head.
pub fn trace_encoder(cfg: &ModelConfig) -> Result<EncoderGraph, ModelError> {
    let unsupported = |message: String| ModelError::Unsupported {
        path: cfg.path.clone(),
        message,
    };
    let head = match cfg.head {
        Head::Base => EncoderHead::Base,
        Head::MaskedLm => EncoderHead::MaskedLm,
        Head::SequenceClassification if cfg.labels.is_empty() => {
            return Err(ModelError::Config {
                path: cfg.path.clone(),
                message: "a sequence-classification model needs its classes: id2label is \
                          missing or empty"
                    .into(),
            })
        }
        Head::SequenceClassification => EncoderHead::SequenceClassification {
            num_labels: cfg.labels.len(),
        },
        Head::CausalLm => {
            return Err(unsupported(format!(
                "a causal-LM head is not an encoder (model_type {:?})",
                cfg.model_type
            )))
        }
    };
    match &cfg.family {
        Family::Bert(c) => Ok(EncoderGraph {
            graph: bert::trace(c, head)?,
            uses_token_types: true,
        }),
        Family::DistilBert(c) => Ok(EncoderGraph {
            graph: distilbert::trace(c, head)?,
            uses_token_types: false,
        }),
        Family::Decoder(_) | Family::Gpt2(_) => Err(unsupported(format!(
            "model_type {:?} is a causal LM, not an encoder",
            cfg.model_type
        ))),
    }
}

/// Bidirectional multi-head self-attention of `x[batch, seq, hidden]` with an additive `mask`
/// broadcastable to `[batch, heads, seq, seq]`, as transformers' `eager_attention_forward`:
/// `softmax(q·kᵀ · head_dim^-0.5 + mask) · v`, heads merged back to `[batch, seq, hidden]`
/// (before the output projection). `names` are the query, key and value projections (each an
/// `nn.Linear` with bias) under `prefix`.
pub fn self_attention(
    t: &Tracer,
    x: &Tensor,
    mask: &Tensor,
    prefix: &str,
    names: [&str; 3],
    hidden: usize,
    heads: usize,
) -> TraceResult {
    let (b, s) = (x.dim(0)?, x.dim(1)?);
    let d = hidden / heads.max(1);
    let split = |name: &str| -> TraceResult {
        nn::linear(t, x, &nn::join(prefix, name), hidden, hidden, true)?
            .reshape(&[b.clone(), s.clone(), Dim::from(heads), Dim::from(d)])?
            .transpose(1, 2)
    };
    let [q, k, v] = names;
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (&q.matmul_t(&k, false, true)? * (d as f64).powf(-0.5))?;
    scores
        .add(mask)?
        .softmax(-1)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape(&[b, s, Dim::from(hidden)])
}

/// Hidden state of the first token: `x[:, 0]`, `[batch, hidden]`.
pub fn first_token(x: &Tensor) -> TraceResult {
    let (b, h) = (x.dim(0)?, x.dim(2)?);
    x.slice(1, 0, 1)?.reshape(&[b, h])
}

/// Where a post-LayerNorm encoder layer's parameters live, relative to the layer's prefix
/// (BERT and DistilBERT layers compute the same thing under different names).
pub struct LayerNames {
    /// Prefix of the q, k, v projections.
    pub attention: &'static str,
    /// The q, k, v projections.
    pub qkv: [&'static str; 3],
    /// The attention output projection.
    pub attention_out: &'static str,
    /// The LayerNorm after attention.
    pub attention_norm: &'static str,
    /// The first MLP projection.
    pub mlp_in: &'static str,
    /// The second MLP projection.
    pub mlp_out: &'static str,
    /// The LayerNorm after the MLP.
    pub output_norm: &'static str,
}

/// The sizes of a post-LayerNorm encoder layer.
pub struct LayerSizes {
    /// Model width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: nn::Activation,
}

/// One post-LayerNorm encoder layer under prefix `p` on `x[batch, seq, hidden]`:
/// `y = LN(x + attn(x))`, `out = LN(y + mlp(y))`, all projections `nn.Linear` with bias.
pub fn post_ln_layer(
    t: &Tracer,
    x: &Tensor,
    mask: &Tensor,
    p: &str,
    names: &LayerNames,
    sizes: &LayerSizes,
) -> TraceResult {
    let (h, i) = (sizes.hidden, sizes.intermediate);
    let ctx = self_attention(
        t,
        x,
        mask,
        &nn::join(p, names.attention),
        names.qkv,
        h,
        sizes.heads,
    )?;
    let out = nn::linear(t, &ctx, &nn::join(p, names.attention_out), h, h, true)?;
    let x = nn::layer_norm(
        t,
        &out.add(x)?,
        &nn::join(p, names.attention_norm),
        sizes.eps,
    )?;
    let y = nn::linear(t, &x, &nn::join(p, names.mlp_in), i, h, true)?;
    let y = sizes.act.apply(&y)?;
    let y = nn::linear(t, &y, &nn::join(p, names.mlp_out), h, i, true)?;
    nn::layer_norm(t, &y.add(&x)?, &nn::join(p, names.output_norm), sizes.eps)
}

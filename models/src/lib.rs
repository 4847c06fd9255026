//! Model families, written as PyTorch-like code against kiln's tracer and traced into IR with
//! primitive ops only (fusion is the optimizer's job).
//!
//! - [`config`]: `config.json` → a family configuration and a head (AutoConfig/AutoModel);
//! - [`nn`], [`rope`], [`moe`]: layers shared by the families;
//! - [`llama`] (llama, mistral, qwen2, mixtral), [`gpt2`], [`bert`], [`distilbert`]: the families.
//!
//! Causal LMs trace into two graphs ([`CausalGraphs`]); encoders into one ([`EncoderGraph`]).

pub mod bert;
pub mod causal;
pub mod config;
pub mod dir;
pub mod distilbert;
pub mod encoder;
mod error;
pub mod gpt2;
pub mod llama;
pub mod moe;
pub mod nn;
pub mod pooling;
pub mod rope;

pub use config::{Head, ModelConfig};
pub use dir::ModelDir;
pub use encoder::{trace_encoder, EncoderGraph, EncoderHead};
pub use error::{ModelError, TraceError};

use kiln_ir::Graph;

/// A causal LM's graphs. Both take `input_ids`, `position_ids` (i64 `[batch, seq]`) and a 0/1
/// `attention_mask` (i64 `[batch, kv]` over every key position, cached and new) and return
/// `logits` (f32 `[batch, seq, vocab]`) and each layer's cache `present.{i}.key` /
/// `present.{i}.value` (`[batch, kv_heads, kv, head_dim]`); the prefill graph also returns
/// `last_logits` (`[batch, 1, vocab]`, the last position's). The decode graph also takes the
/// cache so far, `past.{i}.key` / `past.{i}.value` (`[batch, kv_heads, past, head_dim]`), and
/// `kv = past + seq`; in the prefill graph `kv = seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalGraphs {
    /// The graph for the prompt.
    pub prefill: Graph,
    /// The graph for later tokens.
    pub decode: Graph,
    /// Layers (cache entries).
    pub num_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

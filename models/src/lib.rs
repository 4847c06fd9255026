//! Model families, written as PyTorch-like code against kiln's tracer and traced into IR with
//! primitive ops only (fusion is the optimizer's job).
//!
//! - [`nn`]: layers shared by the families (linear, RMSNorm, SwiGLU MLP);
//! - [`rope`]: rotary position embeddings;
//! - [`llama`]: the Llama decoder layer (RMSNorm, RoPE, GQA attention, SwiGLU MLP).

mod error;
pub mod llama;
pub mod nn;
pub mod rope;

pub use error::TraceError;

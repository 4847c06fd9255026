//! kiln's CPU kernels.
//!
//! * [`attention`]: flash attention in f32 over strided q/k/v views (GQA, causal, sliding
//!   window, additive mask; split key ranges for decode), writing any output layout.
//! * [`convert`]: the dtype conversion kernels used when binding weights, which decode
//!   little-endian bytes of one dtype into typed vectors of another (f32, f16, bf16 and the two
//!   fp8 formats among each other, plus lossless integer widenings) and encode f32 values into
//!   the bytes of any float dtype.
//! * [`gemm`]: f32 matrix products with the IR's transpose flags, strided and batched.
//! * [`gemm_bf16`]: bf16-weight matrix products (`vdpbf16ps`) on prepacked weights.
//! * [`gemv`]: matrix-vector products for decode, `y = W · x` with bf16, f32 or fp8 e4m3
//!   (per-tensor scale; also a few rows of x at once) weights.
//! * [`linear`]: linear layers with their epilogue (per-column scale, residual or bias add),
//!   alone or in groups reading the same activation (one parallel region per group in decode).
//! * [`rope`]: rotary embedding in rotate-half form, one pass over strided operands.
//! * [`rowwise`]: rmsnorm, layernorm and softmax over the last axis.
//! * [`elementwise`]: fused elementwise kernels (`silu(a) · b`).
//! * [`fused`]: compiled programs for any `fused_elementwise` body over broadcast/strided
//!   operands, interpreted per chunk of elements.
//! * [`layout`]: strided copies (permute, slice, expand, concat).
//! * [`pages`]: backing weights with transparent huge pages (decode streams them).
//! * [`pool`]: a persistent team of threads (the caller and spinning helpers) for decode's
//!   short parallel regions.
//! * `scratch`: per-thread spare vectors, so a steady decode loop's kernel calls do not
//!   allocate their scratch.
//! * [`peak`]: machine ceilings (FMA and bf16 dot-product peak, copy and read bandwidth).
//!
//! Every fast path is chosen at run time with `is_x86_feature_detected!` and has a portable
//! fallback, so the crate runs on any CPU; `unsafe` is confined to the SIMD paths, each block
//! with a `// SAFETY:` comment. Parallel kernels use rayon's global pool ([`threads`]), the
//! decode GEMVs and attention the [`pool`] team of as many threads.

pub mod attention;
pub mod convert;
pub mod elementwise;
pub mod fused;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemv;
pub mod layout;
pub mod linear;
pub mod pages;
pub mod peak;
pub mod pool;
pub mod refine;
pub mod rope;
pub mod rowwise;
mod scratch;
pub use scratch::recycle;
mod simd;

pub use convert::ConvertError;
pub use simd::{features, Features, Isa};

/// A kernel called with operands that do not fit its description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A slice is too short for the shape and strides given, or a stride is too small.
    #[error("bad operand layout: {0}")]
    Layout(String),
}

/// Threads the parallel kernels use: the size of rayon's global pool (the number of CPUs unless
/// `RAYON_NUM_THREADS` says otherwise).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

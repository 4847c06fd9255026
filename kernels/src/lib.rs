//! kiln's CPU kernels.
//!
//! For now this is [`convert`]: the dtype conversion kernels used when binding weights, which
//! decode little-endian bytes of one dtype into typed vectors of another (f32, f16, bf16 and the
//! two fp8 formats among each other, plus lossless integer widenings) and encode f32 values
//! into the bytes of any float dtype.

pub mod convert;

pub use convert::ConvertError;

//! Host tensors to and from the bytes the device stores (little-endian elements in their
//! dtype, fp8 as raw bytes, bool as one byte 0/1).

use half::{bf16, f16};
use kiln_ir::DType;
use kiln_runtime::tensor::ShapeMismatch;
use kiln_runtime::{Storage, Tensor};

/// The tensor's elements as the device stores them.
pub fn to_bytes(t: &Tensor) -> Vec<u8> {
    match t.storage() {
        Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::F8E4M3(v) | Storage::F8E5M2(v) | Storage::U8(v) => v.clone(),
        Storage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
    }
}

fn words<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N)
        .map(|c| {
            let mut w = [0u8; N];
            w.copy_from_slice(c);
            f(w)
        })
        .collect()
}

/// A tensor of `dtype` and `shape` from device bytes (extra trailing bytes are ignored; too
/// few is an error).
pub fn from_bytes(dtype: DType, shape: &[usize], b: &[u8]) -> Result<Tensor, ShapeMismatch> {
    let n: usize = shape.iter().product();
    let b = &b[..(n * dtype.size_bytes()).min(b.len())];
    let s = match dtype {
        DType::F32 => Storage::F32(words(b, f32::from_le_bytes)),
        DType::F16 => Storage::F16(words(b, f16::from_le_bytes)),
        DType::BF16 => Storage::BF16(words(b, bf16::from_le_bytes)),
        DType::F8E4M3 => Storage::F8E4M3(b.to_vec()),
        DType::F8E5M2 => Storage::F8E5M2(b.to_vec()),
        DType::U8 => Storage::U8(b.to_vec()),
        DType::I64 => Storage::I64(words(b, i64::from_le_bytes)),
        DType::I32 => Storage::I32(words(b, i32::from_le_bytes)),
        DType::Bool => Storage::Bool(b.iter().map(|&x| x != 0).collect()),
    };
    Tensor::new(shape.to_vec(), s)
}

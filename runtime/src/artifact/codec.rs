//! Tensors to and from the raw little-endian bytes of the weight data section. Reading goes
//! straight from the file into each tensor's storage through one small buffer, feeding the
//! section's running checksum, so loading needs no second copy of the weights.

use super::checksum::Hasher;
use crate::{Storage, Tensor};
use half::{bf16, f16};
use kiln_ir::DType;
use std::io::Read;

/// Bytes read at a time (a multiple of every element size).
pub const CHUNK: usize = 1 << 16;

/// An element type with a fixed little-endian encoding.
trait Elem: Sized {
    const N: usize;
    fn from_le(b: &[u8]) -> Self;
    fn put_le(&self, out: &mut Vec<u8>);
}

macro_rules! elem {
    ($t:ty, $n:expr) => {
        impl Elem for $t {
            const N: usize = $n;
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            fn put_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
elem!(f32, 4);
elem!(f16, 2);
elem!(bf16, 2);
elem!(i64, 8);
elem!(i32, 4);

fn put<T: Elem>(v: &[T], out: &mut Vec<u8>) {
    out.reserve(v.len() * T::N);
    for x in v {
        x.put_le(out);
    }
}

/// Appends `t`'s elements, little-endian.
pub fn append(t: &Tensor, out: &mut Vec<u8>) {
    match t.storage() {
        Storage::F32(v) => put(v, out),
        Storage::F16(v) => put(v, out),
        Storage::BF16(v) => put(v, out),
        Storage::I64(v) => put(v, out),
        Storage::I32(v) => put(v, out),
        Storage::F8E4M3(v) | Storage::F8E5M2(v) | Storage::U8(v) => out.extend_from_slice(v),
        Storage::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
    }
}

/// Why a tensor's bytes could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The reader failed.
    Io(std::io::Error),
    /// A `bool` byte other than 0 or 1, or a shape the elements do not fill.
    Invalid(String),
}

/// Reads exactly `buf.len()` bytes into `buf`, feeding the section's `hash`.
pub fn read_into<R: Read>(r: &mut R, buf: &mut [u8], hash: &mut Hasher) -> Result<(), ReadError> {
    r.read_exact(buf).map_err(ReadError::Io)?;
    hash.update(buf);
    Ok(())
}

fn read_elems<T: Elem, R: Read>(
    r: &mut R,
    n: usize,
    hash: &mut Hasher,
    buf: &mut [u8],
) -> Result<Vec<T>, ReadError> {
    let mut v = Vec::with_capacity(n);
    let mut left = n * T::N;
    while left > 0 {
        let take = left.min(buf.len() / T::N * T::N);
        read_into(r, &mut buf[..take], hash)?;
        v.extend(buf[..take].chunks_exact(T::N).map(T::from_le));
        left -= take;
    }
    Ok(v)
}

fn read_bytes<R: Read>(r: &mut R, n: usize, hash: &mut Hasher) -> Result<Vec<u8>, ReadError> {
    let mut v = vec![0u8; n];
    read_into(r, &mut v, hash)?;
    Ok(v)
}

/// Reads a `dtype` tensor of `shape` (`numel` elements, checked by the caller against the
/// bytes the index gives it) from `r`.
pub fn read_tensor<R: Read>(
    r: &mut R,
    dtype: DType,
    shape: Vec<usize>,
    numel: usize,
    hash: &mut Hasher,
    buf: &mut [u8],
) -> Result<Tensor, ReadError> {
    let storage = match dtype {
        DType::F32 => Storage::F32(read_elems(r, numel, hash, buf)?),
        DType::F16 => Storage::F16(read_elems(r, numel, hash, buf)?),
        DType::BF16 => Storage::BF16(read_elems(r, numel, hash, buf)?),
        DType::I64 => Storage::I64(read_elems(r, numel, hash, buf)?),
        DType::I32 => Storage::I32(read_elems(r, numel, hash, buf)?),
        DType::F8E4M3 => Storage::F8E4M3(read_bytes(r, numel, hash)?),
        DType::F8E5M2 => Storage::F8E5M2(read_bytes(r, numel, hash)?),
        DType::U8 => Storage::U8(read_bytes(r, numel, hash)?),
        DType::Bool => {
            let bytes = read_bytes(r, numel, hash)?;
            if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                return Err(ReadError::Invalid(format!(
                    "bool element {b} is not 0 or 1"
                )));
            }
            Storage::Bool(bytes.into_iter().map(|b| b == 1).collect())
        }
    };
    Tensor::new(shape, storage).map_err(|e| ReadError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips() {
        let tensors = [
            Tensor::from_f32(vec![2, 2], vec![1.5, -0.0, f32::INFINITY, 3e-39]).unwrap(),
            Tensor::new(vec![3], Storage::BF16(vec![bf16::from_f32(1.25); 3])).unwrap(),
            Tensor::new(vec![1], Storage::F16(vec![f16::from_f32(-2.0)])).unwrap(),
            Tensor::from_i64(vec![2], vec![i64::MIN, 7]).unwrap(),
            Tensor::new(vec![2], Storage::I32(vec![-1, 9])).unwrap(),
            Tensor::new(vec![2], Storage::F8E4M3(vec![0x7e, 0x01])).unwrap(),
            Tensor::from_bool(vec![3], vec![true, false, true]).unwrap(),
        ];
        for t in tensors {
            let mut bytes = Vec::new();
            append(&t, &mut bytes);
            assert_eq!(bytes.len(), t.storage().len() * t.dtype().size_bytes());
            let mut hash = Hasher::new();
            let mut buf = vec![0u8; 8];
            let back = read_tensor(
                &mut bytes.as_slice(),
                t.dtype(),
                t.shape().to_vec(),
                t.storage().len(),
                &mut hash,
                &mut buf,
            )
            .unwrap();
            assert_eq!(back, t);
            assert_eq!(hash.finish(), super::super::checksum::xxh64(&bytes));
        }
    }

    #[test]
    fn bool_bytes_other_than_0_and_1_are_refused() {
        let mut hash = Hasher::new();
        let e = read_tensor(
            &mut &[0u8, 2][..],
            DType::Bool,
            vec![2],
            2,
            &mut hash,
            &mut [0; 8],
        );
        assert!(matches!(e, Err(ReadError::Invalid(m)) if m.contains("not 0 or 1")));
    }
}

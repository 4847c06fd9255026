//! Tensors to and from the raw little-endian bytes of the weight data section. The reader uses
//! most tensors in place from the file ([`Tensor::borrowed`]); [`decode`] makes owned copies of
//! the others.

use crate::tensor::Elements;
use crate::{Storage, Tensor};
use half::{bf16, f16};
use kiln_ir::DType;

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
    match t.elements() {
        Elements::F32(v) => put(v, out),
        Elements::F16(v) => put(v, out),
        Elements::BF16(v) => put(v, out),
        Elements::I64(v) => put(v, out),
        Elements::I32(v) => put(v, out),
        Elements::F8E4M3(v) | Elements::F8E5M2(v) | Elements::U8(v) => out.extend_from_slice(v),
        Elements::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
    }
}

fn decode_elems<T: Elem>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(T::N).map(T::from_le).collect()
}

/// A `dtype` tensor of `shape` decoded into owned storage from its little-endian `bytes`
/// (sized by the caller from the index, checked again here): for the tensors that cannot be
/// used in place from the file (bool, whose bytes must be 0 or 1; any dtype on a big-endian
/// host).
pub fn decode(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor, String> {
    let storage = match dtype {
        DType::F32 => Storage::F32(decode_elems(bytes)),
        DType::F16 => Storage::F16(decode_elems(bytes)),
        DType::BF16 => Storage::BF16(decode_elems(bytes)),
        DType::I64 => Storage::I64(decode_elems(bytes)),
        DType::I32 => Storage::I32(decode_elems(bytes)),
        DType::F8E4M3 => Storage::F8E4M3(bytes.to_vec()),
        DType::F8E5M2 => Storage::F8E5M2(bytes.to_vec()),
        DType::U8 => Storage::U8(bytes.to_vec()),
        DType::Bool => {
            if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                return Err(format!("bool element {b} is not 0 or 1"));
            }
            Storage::Bool(bytes.iter().map(|&b| b == 1).collect())
        }
    };
    if bytes.len() != storage.len() * dtype.size_bytes() {
        return Err(format!(
            "{} bytes do not hold whole {dtype} elements",
            bytes.len()
        ));
    }
    Tensor::new(shape, storage).map_err(|e| e.to_string())
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
            assert_eq!(bytes.len(), t.numel() * t.dtype().size_bytes());
            let back = decode(t.dtype(), t.shape().to_vec(), &bytes).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn bad_bytes_are_refused() {
        let e = decode(DType::Bool, vec![2], &[0, 2]).unwrap_err();
        assert!(e.contains("not 0 or 1"), "{e}");
        let e = decode(DType::F32, vec![1], &[0, 0, 0, 0, 1]).unwrap_err();
        assert!(e.contains("whole f32 elements"), "{e}");
        assert!(decode(DType::F32, vec![2], &[0; 4]).is_err());
    }
}

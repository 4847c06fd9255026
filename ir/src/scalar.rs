//! Single element values and their byte encoding in each dtype (little-endian), shared by
//! constants in the IR and by tensors in the runtime.

use crate::f8;
use crate::DType;
use half::{bf16, f16};

/// One element, widened: floats to f64, integers to i64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    /// A floating value.
    Float(f64),
    /// An integer value.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl Scalar {
    /// The value as f64 (bool as 0/1, integers rounded when beyond 2^53).
    pub fn as_f64(self) -> f64 {
        match self {
            Scalar::Float(x) => x,
            Scalar::Int(i) => i as f64,
            Scalar::Bool(b) => f64::from(u8::from(b)),
        }
    }

    /// The value as i64 (floats truncated toward zero and saturated, NaN as 0; bool as 0/1).
    pub fn as_i64(self) -> i64 {
        match self {
            Scalar::Float(x) => x as i64,
            Scalar::Int(i) => i,
            Scalar::Bool(b) => i64::from(b),
        }
    }

    /// The value as bool (non-zero is true; NaN is true, as in PyTorch).
    pub fn as_bool(self) -> bool {
        match self {
            Scalar::Float(x) => x != 0.0,
            Scalar::Int(i) => i != 0,
            Scalar::Bool(b) => b,
        }
    }

    /// Converts to the natural scalar kind of `dtype`, rounding floats to that dtype's precision
    /// and wrapping integers as a C cast would (as PyTorch's `.to()`).
    pub fn convert(self, dtype: DType) -> Scalar {
        decode(dtype, &encode_vec(dtype, self))
    }
}

/// Appends the little-endian encoding of `v` converted to `dtype`.
pub fn encode(dtype: DType, v: Scalar, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(&(v.as_f64() as f32).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f32(v.as_f64() as f32).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(v.as_f64() as f32).to_le_bytes()),
        DType::F8E4M3 => out.push(f8::f32_to_f8e4m3(v.as_f64() as f32)),
        DType::F8E5M2 => out.push(f8::f32_to_f8e5m2(v.as_f64() as f32)),
        DType::I64 => out.extend_from_slice(&v.as_i64().to_le_bytes()),
        DType::I32 => out.extend_from_slice(&(v.as_i64() as i32).to_le_bytes()),
        DType::U8 => out.push(v.as_i64() as u8),
        DType::Bool => out.push(u8::from(v.as_bool())),
    }
}

fn encode_vec(dtype: DType, v: Scalar) -> Vec<u8> {
    let mut out = Vec::with_capacity(dtype.size_bytes());
    encode(dtype, v, &mut out);
    out
}

/// Decodes one element of `dtype` from the first `dtype.size_bytes()` bytes of `b`.
///
/// # Panics
/// If `b` is shorter than one element; callers size their buffers from the dtype.
pub fn decode(dtype: DType, b: &[u8]) -> Scalar {
    match dtype {
        DType::F32 => Scalar::Float(f32::from_le_bytes([b[0], b[1], b[2], b[3]]).into()),
        DType::F16 => Scalar::Float(f16::from_le_bytes([b[0], b[1]]).to_f64()),
        DType::BF16 => Scalar::Float(bf16::from_le_bytes([b[0], b[1]]).to_f64()),
        DType::F8E4M3 => Scalar::Float(f8::f8e4m3_to_f32(b[0]).into()),
        DType::F8E5M2 => Scalar::Float(f8::f8e5m2_to_f32(b[0]).into()),
        DType::I64 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            Scalar::Int(i64::from_le_bytes(a))
        }
        DType::I32 => Scalar::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into()),
        DType::U8 => Scalar::Int(b[0].into()),
        DType::Bool => Scalar::Bool(b[0] != 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_like_casts() {
        assert_eq!(
            Scalar::Float(1.0 / 3.0).convert(DType::BF16),
            Scalar::Float(0.333984375)
        );
        assert_eq!(Scalar::Float(-2.7).convert(DType::I64), Scalar::Int(-2));
        assert_eq!(Scalar::Int(300).convert(DType::U8), Scalar::Int(44));
        assert_eq!(Scalar::Float(0.5).convert(DType::Bool), Scalar::Bool(true));
        assert_eq!(
            Scalar::Float(1.0).convert(DType::F8E4M3),
            Scalar::Float(1.0)
        );
        assert_eq!(
            Scalar::Int(i64::MIN).convert(DType::I64),
            Scalar::Int(i64::MIN)
        );
    }
}

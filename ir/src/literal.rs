//! Constant tensors embedded in a graph: a fixed shape and the elements' bytes in their dtype.

use crate::scalar::{decode, encode, Scalar};
use crate::DType;
use serde::{Deserialize, Serialize};

/// A constant's value: dtype, fixed shape, and row-major little-endian element bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Literal {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A literal whose byte count disagrees with its shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constant of type {dtype}{shape:?} needs {expected} bytes, got {got}")]
pub struct LiteralSizeError {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes the shape needs.
    pub expected: usize,
    /// Bytes given.
    pub got: usize,
}

/// Bytes of `shape` elements of `dtype` (saturating: no real literal comes near the limit).
fn byte_len(dtype: DType, shape: &[usize]) -> usize {
    shape
        .iter()
        .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX)
}

impl Literal {
    /// A literal from raw little-endian bytes.
    pub fn from_bytes(
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<Self, LiteralSizeError> {
        let expected = byte_len(dtype, &shape);
        if bytes.len() != expected {
            return Err(LiteralSizeError {
                dtype,
                shape,
                expected,
                got: bytes.len(),
            });
        }
        Ok(Literal {
            dtype,
            shape,
            bytes,
        })
    }

    /// A literal from scalar values, each converted to `dtype`.
    pub fn from_scalars(
        dtype: DType,
        shape: Vec<usize>,
        values: &[Scalar],
    ) -> Result<Self, LiteralSizeError> {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size_bytes());
        for v in values {
            encode(dtype, *v, &mut bytes);
        }
        Literal::from_bytes(dtype, shape, bytes)
    }

    /// A rank-0 constant.
    pub fn scalar(dtype: DType, v: f64) -> Self {
        let mut bytes = Vec::new();
        encode(dtype, Scalar::Float(v), &mut bytes);
        Literal {
            dtype,
            shape: Vec::new(),
            bytes,
        }
    }

    /// A rank-0 integer constant (exact for all i64).
    pub fn scalar_int(dtype: DType, v: i64) -> Self {
        let mut bytes = Vec::new();
        encode(dtype, Scalar::Int(v), &mut bytes);
        Literal {
            dtype,
            shape: Vec::new(),
            bytes,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Raw element bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of elements (as the bytes hold them).
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size_bytes()
    }

    /// Checks that the bytes hold exactly the shape's elements (a deserialized literal may not).
    pub fn check(&self) -> Result<(), LiteralSizeError> {
        let expected = byte_len(self.dtype, &self.shape);
        if self.bytes.len() != expected {
            return Err(LiteralSizeError {
                dtype: self.dtype,
                shape: self.shape.clone(),
                expected,
                got: self.bytes.len(),
            });
        }
        Ok(())
    }

    /// True when the literal has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, widened.
    pub fn values(&self) -> Vec<Scalar> {
        self.bytes
            .chunks_exact(self.dtype.size_bytes())
            .map(|c| decode(self.dtype, c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_checked() {
        assert!(Literal::from_bytes(DType::F32, vec![2], vec![0; 7]).is_err());
        let l = Literal::from_scalars(
            DType::BF16,
            vec![2],
            &[Scalar::Float(1.5), Scalar::Float(-2.0)],
        )
        .unwrap();
        assert_eq!(l.values(), vec![Scalar::Float(1.5), Scalar::Float(-2.0)]);
        assert_eq!(
            Literal::scalar_int(DType::I64, -7).values(),
            vec![Scalar::Int(-7)]
        );
    }
}

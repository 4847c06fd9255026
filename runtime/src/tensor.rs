//! Host tensors: a dtype, a concrete shape, and row-major elements stored in their own format.

use half::{bf16, f16};
use kiln_ir::scalar::Scalar;
use kiln_ir::{f8, DType};

/// Elements of a tensor, stored in the tensor's dtype (fp8 as raw bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// fp8 e4m3fn bit patterns.
    F8E4M3(Vec<u8>),
    /// fp8 e5m2 bit patterns.
    F8E5M2(Vec<u8>),
    /// i64 elements.
    I64(Vec<i64>),
    /// i32 elements.
    I32(Vec<i32>),
    /// u8 elements.
    U8(Vec<u8>),
    /// bool elements.
    Bool(Vec<bool>),
}

/// A tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// A tensor whose element count disagrees with its shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} needs {expected} elements, got {got}")]
pub struct ShapeMismatch {
    /// The shape asked for.
    pub shape: Vec<usize>,
    /// Elements the shape needs.
    pub expected: usize,
    /// Elements given.
    pub got: usize,
}

impl Storage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::F8E4M3(_) => DType::F8E4M3,
            Storage::F8E5M2(_) => DType::F8E5M2,
            Storage::I64(_) => DType::I64,
            Storage::I32(_) => DType::I32,
            Storage::U8(_) => DType::U8,
            Storage::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F8E4M3(v) | Storage::F8E5M2(v) | Storage::U8(v) => v.len(),
            Storage::I64(v) => v.len(),
            Storage::I32(v) => v.len(),
            Storage::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn get(&self, i: usize) -> Scalar {
        match self {
            Storage::F32(v) => Scalar::Float(v[i].into()),
            Storage::F16(v) => Scalar::Float(v[i].to_f64()),
            Storage::BF16(v) => Scalar::Float(v[i].to_f64()),
            Storage::F8E4M3(v) => Scalar::Float(f8::f8e4m3_to_f32(v[i]).into()),
            Storage::F8E5M2(v) => Scalar::Float(f8::f8e5m2_to_f32(v[i]).into()),
            Storage::I64(v) => Scalar::Int(v[i]),
            Storage::I32(v) => Scalar::Int(v[i].into()),
            Storage::U8(v) => Scalar::Int(v[i].into()),
            Storage::Bool(v) => Scalar::Bool(v[i]),
        }
    }

    /// Builds storage of `dtype` from widened values, converting each as a cast would
    /// (floats rounded to nearest even, fp8 as PyTorch's cast, integers wrapped).
    pub fn from_scalars(dtype: DType, values: impl Iterator<Item = Scalar>) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(values.map(|v| v.as_f64() as f32).collect()),
            DType::F16 => Storage::F16(values.map(|v| f16::from_f32(v.as_f64() as f32)).collect()),
            DType::BF16 => {
                Storage::BF16(values.map(|v| bf16::from_f32(v.as_f64() as f32)).collect())
            }
            DType::F8E4M3 => Storage::F8E4M3(
                values
                    .map(|v| f8::f32_to_f8e4m3(v.as_f64() as f32))
                    .collect(),
            ),
            DType::F8E5M2 => Storage::F8E5M2(
                values
                    .map(|v| f8::f32_to_f8e5m2(v.as_f64() as f32))
                    .collect(),
            ),
            DType::I64 => Storage::I64(values.map(Scalar::as_i64).collect()),
            DType::I32 => Storage::I32(values.map(|v| v.as_i64() as i32).collect()),
            DType::U8 => Storage::U8(values.map(|v| v.as_i64() as u8).collect()),
            DType::Bool => Storage::Bool(values.map(Scalar::as_bool).collect()),
        }
    }
}

impl Tensor {
    /// A tensor from storage and a shape with the same element count.
    pub fn new(shape: Vec<usize>, storage: Storage) -> Result<Tensor, ShapeMismatch> {
        let expected: usize = shape.iter().product();
        if expected != storage.len() {
            return Err(ShapeMismatch {
                shape,
                expected,
                got: storage.len(),
            });
        }
        Ok(Tensor { shape, storage })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::F32(data))
    }

    /// An i64 tensor.
    pub fn from_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::I64(data))
    }

    /// A bool tensor.
    pub fn from_bool(shape: Vec<usize>, data: Vec<bool>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::Bool(data))
    }

    /// A tensor of `dtype` from widened values (converted as a cast would).
    pub fn from_scalars(
        dtype: DType,
        shape: Vec<usize>,
        values: impl IntoIterator<Item = Scalar>,
    ) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Storage::from_scalars(dtype, values.into_iter()))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.storage.len()
    }

    /// The elements.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Element `i` (row-major), widened.
    ///
    /// # Panics
    /// If `i >= numel()`.
    pub fn get(&self, i: usize) -> Scalar {
        self.storage.get(i)
    }

    /// The f32 elements, if the tensor is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The i64 elements, if the tensor is i64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.storage {
            Storage::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The sub-tensors `self[i]` for each `i` of `rows`, stacked along a new axis 0 (rows may
    /// repeat); `None` for a rank-0 tensor or an index out of range.
    pub fn select_rows(&self, rows: &[usize]) -> Option<Tensor> {
        let (&n, rest) = self.shape.split_first()?;
        if rows.iter().any(|&r| r >= n) {
            return None;
        }
        let chunk: usize = rest.iter().product();
        fn pick<T: Clone>(v: &[T], chunk: usize, rows: &[usize]) -> Vec<T> {
            rows.iter()
                .flat_map(|&r| v[r * chunk..(r + 1) * chunk].iter().cloned())
                .collect()
        }
        let storage = match &self.storage {
            Storage::F32(v) => Storage::F32(pick(v, chunk, rows)),
            Storage::F16(v) => Storage::F16(pick(v, chunk, rows)),
            Storage::BF16(v) => Storage::BF16(pick(v, chunk, rows)),
            Storage::F8E4M3(v) => Storage::F8E4M3(pick(v, chunk, rows)),
            Storage::F8E5M2(v) => Storage::F8E5M2(pick(v, chunk, rows)),
            Storage::I64(v) => Storage::I64(pick(v, chunk, rows)),
            Storage::I32(v) => Storage::I32(pick(v, chunk, rows)),
            Storage::U8(v) => Storage::U8(pick(v, chunk, rows)),
            Storage::Bool(v) => Storage::Bool(pick(v, chunk, rows)),
        };
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        Some(Tensor { shape, storage })
    }

    /// All elements widened to f64 (bool as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.numel()).map(|i| self.get(i).as_f64()).collect()
    }

    /// A copy converted to `dtype` (as a cast).
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::from_scalars(dtype, (0..self.numel()).map(|i| self.get(i))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_and_cast() {
        assert!(Tensor::from_f32(vec![2, 2], vec![1.0; 3]).is_err());
        let t = Tensor::from_f32(vec![3], vec![1.5, -2.25, 1e6]).unwrap();
        let h = t.cast(DType::F8E4M3);
        assert_eq!(h.dtype(), DType::F8E4M3);
        assert_eq!(h.get(0), Scalar::Float(1.5));
        assert_eq!(
            h.get(2),
            Scalar::Float(448.0),
            "torch's e4m3fn cast saturates"
        );
        assert_eq!(t.cast(DType::I64).as_i64().unwrap(), &[1, -2, 1_000_000]);
        assert_eq!(
            t.cast(DType::BF16).cast(DType::F32).as_f32().unwrap()[1],
            -2.25
        );
    }
}

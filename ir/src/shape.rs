//! Tensor types (dtype + symbolic shape) and numpy broadcasting over symbolic dims.

use crate::{DType, Dim};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A shape: one [`Dim`] per axis, outermost first. The empty shape is a scalar.
pub type Shape = Vec<Dim>;

/// The type of an SSA value: element type and (possibly symbolic) shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Shape,
}

impl TensorType {
    /// A type from a dtype and anything that converts into dims.
    pub fn new<D: Into<Dim>>(dtype: DType, shape: impl IntoIterator<Item = D>) -> Self {
        TensorType {
            dtype,
            shape: shape.into_iter().map(Into::into).collect(),
        }
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements as a dim (product of all dims).
    pub fn numel(&self) -> Dim {
        numel(&self.shape)
    }
}

/// Product of the dims of a shape.
pub fn numel(shape: &[Dim]) -> Dim {
    shape.iter().fold(Dim::fixed(1), |acc, d| &acc * d)
}

/// Prints a shape as `[batch, seq, 64]`.
pub struct DisplayShape<'a>(pub &'a [Dim]);

impl fmt::Display for DisplayShape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Prints `f32[batch, seq, 64]`.
impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, DisplayShape(&self.shape))
    }
}

/// Broadcasts two shapes by numpy's rules: align on the right; two dims agree when equal or
/// when one of them is the fixed size 1. Symbolic dims broadcast only against an equal dim or 1.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let one = Dim::fixed(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len()).checked_sub(rank).map_or(&one, |j| &a[j]);
        let db = (i + b.len()).checked_sub(rank).map_or(&one, |j| &b[j]);
        let d = if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err(format!(
                "shapes {} and {} do not broadcast: axis {} is {} vs {}",
                DisplayShape(a),
                DisplayShape(b),
                i,
                da,
                db
            ));
        };
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(dims: &[&str]) -> Shape {
        dims.iter()
            .map(|d| match d.parse::<i64>() {
                Ok(n) => Dim::fixed(n),
                Err(_) => Dim::sym(d),
            })
            .collect()
    }

    #[test]
    fn numpy_broadcasting() {
        assert_eq!(
            broadcast_shapes(&s(&["3", "1"]), &s(&["4"])).unwrap(),
            s(&["3", "4"])
        );
        assert_eq!(
            broadcast_shapes(&s(&["1", "4", "1"]), &s(&["3", "1", "5"])).unwrap(),
            s(&["3", "4", "5"])
        );
        assert_eq!(
            broadcast_shapes(&[], &s(&["2", "3"])).unwrap(),
            s(&["2", "3"])
        );
        assert_eq!(
            broadcast_shapes(&s(&["batch", "1", "seq"]), &s(&["heads", "1"])).unwrap(),
            s(&["batch", "heads", "seq"])
        );
        let err = broadcast_shapes(&s(&["2", "3"]), &s(&["4"])).unwrap_err();
        assert!(err.contains("[2, 3]") && err.contains("[4]"), "{err}");
        assert!(broadcast_shapes(&s(&["seq"]), &s(&["past"])).is_err());
    }

    #[test]
    fn display() {
        let t = TensorType::new(DType::BF16, s(&["batch", "seq", "64"]));
        assert_eq!(t.to_string(), "bf16[batch, seq, 64]");
        assert_eq!(TensorType::new::<i64>(DType::F32, []).to_string(), "f32[]");
        assert_eq!(t.numel().to_string(), "64*batch*seq");
    }
}

//! [`KernelSpec`]: one graph node at concrete shapes, the unit the MLIR backend compiles and
//! caches, and the checks that decide whether it can be lowered at all.

use super::MlirError;
use kiln_ir::{infer, Bindings, DType, Op, TensorType};

/// A kernel to generate: the op and its operands' shapes (all f32, fixed sizes). The result's
/// shape follows from them by the IR's typing rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// The node's op.
    pub op: Op,
    /// The operands' shapes, in order.
    pub inputs: Vec<Vec<usize>>,
}

impl KernelSpec {
    /// A spec for `op` over f32 operands of these shapes.
    pub fn new(op: Op, inputs: &[&[usize]]) -> KernelSpec {
        KernelSpec {
            op,
            inputs: inputs.iter().map(|s| s.to_vec()).collect(),
        }
    }

    /// The spec of a graph node: its op and operand types, symbolic dims evaluated in `env`;
    /// operands other than f32 are [`MlirError::Unsupported`].
    pub fn from_types(
        op: &Op,
        operands: &[&TensorType],
        env: &Bindings,
    ) -> Result<KernelSpec, MlirError> {
        let inputs = operands
            .iter()
            .map(|t| {
                if t.dtype != DType::F32 {
                    return Err(MlirError::Unsupported(format!(
                        "{} on a {} operand; only f32 is lowered",
                        op.name(),
                        t.dtype
                    )));
                }
                t.shape
                    .iter()
                    .map(|d| {
                        d.eval(env)
                            .ok()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| MlirError::Unsupported(format!("dim {d} unbound")))
                    })
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        Ok(KernelSpec {
            op: op.clone(),
            inputs,
        })
    }

    /// The result's shape, or why the op does not type-check at these shapes or is not f32.
    pub fn output_shape(&self) -> Result<Vec<usize>, MlirError> {
        let tys: Vec<TensorType> = self
            .inputs
            .iter()
            .map(|s| TensorType::new(DType::F32, s.iter().copied()))
            .collect();
        let ty =
            infer(&self.op, &tys.iter().collect::<Vec<_>>()).map_err(MlirError::Unsupported)?;
        if ty.dtype != DType::F32 {
            return Err(MlirError::Unsupported(format!(
                "{} gives {}; only f32 results are lowered",
                self.op.name(),
                ty.dtype
            )));
        }
        ty.shape
            .iter()
            .map(|d| {
                d.as_fixed()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| MlirError::Unsupported(format!("symbolic result dim {d}")))
            })
            .collect()
    }
}

//! [`MlirProvider`]: MLIR-JIT kernels for the CPU backend (`kiln_runtime::cpu::external`), the
//! engine of `--codegen mlir`. At plan time it accepts the nodes whose op has a lowering here
//! and whose operands and result are f32; at run time it compiles one kernel per
//! [`KernelKey`](super::spec::KernelKey) (op and fixed sizes; sequence and cache lengths are
//! dynamic), cached, so a decode loop compiles each of its kernels once. Whatever it cannot
//! lower or compile is reported as a reason, and the CPU backend runs its native kernel
//! instead. Seeded with an artifact's MLIR ([`MlirProvider::carrying`]), it compiles from there
//! the kernels whose carried module it accepts ([`super::carry`]).

use super::cpu::{KernelCache, MlirKernel};
use super::spec::layout;
use kiln_ir::{infer, DType, Op, TensorType};
use kiln_runtime::artifact::MlirRecord;
use kiln_runtime::cpu::external::{ExternalKernel, KernelProvider, Operand};
use std::sync::Arc;

/// MLIR-compiled kernels for the CPU backend, compiled on first use per key.
pub struct MlirProvider {
    cache: KernelCache,
}

/// Kernels a provider keeps compiled: every distinct kernel of a few models' prefill and
/// decode graphs.
const CACHED_KERNELS: usize = 256;

impl Default for MlirProvider {
    fn default() -> Self {
        MlirProvider {
            cache: KernelCache::bounded(CACHED_KERNELS),
        }
    }
}

impl MlirProvider {
    /// A provider with an empty kernel cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A provider compiling from `carried`, an artifact's MLIR, the kernels it holds a usable
    /// module for (see [`super::carry`]).
    pub fn carrying(carried: MlirRecord) -> Self {
        MlirProvider {
            cache: KernelCache::carrying(CACHED_KERNELS, carried),
        }
    }

    /// How many of the kernels compiled so far came from the carried MLIR
    /// ([`MlirProvider::carrying`]); the others ([`MlirProvider::compilations`] less these)
    /// were lowered afresh.
    pub fn from_carried(&self) -> usize {
        self.cache.from_carried()
    }

    /// The number of distinct kernels held (compiled or refused).
    pub fn kernels(&self) -> usize {
        self.cache.len()
    }

    /// How many kernel compilations were started so far.
    pub fn compilations(&self) -> usize {
        self.cache.compilations()
    }
}

/// Whether `op` has a lowering in [`super::lower`] (reductions are not offered: the CPU
/// backend runs them as reference ops, outside the provider's reach).
fn lowered(op: &Op) -> bool {
    matches!(
        op,
        Op::FusedElementwise { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Softmax { .. }
            | Op::RmsNorm { .. }
            | Op::LayerNorm { .. }
            | Op::MatMul { .. }
            | Op::Attention {
                merge_heads: false,
                ..
            }
    )
}

/// Whether a node with `op` over operands of these declared types is lowered (an op of
/// [`lowered`], f32 operands and result); `Err` says why not. Shared by the CPU and CUDA
/// providers.
pub fn accepts(op: &Op, operands: &[&TensorType]) -> Result<(), String> {
    if !lowered(op) {
        return Err(format!("no MLIR lowering for {}", op.name()));
    }
    if let Some(t) = operands.iter().find(|t| t.dtype != DType::F32) {
        return Err(format!(
            "{} on a {} operand; only f32 is lowered",
            op.name(),
            t.dtype
        ));
    }
    match infer(op, operands) {
        Ok(t) if t.dtype == DType::F32 => Ok(()),
        Ok(t) => Err(format!(
            "{} gives {}; only f32 is lowered",
            op.name(),
            t.dtype
        )),
        Err(e) => Err(e),
    }
}

impl KernelProvider for MlirProvider {
    fn name(&self) -> &str {
        "mlir"
    }

    fn accepts(&self, op: &Op, operands: &[&TensorType]) -> Result<(), String> {
        accepts(op, operands)
    }

    fn kernel(&self, op: &Op, shapes: &[&[usize]]) -> Result<Arc<dyn ExternalKernel>, String> {
        let key = layout(op, shapes).map_err(|e| e.to_string())?.key(op);
        match self.cache.get_key(&key) {
            Ok(k) => Ok(k),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl ExternalKernel for MlirKernel {
    fn run(
        &self,
        inputs: &[Operand<'_>],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> Result<(), String> {
        self.run_views(inputs, out, out_shape)
            .map_err(|e| e.to_string())
    }
}

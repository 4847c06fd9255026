//! MLIR code generation through melior (feature `mlir`): kiln kernels lowered to MLIR's
//! `linalg`/`arith`/`math`/`memref` dialects, JIT-compiled for the host CPU, or lowered through
//! `gpu` + `nvvm` to PTX.
//!
//! A graph node at concrete shapes is a [`KernelSpec`]; what is compiled is its [`KernelKey`]
//! (the op and the sizes the lowering fixes; lengths are dynamic), so one kernel serves every
//! sequence and cache length. The pieces:
//! - [`spec`]: specs, keys and the layout mapping one onto the other;
//! - [`build`]: melior builder helpers (types, affine maps, `linalg.generic`, constants);
//! - [`scalar`]: a [`kiln_ir::Expr`] body (and the fixed scalar formulas) as `arith`/`math` ops;
//! - [`loops`]: `scf` loops (carried reductions, parallel rows) for the non-structured kernels;
//! - [`lower`]: one [`kiln_ir::Op`] as a verified `func.func @kernel` on memrefs (elementwise
//!   bodies and reductions there, [`norm`] for softmax/rmsnorm/layernorm, [`matmul`],
//!   [`attention`] as an `scf` loop nest with online softmax, over key tiles in vector
//!   registers on the CPU: [`flash`]);
//! - [`cpu`]: the pass pipeline down to LLVM, the JIT ([`MlirKernel`]) and its cache;
//! - [`gpu`]: the same kernels as PTX for NVIDIA GPUs ([`GpuKernel`]), with [`host`] reading
//!   the host side of the launches;
//! - [`provider`]: the CPU backend's kernel hook ([`MlirProvider`], `--codegen mlir`);
//! - [`carry`]: the kernels' MLIR an artifact carries (`kiln compile --emit-mlir`): listed for
//!   its graphs, and checked and compiled from it at load;
//! - [`cuda`]: the CUDA backend's kernel hook ([`MlirCudaProvider`], `--codegen mlir` on
//!   `--device cuda`).
//!
//! Anything this backend cannot lower is an [`MlirError::Unsupported`] carrying the reason, so a
//! caller can fall back to its native kernel.

pub mod attention;
pub mod build;
pub mod carry;
pub mod cpu;
pub mod cuda;
pub mod flash;
pub mod gpu;
pub mod host;
pub mod loops;
pub mod lower;
pub mod matmul;
pub mod norm;
pub mod provider;
pub mod scalar;
pub mod spec;

pub use cpu::{KernelCache, MlirKernel};
pub use cuda::MlirCudaProvider;
pub use gpu::{ptx, GpuKernel};
pub use lower::emit;
pub use provider::MlirProvider;
pub use spec::{KernelKey, KernelSpec};

/// Why a kernel could not be generated or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MlirError {
    /// The op, its dtypes or its shapes are outside what this backend lowers.
    #[error("not lowered to MLIR: {0}")]
    Unsupported(String),
    /// The operands given to [`MlirKernel::run`] do not match the kernel.
    #[error("bad kernel arguments: {0}")]
    Arguments(String),
    /// MLIR rejected what was built or a pass failed (a bug in this backend).
    #[error("MLIR failed: {0}")]
    Mlir(String),
}

impl From<melior::Error> for MlirError {
    fn from(e: melior::Error) -> Self {
        MlirError::Mlir(e.to_string())
    }
}

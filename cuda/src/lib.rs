//! kiln's CUDA backend.
//!
//! * [`toolkit`]: where the CUDA compile-time tools are (NVRTC, headers, `ptxas`), from
//!   `KILN_CUDA_HOME`, `~/.cache/kiln/cuda` (`scripts/fetch-cuda-tools`) or a CUDA toolkit.
//! * [`compile`]: NVRTC compilation for a target [`Arch`] (sm_80, sm_90), cached by content
//!   hash in memory and on disk under `~/.cache/kiln/cuda-kernels`.
//! * [`ptxas`]: `ptxas -v` resource reports (registers, shared memory, spills).
//! * [`device`]: the device layer on `cudarc` with dynamic loading: presence check first (so a
//!   machine without CUDA gets a [`CudaError`], never a panic), device selection, a stream, a
//!   caching allocator ([`alloc`]), uploads and downloads.
//! * [`codegen`]: CUDA C generated from fused elementwise bodies, and the hand-written kernels
//!   (norms, softmax, RoPE, gather, argmax, flash attention prefill and decode, GEMV).
//! * [`launch`]: host-side launchers of every kernel on a [`device::Device`].
//!
//! Nothing here runs a model yet. Tests: `tests/compile.rs` (NVRTC for sm_80/sm_90, ptxas
//! spills), `tests/host_codegen.rs` (generated elementwise code run on the CPU against the
//! reference executor) and `tests/gpu.rs` (every kernel against the reference executor on a
//! GPU, via `scripts/gpu-check`).

pub mod alloc;
pub mod bench;
pub mod blas;
pub mod codegen;
pub mod compile;
pub mod device;
pub mod exec;
pub mod launch;
pub mod ptxas;
pub mod toolkit;

pub use compile::Arch;
pub use device::Device;

/// Everything that can go wrong in the CUDA backend. Every message names CUDA, so that a user
/// who asked for `--device cuda` sees why it cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library (driver or NVRTC) is not installed or cannot be loaded.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// The driver loaded but reports no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// NVRTC rejected a kernel.
    #[error("CUDA kernel `{name}` failed to compile for {arch}: {log}")]
    Compile {
        /// The kernel module's name.
        name: String,
        /// The target architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// Code generation cannot express this op (dtype, arity, architecture).
    #[error("CUDA code generation: {0}")]
    Codegen(String),
    /// A kernel was called with operands that do not fit it.
    #[error("CUDA kernel arguments: {0}")]
    Args(String),
    /// A tool (ptxas) or cache file failed.
    #[error("CUDA tools: {0}")]
    Tool(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

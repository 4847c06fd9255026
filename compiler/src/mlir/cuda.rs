//! [`MlirCudaProvider`]: MLIR-generated PTX kernels for the CUDA backend
//! (`kiln_cuda::exec::external`), the engine of `--codegen mlir` on `--device cuda`. It accepts
//! the nodes the CPU provider accepts ([`super::provider::accepts`]); at run time it compiles
//! one [`GpuKernel`] per [`KernelKey`] and architecture (cached; sequence and cache lengths
//! are dynamic) and evaluates its host program for the operands' shapes into launches. What it
//! cannot lower (e.g. a kernel calling `math` functions when no CUDA toolkit with libdevice is
//! found) is a reason, and the CUDA backend runs its own kernel instead.

use super::gpu::GpuKernel;
use super::provider::accepts;
use super::spec::{layout, KernelKey};
use kiln_cuda::exec::external::{PtxLaunch, PtxProvider};
use kiln_cuda::Arch;
use kiln_ir::{Op, TensorType};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A compiled kernel, or why there is none.
type Compiled = Arc<Result<GpuKernel, String>>;

/// MLIR PTX kernels for the CUDA backend, compiled on first use per key and architecture.
pub struct MlirCudaProvider {
    kernels: Mutex<HashMap<(KernelKey, Arch), Compiled>>,
    libdevice: Option<PathBuf>,
    compilations: AtomicUsize,
}

impl Default for MlirCudaProvider {
    fn default() -> Self {
        Self::with_libdevice(kiln_cuda::toolkit::libdevice_root())
    }
}

impl MlirCudaProvider {
    /// A provider linking the libdevice that [`kiln_cuda::toolkit::libdevice_root`] finds.
    pub fn new() -> Self {
        Self::default()
    }

    /// A provider linking the libdevice under `root` (`root/nvvm/libdevice/libdevice.10.bc`);
    /// without one, kernels calling `math` functions are refused.
    pub fn with_libdevice(root: Option<PathBuf>) -> Self {
        MlirCudaProvider {
            kernels: Mutex::default(),
            libdevice: root,
            compilations: AtomicUsize::new(0),
        }
    }

    /// How many kernel compilations were started so far.
    pub fn compilations(&self) -> usize {
        self.compilations.load(Ordering::Relaxed)
    }

    /// The kernel for `key` on `arch`, compiled once.
    fn kernel(&self, key: KernelKey, arch: Arch) -> Compiled {
        let mut kernels = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        kernels
            .entry((key, arch))
            .or_insert_with_key(|(key, arch)| {
                self.compilations.fetch_add(1, Ordering::Relaxed);
                Arc::new(
                    GpuKernel::compile(key, arch.name(), self.libdevice.as_deref())
                        .map_err(|e| e.to_string()),
                )
            })
            .clone()
    }
}

impl PtxProvider for MlirCudaProvider {
    fn name(&self) -> &str {
        "mlir"
    }

    fn accepts(&self, op: &Op, operands: &[&TensorType]) -> Result<(), String> {
        accepts(op, operands)
    }

    fn launches(&self, op: &Op, shapes: &[&[usize]], arch: Arch) -> Result<Vec<PtxLaunch>, String> {
        let l = layout(op, shapes).map_err(|e| e.to_string())?;
        match &*self.kernel(l.key(op), arch) {
            Ok(k) => k.launches(&l.shapes).map_err(|e| e.to_string()),
            Err(why) => Err(why.clone()),
        }
    }
}

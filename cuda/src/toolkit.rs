//! Locates the CUDA compile-time tools: the NVRTC library, the CUDA headers and `ptxas`.
//!
//! The root is `KILN_CUDA_HOME` if set, else `~/.cache/kiln/cuda` where
//! `scripts/fetch-cuda-tools` unzips the pip wheels, else `CUDA_HOME` or `/usr/local/cuda`.
//! Both layouts are understood: the CUDA 12 wheels' (`nvidia/cuda_nvrtc/lib`,
//! `nvidia/cuda_runtime/include`, `nvidia/cuda_nvcc/bin`) and a toolkit's (`lib64`, `include`,
//! `bin`), which also covers the CUDA 13 wheels' `nvidia/cu13` (`lib`, `include`).
//!
//! Before cudarc first touches NVRTC, [`preload_nvrtc`] loads the library found here by its
//! full path, so that cudarc's own load by name (`libnvrtc.so.12`) finds it already in the
//! process without `LD_LIBRARY_PATH`.

use crate::CudaError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The located tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolkit {
    /// The root searched.
    pub root: PathBuf,
    /// The NVRTC shared library, if found.
    pub nvrtc: Option<PathBuf>,
    /// Include directories holding `cuda_bf16.h`, `cuda_fp16.h`, `cuda_fp8.h`.
    pub include: Vec<PathBuf>,
    /// `ptxas`, if found.
    pub ptxas: Option<PathBuf>,
}

fn first_existing(root: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(|c| root.join(c)).find(|p| p.exists())
}

impl Toolkit {
    /// The tools under `root`.
    pub fn at(root: &Path) -> Toolkit {
        let nvrtc = first_existing(
            root,
            &[
                "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
                "lib64/libnvrtc.so",
                "lib64/libnvrtc.so.13",
                "lib/libnvrtc.so",
                "lib/libnvrtc.so.13",
                "targets/x86_64-linux/lib/libnvrtc.so",
            ],
        );
        let include = [
            "nvidia/cuda_runtime/include",
            "include",
            "targets/x86_64-linux/include",
        ]
        .iter()
        .map(|c| root.join(c))
        .filter(|p| p.join("cuda_bf16.h").exists())
        .collect();
        let ptxas = first_existing(root, &["nvidia/cuda_nvcc/bin/ptxas", "bin/ptxas"]);
        Toolkit {
            root: root.to_path_buf(),
            nvrtc,
            include,
            ptxas,
        }
    }

    /// The roots searched, in order.
    pub fn roots() -> Vec<PathBuf> {
        let mut roots = vec![];
        if let Some(h) = std::env::var_os("KILN_CUDA_HOME") {
            roots.push(PathBuf::from(h));
            return roots;
        }
        if let Some(home) = std::env::var_os("HOME") {
            roots.push(Path::new(&home).join(".cache/kiln/cuda"));
        }
        if let Some(h) = std::env::var_os("CUDA_HOME") {
            roots.push(PathBuf::from(h));
        }
        roots.push(PathBuf::from("/usr/local/cuda"));
        roots
    }

    /// The first root with NVRTC and the headers, or why there is none.
    pub fn find() -> Result<Toolkit, CudaError> {
        let roots = Self::roots();
        roots
            .iter()
            .map(|r| Toolkit::at(r))
            .find(|t| t.nvrtc.is_some() && !t.include.is_empty())
            .ok_or_else(|| {
                let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                CudaError::Unavailable(format!(
                    "NVRTC and the CUDA headers were not found under {} (run scripts/fetch-cuda-tools, or set KILN_CUDA_HOME)",
                    list.join(", ")
                ))
            })
    }

    /// The process-wide toolkit, found once.
    pub fn get() -> Result<&'static Toolkit, CudaError> {
        static TK: OnceLock<Result<Toolkit, String>> = OnceLock::new();
        TK.get_or_init(|| Toolkit::find().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| CudaError::Unavailable(e.clone()))
    }
}

/// A directory holding `nvvm/libdevice/libdevice.10.bc` (the GPU `math` library MLIR's PTX
/// links), searched under [`Toolkit::roots`], each root's `nvidia/cuda_nvcc` (the wheel), then
/// `$CUDA_HOME` and `/usr/local/cuda`.
pub fn libdevice_root() -> Option<PathBuf> {
    let mut roots = Toolkit::roots();
    roots.extend(std::env::var_os("CUDA_HOME").map(PathBuf::from));
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
        .iter()
        .flat_map(|r| [r.clone(), r.join("nvidia/cuda_nvcc")])
        .find(|d| d.join("nvvm/libdevice/libdevice.10.bc").is_file())
}

/// Makes NVRTC loadable by cudarc: loads the toolkit's library by full path (kept for the
/// process's life), then asks cudarc whether it can load NVRTC by name; an error, not
/// cudarc's panic, when it cannot.
pub fn preload_nvrtc() -> Result<&'static Toolkit, CudaError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    let tk = Toolkit::get()?;
    LOADED
        .get_or_init(|| {
            if let Some(path) = &tk.nvrtc {
                // SAFETY: loading NVRTC runs only its initializers, which have no preconditions;
                // the handle is leaked so the library stays loaded for cudarc's later use.
                match unsafe { libloading::Library::new(path) } {
                    Ok(lib) => std::mem::forget(lib),
                    Err(e) => return Err(format!("cannot load {}: {e}", path.display())),
                }
            }
            // SAFETY: cudarc's probe only tries to dlopen the candidate names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "NVRTC found at {} but cudarc cannot load it by name (add its directory to LD_LIBRARY_PATH)",
                    tk.nvrtc.as_deref().unwrap_or(Path::new("?")).display()
                ))
            }
        })
        .clone()
        .map_err(CudaError::Unavailable)?;
    Ok(tk)
}

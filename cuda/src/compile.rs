//! NVRTC compilation of kernel sources to PTX for a target architecture, cached by content
//! hash: in memory for the process, and on disk under `~/.cache/kiln/cuda-kernels` (or
//! `$KILN_CUDA_CACHE`), keyed by the NVRTC version, the architecture, the options and the
//! source text.

use crate::toolkit::{preload_nvrtc, Toolkit};
use crate::CudaError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// A GPU architecture kiln compiles for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Ampere (A100): bf16 tensor cores, no fp8.
    Sm80,
    /// Hopper (H100/H200): fp8 e4m3 conversions and tensor cores.
    Sm90,
}

impl Arch {
    /// Every architecture kiln compiles for.
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// `sm_80`, `sm_90`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The virtual architecture NVRTC compiles PTX for.
    pub fn compute(self) -> &'static str {
        match self {
            Arch::Sm80 => "compute_80",
            Arch::Sm90 => "compute_90",
        }
    }

    /// The compute capability as `major * 10 + minor`.
    pub fn capability(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
        }
    }

    /// fp8 e4m3 arithmetic is kiln's on sm_89 and later.
    pub fn has_fp8(self) -> bool {
        self.capability() >= 89
    }

    /// The newest of kiln's architectures a device of compute capability `major.minor` runs
    /// (PTX is forward compatible), or `None` below sm_80.
    pub fn for_capability(major: i32, minor: i32) -> Option<Arch> {
        match major * 10 + minor {
            c if c >= 90 => Some(Arch::Sm90),
            c if c >= 80 => Some(Arch::Sm80),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One compilation unit: a module name (used in messages and cache file names) and its
/// complete CUDA C source, with `extern "C"` kernels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSource {
    /// The module's name, e.g. `attention_prefill_bf16_d128`.
    pub name: String,
    /// The source text.
    pub source: String,
    /// The `extern "C"` kernel entry points it defines.
    pub entries: Vec<String>,
}

/// A module compiled to PTX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The module's name.
    pub name: String,
    /// The target.
    pub arch: Arch,
    /// The PTX text.
    pub ptx: String,
    /// The content hash it is cached under.
    pub key: u128,
}

/// 128-bit FNV-1a: stable across Rust versions, as an on-disk cache key must be.
pub fn content_hash(parts: &[&[u8]]) -> u128 {
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked by the caller); the two out-pointers are valid locals.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    format!("{major}.{minor} {r:?}")
}

fn disk_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln/cuda-kernels"))
}

/// The NVRTC options kiln compiles with (IEEE division and square root, no fast math: the
/// kernels must agree with the reference executor).
fn options(tk: &Toolkit, arch: Arch) -> CompileOptions {
    CompileOptions {
        arch: Some(arch.compute()),
        include_paths: tk.include.iter().map(|p| p.display().to_string()).collect(),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    }
}

/// The cache key of `src` for `arch` and the options it compiles with.
fn key_and_options(src: &KernelSource, arch: Arch) -> Result<(u128, CompileOptions), CudaError> {
    let tk = preload_nvrtc()?;
    let opts = options(tk, arch);
    let key = content_hash(&[
        nvrtc_version().as_bytes(),
        arch.name().as_bytes(),
        format!("{:?}", opts.options).as_bytes(),
        src.source.as_bytes(),
    ]);
    Ok((key, opts))
}

fn nvrtc(src: &KernelSource, arch: Arch, opts: CompileOptions) -> Result<String, CudaError> {
    Ok(compile_ptx_with_opts(&src.source, opts)
        .map_err(|e| CudaError::Compile {
            name: src.name.clone(),
            arch: arch.name().into(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => other.to_string(),
            },
        })?
        .to_src())
}

/// Compiles `src` for `arch` with NVRTC, bypassing both caches.
pub fn compile_fresh(src: &KernelSource, arch: Arch) -> Result<Compiled, CudaError> {
    let (key, opts) = key_and_options(src, arch)?;
    Ok(Compiled {
        name: src.name.clone(),
        arch,
        ptx: nvrtc(src, arch, opts)?,
        key,
    })
}

/// Compiles `src` for `arch`, or returns the PTX cached in memory or on disk.
pub fn compile(src: &KernelSource, arch: Arch) -> Result<Arc<Compiled>, CudaError> {
    static MEMORY: OnceLock<Mutex<HashMap<u128, Arc<Compiled>>>> = OnceLock::new();
    let (key, opts) = key_and_options(src, arch)?;
    let memory = MEMORY.get_or_init(Default::default);
    if let Some(c) = memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let file = disk_dir().map(|d| d.join(format!("{key:032x}.ptx")));
    let cached = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
    let ptx = match cached {
        Some(ptx) => ptx,
        None => {
            let ptx = nvrtc(src, arch, opts)?;
            if let Some(f) = &file {
                // A cache that cannot be written only costs a recompilation next time.
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                let written = f
                    .parent()
                    .map(std::fs::create_dir_all)
                    .transpose()
                    .and_then(|_| std::fs::write(&tmp, &ptx))
                    .and_then(|_| std::fs::rename(&tmp, f));
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            ptx
        }
    };
    let c = Arc::new(Compiled {
        name: src.name.clone(),
        arch,
        ptx,
        key,
    });
    memory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_parts_and_is_stable() {
        assert_ne!(content_hash(&[b"ab", b"c"]), content_hash(&[b"a", b"bc"]));
        assert_eq!(content_hash(&[b"x"]), content_hash(&[b"x"]));
        assert_ne!(content_hash(&[b"x"]), content_hash(&[b"y"]));
    }

    #[test]
    fn capabilities_map_to_archs() {
        assert_eq!(Arch::for_capability(9, 0), Some(Arch::Sm90));
        assert_eq!(Arch::for_capability(8, 9), Some(Arch::Sm80));
        assert_eq!(Arch::for_capability(8, 0), Some(Arch::Sm80));
        assert_eq!(Arch::for_capability(7, 5), None);
        assert!(Arch::Sm90.has_fp8() && !Arch::Sm80.has_fp8());
    }
}

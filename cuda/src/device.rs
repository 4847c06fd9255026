//! The device layer: finds a CUDA device (checking that the driver library is present before
//! cudarc would panic on its absence), holds its context, one stream, the caching allocator
//! and the loaded kernel modules; uploads and downloads bytes.

use crate::alloc::{Allocator, Buffer};
use crate::compile::{compile, Arch, KernelSource};
use crate::CudaError;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One CUDA device ready to run kiln's kernels.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    name: String,
    alloc: Allocator,
    modules: Mutex<HashMap<u128, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

/// Whether the CUDA driver library can be loaded at all (no device query).
pub fn driver_present() -> bool {
    // SAFETY: cudarc's probe only tries to dlopen the candidate library names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::Unavailable(
            "the NVIDIA driver library (libcuda.so) was not found on this machine".into(),
        ));
    }
    let n = CudaContext::device_count().map_err(|e| CudaError::NoDevice(e.to_string()))?;
    match usize::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(CudaError::NoDevice("the driver reports 0 devices".into())),
    }
}

impl Device {
    /// Opens device `ordinal`.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        let arch = Arch::for_capability(major, minor).ok_or_else(|| {
            CudaError::NoDevice(format!(
                "{name} has compute capability {major}.{minor}; kiln needs 8.0 or later"
            ))
        })?;
        let stream = ctx.new_stream()?;
        Ok(Device {
            alloc: Allocator::new(stream.clone()),
            ctx,
            stream,
            arch,
            name,
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The caching allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compiles (or finds cached) `src` and returns its entry point `entry`.
    pub fn function(&self, src: &KernelSource, entry: &str) -> Result<CudaFunction, CudaError> {
        let compiled = compile(src, self.arch)?;
        let module = {
            let mut m = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&compiled.key) {
                Some(module) => module.clone(),
                None => {
                    let module = self.ctx.load_module(Ptx::from_src(compiled.ptx.clone()))?;
                    m.insert(compiled.key, module.clone());
                    module
                }
            }
        };
        Ok(module.load_function(entry)?)
    }

    /// The entry point `entry` of a module given as PTX (e.g. MLIR's), loaded once per
    /// distinct text; the driver JIT-compiles the PTX for the device.
    pub fn ptx_function(&self, ptx: &str, entry: &str) -> Result<CudaFunction, CudaError> {
        let key = crate::compile::content_hash(&[b"ptx", ptx.as_bytes()]);
        let module = {
            let mut m = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&key) {
                Some(module) => module.clone(),
                None => {
                    let module = self.ctx.load_module(Ptx::from_src(ptx))?;
                    m.insert(key, module.clone());
                    module
                }
            }
        };
        Ok(module.load_function(entry)?)
    }

    /// The function cached under `key`, or the entry point `entry` of the module `source()`
    /// makes (so that repeated launches skip building and hashing the source).
    pub fn function_cached(
        &self,
        key: &str,
        source: impl FnOnce() -> Result<KernelSource, CudaError>,
        entry: &str,
    ) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return Ok(f.clone());
        }
        let f = self.function(&source()?, entry)?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), f.clone());
        Ok(f)
    }

    /// A buffer holding `bytes`.
    pub fn upload(&self, bytes: &[u8]) -> Result<Buffer, CudaError> {
        let mut b = self.alloc.alloc(bytes.len())?;
        if !bytes.is_empty() {
            let mut view = b.slice_mut().slice_mut(..bytes.len());
            self.stream.memcpy_htod(bytes, &mut view)?;
        }
        Ok(b)
    }

    /// A buffer of `len` bytes, each set to `byte` (to poison outputs before a kernel).
    pub fn filled(&self, len: usize, byte: u8) -> Result<Buffer, CudaError> {
        self.upload(&vec![byte; len])
    }

    /// The first `buffer.len()` bytes of `buffer` (waits for the stream).
    pub fn download(&self, buffer: &Buffer) -> Result<Vec<u8>, CudaError> {
        let mut out = vec![0u8; buffer.len()];
        if !out.is_empty() {
            let view = buffer.slice().slice(..buffer.len());
            self.stream.memcpy_dtoh(&view, &mut out)?;
        }
        self.stream.synchronize()?;
        Ok(out)
    }

    /// The median time of `reps` runs of `f` after `warmup` runs, in milliseconds, each run
    /// timed with device events on the stream.
    pub fn time_ms(
        &self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<f64, CudaError> {
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = vec![];
        for _ in 0..reps.max(1) {
            let (start, end) = (self.ctx.new_event(flags)?, self.ctx.new_event(flags)?);
            start.record(&self.stream)?;
            f()?;
            end.record(&self.stream)?;
            times.push(f64::from(start.elapsed_ms(&end)?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Device-to-device copy of `src` into `dst` (the copy-bandwidth ceiling).
    pub fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<(), CudaError> {
        let n = src.len().min(dst.len());
        let from = src.slice().slice(..n);
        let mut to = dst.slice_mut().slice_mut(..n);
        Ok(self.stream.memcpy_dtod(&from, &mut to)?)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

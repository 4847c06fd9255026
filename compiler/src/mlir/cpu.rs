//! The CPU path: the pass pipeline from `linalg` on memrefs down to the LLVM dialect, the JIT
//! (MLIR's `ExecutionEngine` at `-O3` for the host CPU, so LLVM's vectorizers target the host's
//! vector width), the safe [`MlirKernel`] API and the [`KernelCache`] keyed by (op, shapes).
//!
//! Kernels whose arguments allow it (see [`ArgLayout::split`]) run on blocks of rows in
//! parallel on rayon's global pool, as the native kernels do.

use super::build::context;
use super::lower::{lower, ArgLayout, ENTRY};
use super::spec::KernelSpec;
use super::MlirError;
use melior::pass::PassManager;
use melior::utility::parse_pass_pipeline;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The lowering pipeline: structured ops to loops, then every dialect to LLVM.
pub const PIPELINE: &str = "builtin.module(func.func(convert-linalg-to-loops), \
    convert-scf-to-cf, convert-math-to-llvm, convert-math-to-libm, expand-strided-metadata, \
    lower-affine, finalize-memref-to-llvm, convert-arith-to-llvm, convert-index-to-llvm, \
    convert-cf-to-llvm, convert-func-to-llvm, reconcile-unrealized-casts)";

/// LLVM's optimization level for the JIT.
const OPT_LEVEL: i32 = 3;

/// Elements of the output a parallel block of rows should hold: 256 KiB of f32, so that the
/// several passes of a row-wise kernel over its block stay in the L2 cache.
const BLOCK: usize = 1 << 16;

type Packed = unsafe extern "C" fn(*mut *mut c_void);

/// An MLIR execution engine (owned).
struct Jit(mlir_sys::MlirExecutionEngine);

// SAFETY: the engine's compiled code and symbol table are immutable once it is created and
// initialized; LLVM's ORC JIT lookups are thread-safe, and the kernels themselves share no
// state (each call gets its own buffers).
unsafe impl Send for Jit {}
// SAFETY: as for `Send`: nothing reachable through `&Jit` is mutated.
unsafe impl Sync for Jit {}

impl Drop for Jit {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a non-null engine created by `mlirExecutionEngineCreate` and
        // destroyed only here.
        unsafe { mlir_sys::mlirExecutionEngineDestroy(self.0) }
    }
}

/// A kernel compiled to host code, callable on operands of its spec's shapes.
pub struct MlirKernel {
    spec: KernelSpec,
    out: Vec<usize>,
    args: Vec<ArgLayout>,
    first_row: bool,
    func: Packed,
    _jit: Jit,
}

impl std::fmt::Debug for MlirKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlirKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

fn string_ref(s: &str) -> mlir_sys::MlirStringRef {
    mlir_sys::MlirStringRef {
        data: s.as_ptr().cast(),
        length: s.len(),
    }
}

impl MlirKernel {
    /// Lowers, verifies and JIT-compiles a kernel; any op, dtype or shape this backend does not
    /// handle is [`MlirError::Unsupported`] with the reason.
    pub fn compile(spec: &KernelSpec) -> Result<MlirKernel, MlirError> {
        let out = spec.output_shape()?;
        let ctx = context();
        let mut lowered = lower(&ctx, spec)?;
        let pm = PassManager::new(&ctx);
        parse_pass_pipeline(pm.as_operation_pass_manager(), PIPELINE)?;
        pm.run(&mut lowered.module)
            .map_err(|e| MlirError::Mlir(format!("lowering pipeline: {e}")))?;
        // SAFETY: the module is a live, fully lowered (LLVM dialect) module of `ctx`; the engine
        // copies what it needs and does not keep the module. No shared libraries are passed.
        let raw = unsafe {
            mlir_sys::mlirExecutionEngineCreate(
                lowered.module.to_raw(),
                OPT_LEVEL,
                0,
                std::ptr::null(),
                false,
                false,
            )
        };
        if raw.ptr.is_null() {
            return Err(MlirError::Mlir(
                "the execution engine was not created".into(),
            ));
        }
        let jit = Jit(raw);
        // SAFETY: `jit.0` is a live engine; initialization runs its global constructors once,
        // and the packed lookup returns either null or `_mlir_kernel`, whose signature is
        // `void(void**)` by MLIR's packed calling convention.
        let func = unsafe {
            mlir_sys::mlirExecutionEngineInitialize(jit.0);
            let p = mlir_sys::mlirExecutionEngineLookupPacked(jit.0, string_ref(ENTRY));
            if p.is_null() {
                return Err(MlirError::Mlir(format!("no packed entry for @{ENTRY}")));
            }
            std::mem::transmute::<*mut c_void, Packed>(p)
        };
        Ok(MlirKernel {
            spec: spec.clone(),
            out,
            args: lowered.args,
            first_row: lowered.first_row,
            func,
            _jit: jit,
        })
    }

    /// What this kernel computes.
    pub fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// Runs the kernel: `inputs` as (contiguous data, shape) in operand order, exactly the
    /// spec's shapes; `out` receives the result of shape `out_shape`.
    pub fn run(
        &self,
        inputs: &[(&[f32], &[usize])],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> Result<(), MlirError> {
        let bad = |m: String| Err(MlirError::Arguments(m));
        if inputs.len() != self.spec.inputs.len() {
            return bad(format!(
                "{} operands for a kernel of {}",
                inputs.len(),
                self.spec.inputs.len()
            ));
        }
        for (i, ((data, shape), want)) in inputs.iter().zip(&self.spec.inputs).enumerate() {
            if *shape != want.as_slice() || data.len() != want.iter().product::<usize>() {
                return bad(format!(
                    "operand {i}: shape {shape:?} with {} elements, the kernel wants {want:?}",
                    data.len()
                ));
            }
        }
        if out_shape != self.out.as_slice() || out.len() != self.out.iter().product::<usize>() {
            return bad(format!(
                "output of shape {out_shape:?} with {} elements, the kernel writes {:?}",
                out.len(),
                self.out
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        let ptrs: Vec<*const f32> = inputs.iter().map(|(d, _)| d.as_ptr()).collect();
        let last = &self.args[self.args.len() - 1];
        if !last.split {
            self.call(&ptrs, out, 0, 0);
            return Ok(());
        }
        let rows = last.shape[0];
        let row = out.len() / rows;
        // Small kernels run in one call; larger ones in blocks of about BLOCK elements, at
        // least one block per thread.
        let per = if out.len() <= BLOCK {
            rows
        } else {
            BLOCK.div_ceil(row).min(rows.div_ceil(threads())).max(1)
        };
        // Raw pointers are not `Send`; the blocks carry addresses.
        let addrs: Vec<usize> = ptrs.iter().map(|p| *p as usize).collect();
        out.par_chunks_mut(per * row)
            .enumerate()
            .for_each(|(i, block)| {
                let ptrs: Vec<*const f32> = addrs.iter().map(|&a| a as *const f32).collect();
                let n = block.len() / row;
                self.call(&ptrs, block, i * per, n);
            });
        Ok(())
    }

    /// One call of the packed entry on rows `first..first + n` of the split arguments (`out`
    /// holds exactly those rows of the output), or on everything when nothing is split.
    fn call(&self, inputs: &[*const f32], out: &mut [f32], first: usize, n: usize) {
        // One descriptor per memref argument: allocated and aligned pointers, offset, sizes,
        // strides, as `convert-func-to-llvm` expands a memref argument.
        let mut slots: Vec<Vec<i64>> = Vec::with_capacity(self.args.len());
        for (i, a) in self.args.iter().enumerate() {
            let mut shape = a.shape.clone();
            let mut ptr = if i < inputs.len() {
                inputs[i] as i64
            } else {
                out.as_mut_ptr() as i64
            };
            if a.split && i < inputs.len() {
                let row: usize = shape[1..].iter().product();
                ptr += (first * row * std::mem::size_of::<f32>()) as i64;
            }
            if a.split {
                shape[0] = n;
            }
            let mut d = vec![ptr, ptr, 0];
            d.extend(shape.iter().map(|&s| s as i64));
            let mut stride = 1i64;
            let mut strides = vec![0i64; shape.len()];
            for (k, &s) in shape.iter().enumerate().rev() {
                strides[k] = stride;
                stride *= s as i64;
            }
            d.extend(strides);
            slots.push(d);
        }
        if self.first_row {
            slots.push(vec![first as i64]);
        }
        let mut args: Vec<*mut c_void> = slots
            .iter_mut()
            .flat_map(|d| d.iter_mut().map(|v| (v as *mut i64).cast::<c_void>()))
            .collect();
        // SAFETY: `func` is the packed entry of this kernel's `@kernel`, whose arguments are
        // exactly the memref descriptors built above (one field per slot, in order), then the
        // first row as an `index` (i64) when the kernel takes it. Every
        // descriptor points into a live buffer holding the whole described shape: `run`
        // checked the operands' and the output's lengths against the spec, and a split
        // argument is offset by whole rows within its buffer. The kernel only reads the input
        // buffers (the lowerings never write their operands) and writes only `out`, which this
        // call borrows mutably.
        unsafe { (self.func)(args.as_mut_ptr()) }
    }
}

/// The number of threads kernels are split over (rayon's global pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Compiled kernels by spec (op and shapes); failures are remembered too, so an unsupported
/// node is diagnosed once.
pub struct KernelCache {
    kernels: Mutex<HashMap<KernelSpec, Result<Arc<MlirKernel>, MlirError>>>,
    limit: usize,
}

impl Default for KernelCache {
    fn default() -> Self {
        Self::bounded(usize::MAX)
    }
}

impl KernelCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache holding at most `limit` specs: a new spec beyond that empties it first
    /// (kernels still in use live on through their `Arc`s). Keeps a decode loop, whose
    /// cache-length-dependent kernels are new at every step, from holding one compiled kernel
    /// per step.
    pub fn bounded(limit: usize) -> Self {
        KernelCache {
            kernels: Mutex::default(),
            limit: limit.max(1),
        }
    }

    /// The kernel for `spec`, compiled on first use.
    pub fn get(&self, spec: &KernelSpec) -> Result<Arc<MlirKernel>, MlirError> {
        let mut map = self
            .kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= self.limit && !map.contains_key(spec) {
            map.clear();
        }
        map.entry(spec.clone())
            .or_insert_with(|| MlirKernel::compile(spec).map(Arc::new))
            .clone()
    }

    /// The number of specs seen.
    pub fn len(&self) -> usize {
        self.kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// No spec seen yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

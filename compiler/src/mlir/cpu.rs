//! The CPU path: the pass pipeline from `linalg` on memrefs down to the LLVM dialect, the JIT
//! (MLIR's `ExecutionEngine` at `-O3` for the host CPU, so LLVM's vectorizers target the host's
//! vector width), the safe [`MlirKernel`] API and the [`KernelCache`] keyed by [`KernelKey`]
//! (op and fixed sizes), so that one compiled kernel runs at every shape with its key. A cache
//! may be given an artifact's MLIR ([`KernelCache::carrying`], see [`super::carry`]).
//!
//! Kernels whose arguments allow it (see [`super::spec::ArgType::split`]) run on blocks of rows in
//! parallel on rayon's global pool, as the native kernels do.

use super::build::context;
use super::carry::{self, Source};
use super::lower::{lower, Lowered, Target, ENTRY};
use super::spec::{layout, KernelKey, KernelSpec};
use super::MlirError;
use kiln_runtime::artifact::MlirRecord;
use kiln_runtime::cpu::external::Operand;
use melior::pass::PassManager;
use melior::utility::parse_pass_pipeline;
use melior::Context;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The lowering pipeline: structured ops to loops, then every dialect to LLVM.
pub const PIPELINE: &str = "builtin.module(func.func(convert-linalg-to-loops), \
    convert-scf-to-cf, convert-math-to-llvm, convert-math-to-libm, expand-strided-metadata, \
    lower-affine, convert-vector-to-llvm, finalize-memref-to-llvm, convert-arith-to-llvm, convert-index-to-llvm, \
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

/// A kernel compiled to host code, callable on operands of any shapes with its key.
pub struct MlirKernel {
    key: KernelKey,
    first_row: bool,
    func: Packed,
    _jit: Jit,
}

impl std::fmt::Debug for MlirKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlirKernel")
            .field("key", &self.key)
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
    /// Lowers, verifies and JIT-compiles the kernel `spec` runs on (which also runs every
    /// other spec with the same key); any op, dtype or shape this backend does not handle is
    /// [`MlirError::Unsupported`] with the reason.
    pub fn compile(spec: &KernelSpec) -> Result<MlirKernel, MlirError> {
        Self::compile_key(&spec.key()?)
    }

    /// Lowers, verifies and JIT-compiles the kernel of `key`.
    pub fn compile_key(key: &KernelKey) -> Result<MlirKernel, MlirError> {
        let ctx = context();
        let lowered = lower(&ctx, key, Target::Cpu)?;
        Self::jit(&ctx, lowered, key)
    }

    /// Runs the pipeline over `lowered`, the verified module of `key` in `ctx`, and JIT-compiles
    /// the result.
    pub(crate) fn jit(
        ctx: &Context,
        mut lowered: Lowered<'_>,
        key: &KernelKey,
    ) -> Result<MlirKernel, MlirError> {
        let pm = PassManager::new(ctx);
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
            key: key.clone(),
            first_row: lowered.first_row,
            func,
            _jit: jit,
        })
    }

    /// What this kernel computes.
    pub fn key(&self) -> &KernelKey {
        &self.key
    }

    /// Runs the kernel: `inputs` as (contiguous data, shape) in operand order, of shapes whose
    /// key is this kernel's; `out` receives the result of shape `out_shape`.
    pub fn run(
        &self,
        inputs: &[(&[f32], &[usize])],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> Result<(), MlirError> {
        let strides: Vec<Vec<usize>> = inputs.iter().map(|(_, s)| dense_strides(s)).collect();
        let views: Vec<Operand<'_>> = inputs
            .iter()
            .zip(&strides)
            .map(|((data, shape), strides)| Operand {
                data,
                shape,
                strides,
            })
            .collect();
        self.run_views(&views, out, out_shape)
    }

    /// [`MlirKernel::run`] on operands that may be views: the arguments the kernel reads
    /// through strides take a view as it is when its layout shape is a view of it with the
    /// last axis contiguous; any other view is copied dense first.
    pub fn run_views(
        &self,
        inputs: &[Operand<'_>],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> Result<(), MlirError> {
        let bad = |m: String| Err(MlirError::Arguments(m));
        if inputs.len() + 1 != self.key.args.len() {
            return bad(format!(
                "{} operands for a kernel of {}",
                inputs.len(),
                self.key.args.len() - 1
            ));
        }
        for (i, o) in inputs.iter().enumerate() {
            let reach = (o.strides.len() == o.shape.len())
                .then(|| extent(o.shape, o.strides))
                .flatten();
            if reach.is_none_or(|r| r > o.data.len()) {
                return bad(format!(
                    "operand {i}: shape {:?} with strides {:?} over {} elements",
                    o.shape,
                    o.strides,
                    o.data.len()
                ));
            }
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|o| o.shape).collect();
        let l = layout(&self.key.op, &shapes).map_err(|e| MlirError::Arguments(e.to_string()))?;
        if l.args != self.key.args || l.params != self.key.params {
            return bad(format!(
                "operands of shapes {shapes:?} do not fit the kernel {:?}",
                self.key.args
            ));
        }
        let want = l.shapes[l.shapes.len() - 1].iter().product::<usize>();
        if out.len() != want || out_shape.iter().product::<usize>() != want {
            return bad(format!(
                "output of shape {out_shape:?} with {} elements, the kernel writes {:?}",
                out.len(),
                l.shapes[l.shapes.len() - 1]
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        // Per input: its data (or a dense copy) and the strides of its layout shape.
        let mut copies: Vec<Vec<f32>> = Vec::new();
        let mut which: Vec<(Option<usize>, Vec<usize>)> = Vec::with_capacity(inputs.len());
        for ((o, a), shape) in inputs.iter().zip(&self.key.args).zip(&l.shapes) {
            let dense = dense_strides(shape);
            let view = if a.strided {
                view_strides(o.shape, o.strides, shape)
                    .map(|mut st| {
                        // A last axis of size 1 is never stepped: any stride reads it.
                        if let (Some(s), Some(1)) = (st.last_mut(), shape.last()) {
                            *s = 1;
                        }
                        st
                    })
                    .filter(|st| st.last().is_none_or(|&s| s == 1))
            } else {
                (view_strides(o.shape, o.strides, shape).as_ref() == Some(&dense))
                    .then_some(dense.clone())
            };
            match view {
                Some(st) => which.push((None, st)),
                None => {
                    copies.push(dense_copy(o));
                    which.push((Some(copies.len() - 1), dense));
                }
            }
        }
        let ptrs: Vec<*const f32> = inputs
            .iter()
            .zip(&which)
            .map(|(o, (c, _))| c.map_or(o.data.as_ptr(), |c| copies[c].as_ptr()))
            .collect();
        let strides: Vec<Vec<usize>> = which.into_iter().map(|(_, st)| st).collect();
        let shapes = &l.shapes;
        let last = &shapes[shapes.len() - 1];
        if !self.key.args[shapes.len() - 1].split {
            self.call(&ptrs, (shapes, &strides), out, 0, 0);
            return Ok(());
        }
        let rows = last[0];
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
                self.call(&ptrs, (shapes, &strides), block, i * per, n);
            });
        Ok(())
    }

    /// One call of the packed entry on rows `first..first + n` of the split arguments (`out`
    /// holds exactly those rows of the output), or on everything when nothing is split. Input
    /// `i` has layout shape `shapes[i]` and element strides `strides[i]` (dense when split).
    fn call(
        &self,
        inputs: &[*const f32],
        (shapes, strides): (&[Vec<usize>], &[Vec<usize>]),
        out: &mut [f32],
        first: usize,
        n: usize,
    ) {
        // One descriptor per memref argument: allocated and aligned pointers, offset, sizes,
        // strides, as `convert-func-to-llvm` expands a memref argument.
        let mut slots: Vec<Vec<i64>> = Vec::with_capacity(shapes.len());
        for (i, (a, shape)) in self.key.args.iter().zip(shapes).enumerate() {
            let mut shape = shape.clone();
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
            let st = match strides.get(i) {
                Some(st) if !a.split => st.clone(),
                _ => dense_strides(&shape),
            };
            let mut d = vec![ptr, ptr, 0];
            d.extend(shape.iter().map(|&s| s as i64));
            d.extend(st.iter().map(|&s| s as i64));
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
        // first row as an `index` (i64) when the kernel takes it. The sizes are the layout of
        // the operands' shapes, whose fixed sizes `run_views` checked equal to the kernel's (so
        // every size the code assumes is the one described), and every descriptor reaches only
        // elements of a live buffer: `run_views` checked that each operand's strides stay
        // within its data and that the output holds the whole result; a layout shape's strides
        // address exactly its operand's elements (a view of them, or a dense copy held until
        // the call returns); an argument the kernel reads with a unit last stride gets one;
        // and a split argument, always dense, is offset by whole rows within its buffer. The
        // kernel only reads the input buffers (the lowerings never write their operands; a
        // module carried by an artifact is compiled only when it is exactly this lowering, see
        // `carry::compile`) and writes only `out`, which this call borrows mutably.
        unsafe { (self.func)(args.as_mut_ptr()) }
    }
}

/// Row-major strides of `shape`.
fn dense_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut stride = 1;
    for (k, &s) in shape.iter().enumerate().rev() {
        strides[k] = stride;
        stride *= s;
    }
    strides
}

/// One past the furthest element a view reaches (0 when it is empty), or `None` on overflow.
fn extent(shape: &[usize], strides: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().zip(strides).try_fold(1usize, |acc, (&n, &s)| {
        (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d))
    })
}

/// The strides that view elements of `shape` at `strides` as `new` (same count, row-major
/// order), or `None` when `new` is not such a view (PyTorch's `view` rule: only axes that are
/// contiguous with each other merge or split).
fn view_strides(shape: &[usize], strides: &[usize], new: &[usize]) -> Option<Vec<usize>> {
    if shape.contains(&0) || shape.is_empty() {
        return Some(dense_strides(new));
    }
    let mut out = vec![0; new.len()];
    let mut view_d = new.len();
    let mut base = strides[shape.len() - 1];
    let (mut numel, mut view_numel) = (1usize, 1usize);
    for d in (0..shape.len()).rev() {
        numel *= shape[d];
        let chunk_ends = d == 0 || (shape[d - 1] != 1 && strides[d - 1] != numel * base);
        if chunk_ends {
            while view_d > 0 && (view_numel < numel || new[view_d - 1] == 1) {
                out[view_d - 1] = view_numel * base;
                view_numel *= new[view_d - 1];
                view_d -= 1;
            }
            if view_numel != numel {
                return None;
            }
            if d > 0 {
                base = strides[d - 1];
                numel = 1;
                view_numel = 1;
            }
        }
    }
    (view_d == 0).then_some(out)
}

/// A view's elements in row-major order (its reach was checked against its data).
fn dense_copy(o: &Operand<'_>) -> Vec<f32> {
    let n: usize = o.shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; o.shape.len()];
    for _ in 0..n {
        let at: usize = idx.iter().zip(o.strides).map(|(i, s)| i * s).sum();
        out.push(o.data[at]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < o.shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// The number of threads kernels are split over (rayon's global pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Compiled kernels by key; failures are remembered too, so an unsupported node is diagnosed
/// once.
pub struct KernelCache {
    kernels: Mutex<HashMap<KernelKey, Result<Arc<MlirKernel>, MlirError>>>,
    limit: usize,
    compiled: AtomicUsize,
    /// An artifact's MLIR, offered to each compilation ([`carry::compile`]).
    carried: Option<MlirRecord>,
    from_carried: AtomicUsize,
    log: bool,
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

    /// An empty cache holding at most `limit` keys: a new key beyond that empties it first
    /// (kernels still in use live on through their `Arc`s), so that a process running many
    /// models does not keep every kernel it ever compiled.
    pub fn bounded(limit: usize) -> Self {
        KernelCache {
            kernels: Mutex::default(),
            limit: limit.max(1),
            compiled: AtomicUsize::new(0),
            carried: None,
            from_carried: AtomicUsize::new(0),
            log: false,
        }
    }

    /// [`KernelCache::bounded`], compiling from `carried` (an artifact's MLIR) the kernels it
    /// holds a usable module for ([`carry::compile`]); with `KILN_CODEGEN_LOG` set, says on
    /// stderr for each kernel whether it came from there or was lowered afresh, and why.
    pub fn carrying(limit: usize, carried: MlirRecord) -> Self {
        KernelCache {
            carried: Some(carried),
            log: std::env::var_os("KILN_CODEGEN_LOG").is_some(),
            ..Self::bounded(limit)
        }
    }

    /// The kernel for `spec` (the one of its key), compiled on first use.
    pub fn get(&self, spec: &KernelSpec) -> Result<Arc<MlirKernel>, MlirError> {
        self.get_key(&spec.key()?)
    }

    /// The kernel of `key`, compiled on first use.
    pub fn get_key(&self, key: &KernelKey) -> Result<Arc<MlirKernel>, MlirError> {
        let mut map = self
            .kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = map.get(key) {
            return k.clone();
        }
        if map.len() >= self.limit {
            map.clear();
        }
        self.compiled.fetch_add(1, Ordering::Relaxed);
        let k = match &self.carried {
            None => MlirKernel::compile_key(key),
            Some(record) => self.compile_offered(key, record),
        }
        .map(Arc::new);
        map.insert(key.clone(), k.clone());
        k
    }

    /// The kernel of `key`, from its module in `record` when that one is usable.
    fn compile_offered(
        &self,
        key: &KernelKey,
        record: &MlirRecord,
    ) -> Result<MlirKernel, MlirError> {
        let text = key.text();
        let (k, source) = carry::compile(key, record.module(&text))?;
        match source {
            Source::Carried => {
                self.from_carried.fetch_add(1, Ordering::Relaxed);
                if self.log {
                    eprintln!("kiln: mlir kernel `{text}`: compiled from the artifact's MLIR");
                }
            }
            Source::Afresh(why) if self.log => {
                eprintln!("kiln: mlir kernel `{text}`: lowered afresh: {why}");
            }
            Source::Afresh(_) => {}
        }
        Ok(k)
    }

    /// How many times a kernel was compiled (or its compilation attempted) so far.
    pub fn compilations(&self) -> usize {
        self.compiled.load(Ordering::Relaxed)
    }

    /// How many of the kernels compiled so far were compiled from the carried MLIR (see
    /// [`KernelCache::carrying`]); the others were lowered afresh.
    pub fn from_carried(&self) -> usize {
        self.from_carried.load(Ordering::Relaxed)
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

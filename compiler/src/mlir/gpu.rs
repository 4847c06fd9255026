//! The GPU path: the same kernel modules mapped to the GPU (`linalg` to parallel loops, loops
//! to `gpu.launch`, kernels outlined into a `gpu.module`) and lowered through `nvvm` to PTX
//! for an NVIDIA architecture (default `sm_90`). Only the device code is the product here: the
//! host side is read as a small program ([`super::host`]) that gives the CUDA backend each
//! launch's grid, block and arguments ([`GpuKernel::launches`]).
//!
//! Architectures `sm_70` to `sm_90a` are accepted; the PTX is ISA version 8.0 (`+ptx80`, the
//! first with `sm_90`), which `ptxas` from CUDA 12.0 on assembles.

use super::build::context;
use super::host::{HostProgram, KernelOperand};
use super::lower::{lower, Target};
use super::spec::{KernelKey, KernelSpec};
use super::MlirError;
use kiln_cuda::exec::external::{LaunchArg, PtxLaunch};
use melior::ir::attribute::{AttributeLike, StringAttribute};
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::BlockLike;
use melior::pass::PassManager;
use melior::utility::parse_pass_pipeline;
use std::path::Path;
use std::sync::Arc;

/// The GPU pipeline for `chip` (e.g. `sm_90`), ending in `gpu.binary` ops holding PTX. Parallel
/// loops are tiled by [`BLOCK`] (the inner tile becomes a block's threads, the outer loop the
/// grid), index computations are sunk into the launches before outlining (so kernels take only
/// memrefs), the host function is left as integer arithmetic ([`super::host`] reads it), and
/// only the outlined device modules are lowered (to NVVM). `toolkit` is a CUDA toolkit
/// directory whose `nvvm/libdevice/libdevice.10.bc` implements the `math` functions
/// (`__nv_expf`, ...).
pub fn pipeline(chip: &str, toolkit: Option<&str>) -> String {
    let toolkit = toolkit.map(|t| format!(" toolkit={t}")).unwrap_or_default();
    format!(
        "builtin.module(func.func(convert-linalg-to-parallel-loops, \
         scf-parallel-loop-tiling{{parallel-loop-tile-sizes={BLOCK}}}, canonicalize, \
         gpu-map-parallel-loops, convert-parallel-loops-to-gpu), \
         gpu-launch-sink-index-computations, gpu-kernel-outlining, \
         func.func(lower-affine, canonicalize, cse), \
         nvvm-attach-target{{chip={chip} features=+ptx80 O=3}}, \
         gpu.module(expand-strided-metadata, lower-affine, convert-scf-to-cf, convert-gpu-to-nvvm, \
         canonicalize, cse, reconcile-unrealized-casts), \
         gpu-module-to-binary{{format=isa{toolkit}}})"
    )
}

/// Threads per block along a parallel loop's first dimension.
pub const BLOCK: usize = 256;

/// A kernel compiled for the GPU: its PTX modules and the host program that launches them.
#[derive(Debug, Clone)]
pub struct GpuKernel {
    /// The PTX of each `gpu.binary`, by module name, in launch order of first use.
    modules: Vec<(String, Arc<str>)>,
    program: HostProgram,
}

impl GpuKernel {
    /// Compiles `key` for `chip` (e.g. `sm_90`; `sm_70` to `sm_90a`), with `toolkit` (see
    /// [`pipeline`]) for kernels that call transcendental functions; without one, such a
    /// kernel is an error naming the missing functions.
    pub fn compile(
        key: &KernelKey,
        chip: &str,
        toolkit: Option<&Path>,
    ) -> Result<GpuKernel, MlirError> {
        // LLVM aborts the process on an architecture its PTX version lacks: check first.
        let version = chip
            .strip_prefix("sm_")
            .map(|v| v.strip_suffix('a').map_or((v, false), |v| (v, true)))
            .and_then(|(v, a)| Some((v.parse::<u32>().ok()?, a)));
        if !version.is_some_and(|(v, a)| (70..=90).contains(&v) && (!a || v == 90)) {
            return Err(MlirError::Unsupported(format!(
                "GPU architecture {chip:?} (sm_70 to sm_90a are lowered)"
            )));
        }
        let toolkit = match toolkit {
            Some(t) => match t.to_str() {
                Some(s) if !s.is_empty() && !s.contains([' ', '{', '}', ',']) => Some(s),
                _ => {
                    return Err(MlirError::Unsupported(format!(
                        "CUDA toolkit path {} (spaces, braces and commas cannot be passed to MLIR)",
                        t.display()
                    )))
                }
            },
            None => None,
        };
        let ctx = context();
        let mut lowered = lower(&ctx, key, Target::Gpu)?;
        let pm = PassManager::new(&ctx);
        parse_pass_pipeline(pm.as_operation_pass_manager(), &pipeline(chip, toolkit))?;
        pm.run(&mut lowered.module)
            .map_err(|e| MlirError::Mlir(format!("GPU pipeline: {e}")))?;
        let mut binaries = Vec::new();
        let mut program = None;
        let mut op = lowered.module.body().first_operation();
        while let Some(o) = op {
            match o.name().as_string_ref().as_str() {
                Ok("gpu.binary") => {
                    let name = StringAttribute::try_from(o.attribute("sym_name")?)
                        .map_err(|_| MlirError::Mlir("a gpu.binary without a name".into()))?
                        .value()
                        .to_string();
                    binaries.push((name, objects(&o)?));
                }
                Ok("func.func") => program = Some(HostProgram::read(o)?),
                _ => {}
            }
            op = o.next_in_block();
        }
        let program = program
            .ok_or_else(|| MlirError::Mlir("the GPU pipeline left no host function".into()))?;
        let missing: Vec<&str> = binaries
            .iter()
            .flat_map(|(_, p)| p.lines())
            .filter_map(|l| l.trim().strip_prefix(".extern .func"))
            .collect();
        if !missing.is_empty() {
            return Err(MlirError::Unsupported(format!(
                "the PTX calls functions no library provided (give a CUDA toolkit with libdevice): {}",
                missing.join("; ")
            )));
        }
        let mut modules: Vec<(String, Arc<str>)> = Vec::new();
        for l in &program.launches {
            if modules.iter().any(|(m, _)| *m == l.module) {
                continue;
            }
            let ptx = binaries
                .iter()
                .find(|(m, _)| *m == l.module)
                .ok_or_else(|| MlirError::Mlir(format!("no gpu.binary @{}", l.module)))?;
            modules.push((l.module.clone(), ptx.1.as_str().into()));
        }
        if modules.is_empty() {
            return Err(MlirError::Mlir(
                "the GPU pipeline produced no kernel".into(),
            ));
        }
        Ok(GpuKernel { modules, program })
    }

    /// The PTX modules, in the order of their first launch.
    pub fn ptx(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|(_, p)| &**p)
    }

    /// The launches for the kernel's memref arguments at these concrete shapes (a
    /// [`super::spec::Layout`]'s `shapes`: the operands as the kernel views them, then the
    /// result). Launches with an empty grid are left out.
    pub fn launches(&self, shapes: &[Vec<usize>]) -> Result<Vec<PtxLaunch>, MlirError> {
        let v = self.program.eval(shapes)?;
        let dim = |i: usize, max: u32| -> Result<u32, MlirError> {
            u32::try_from(v[i])
                .ok()
                .filter(|&d| d <= max)
                .ok_or_else(|| {
                    MlirError::Arguments(format!("launch size {} (at most {max})", v[i]))
                })
        };
        let mut out = Vec::new();
        for l in &self.program.launches {
            let grid = [
                dim(l.grid[0], i32::MAX as u32)?,
                dim(l.grid[1], 65535)?,
                dim(l.grid[2], 65535)?,
            ];
            let block = [
                dim(l.block[0], 1024)?,
                dim(l.block[1], 1024)?,
                dim(l.block[2], 64)?,
            ];
            if grid.contains(&0) || block.contains(&0) {
                continue;
            }
            let ptx = self
                .modules
                .iter()
                .find(|(m, _)| *m == l.module)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| MlirError::Mlir(format!("no PTX for @{}", l.module)))?;
            let args = l
                .args
                .iter()
                .map(|a| match *a {
                    KernelOperand::Memref(m) => shapes
                        .get(m)
                        .map(|s| LaunchArg::Memref {
                            operand: m,
                            shape: s.clone(),
                        })
                        .ok_or_else(|| MlirError::Arguments(format!("no shape for argument {m}"))),
                    KernelOperand::Int(i) => Ok(LaunchArg::I64(v[i])),
                })
                .collect::<Result<_, _>>()?;
            out.push(PtxLaunch {
                ptx,
                entry: l.entry.clone(),
                grid,
                block,
                args,
            });
        }
        Ok(out)
    }
}

/// The objects of a `gpu.binary` (one per target: here the PTX for one chip).
fn objects(o: &OperationRef) -> Result<String, MlirError> {
    let objects = o.attribute("objects")?;
    let mut ptx = String::new();
    // SAFETY: `objects` is the `gpu.binary` op's array attribute of `#gpu.object` attributes
    // (the op's verifier guarantees it); the calls only read it, and each returned string
    // reference lives as long as the context, which outlives the copy.
    unsafe {
        for i in 0..mlir_sys::mlirArrayAttrGetNumElements(objects.to_raw()) {
            let obj = mlir_sys::mlirArrayAttrGetElement(objects.to_raw(), i);
            let s = mlir_sys::mlirGPUObjectAttrGetObject(obj);
            let bytes = std::slice::from_raw_parts(s.data.cast::<u8>(), s.length);
            ptx.push_str(&String::from_utf8_lossy(bytes));
        }
    }
    Ok(ptx)
}

/// The PTX of a kernel for `chip` (e.g. `sm_90`): one PTX module per outlined GPU kernel
/// (each structured op of the kernel is one launch; a norm has several). See
/// [`GpuKernel::compile`].
pub fn ptx(
    spec: &KernelSpec,
    chip: &str,
    toolkit: Option<&Path>,
) -> Result<Vec<String>, MlirError> {
    Ok(GpuKernel::compile(&spec.key()?, chip, toolkit)?
        .ptx()
        .map(str::to_string)
        .collect())
}

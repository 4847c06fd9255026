//! The GPU path: the same kernel modules mapped to the GPU (`linalg` to parallel loops, loops
//! to `gpu.launch`, kernels outlined into a `gpu.module`) and lowered through `nvvm` to PTX
//! for an NVIDIA architecture (default `sm_90`). Only the device code is the product here: the
//! host side that launches it belongs to the CUDA backend.
//!
//! Architectures `sm_70` to `sm_90a` are accepted; the PTX is ISA version 8.0 (`+ptx80`, the
//! first with `sm_90`), which `ptxas` from CUDA 12.0 on assembles.

use super::build::context;
use super::lower::lower;
use super::spec::KernelSpec;
use super::MlirError;
use melior::ir::attribute::AttributeLike;
use melior::ir::operation::OperationLike;
use melior::ir::BlockLike;
use melior::pass::PassManager;
use melior::utility::parse_pass_pipeline;
use std::path::Path;

/// The GPU pipeline for `chip` (e.g. `sm_90`), ending in `gpu.binary` ops holding PTX. Only
/// the outlined device modules are lowered (to NVVM); `toolkit` is a CUDA toolkit directory
/// whose `nvvm/libdevice/libdevice.10.bc` implements the `math` functions (`__nv_expf`, ...).
pub fn pipeline(chip: &str, toolkit: Option<&str>) -> String {
    let toolkit = toolkit.map(|t| format!(" toolkit={t}")).unwrap_or_default();
    format!(
        "builtin.module(func.func(convert-linalg-to-parallel-loops, gpu-map-parallel-loops, \
         convert-parallel-loops-to-gpu), gpu-kernel-outlining, \
         nvvm-attach-target{{chip={chip} features=+ptx80 O=3}}, \
         gpu.module(expand-strided-metadata, lower-affine, convert-scf-to-cf, convert-gpu-to-nvvm, \
         canonicalize, cse, reconcile-unrealized-casts), \
         gpu-module-to-binary{{format=isa{toolkit}}})"
    )
}

/// The PTX of a kernel for `chip` (e.g. `sm_90`): one PTX module per GPU launch (each
/// structured op of the kernel is one launch; a norm has several).
/// `toolkit` (a CUDA toolkit directory, see [`pipeline`]) is needed by kernels that call
/// transcendental functions; without one, such a kernel is an error naming the missing functions.
pub fn ptx(
    spec: &KernelSpec,
    chip: &str,
    toolkit: Option<&Path>,
) -> Result<Vec<String>, MlirError> {
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
    let mut lowered = lower(&ctx, &spec.key()?)?;
    let pm = PassManager::new(&ctx);
    parse_pass_pipeline(pm.as_operation_pass_manager(), &pipeline(chip, toolkit))?;
    pm.run(&mut lowered.module)
        .map_err(|e| MlirError::Mlir(format!("GPU pipeline: {e}")))?;
    let mut ptx = Vec::new();
    let mut op = lowered.module.body().first_operation();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
            let objects = o.attribute("objects")?;
            // SAFETY: `objects` is the `gpu.binary` op's array attribute of `#gpu.object`
            // attributes (the op's verifier guarantees it); the calls only read it, and each
            // returned string reference lives as long as the context, which outlives the copy.
            unsafe {
                for i in 0..mlir_sys::mlirArrayAttrGetNumElements(objects.to_raw()) {
                    let obj = mlir_sys::mlirArrayAttrGetElement(objects.to_raw(), i);
                    let s = mlir_sys::mlirGPUObjectAttrGetObject(obj);
                    let bytes = std::slice::from_raw_parts(s.data.cast::<u8>(), s.length);
                    ptx.push(String::from_utf8_lossy(bytes).into_owned());
                }
            }
        }
        op = o.next_in_block();
    }
    if ptx.is_empty() {
        return Err(MlirError::Mlir(
            "the GPU pipeline produced no kernel".into(),
        ));
    }
    let missing: Vec<&str> = ptx
        .iter()
        .flat_map(|p| p.lines())
        .filter_map(|l| l.trim().strip_prefix(".extern .func"))
        .collect();
    if !missing.is_empty() {
        return Err(MlirError::Unsupported(format!(
            "the PTX calls functions no library provided (give a CUDA toolkit with libdevice): {}",
            missing.join("; ")
        )));
    }
    Ok(ptx)
}

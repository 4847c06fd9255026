//! The MLIR an artifact carries (`kiln compile --emit-mlir`, the runtime's
//! `kiln_runtime::artifact::mlir` section), both ways.
//!
//! - [`record`]: for an artifact's graphs, every distinct kernel the CPU backend would hand to
//!   [`super::MlirProvider`] (graphs legalized and planned as that backend plans them, symbolic
//!   dims bound to a few sizes, see [`SIZES`]), filed under its [`KernelKey::text`], with its
//!   verified module before the lowering pipeline (the `linalg`/`scf`/`vector` form).
//! - [`compile`]: a kernel from its carried module, as `--codegen mlir` on such an artifact
//!   does ([`super::KernelCache::carrying`]).
//!
//! Carried MLIR is checked, not trusted. A module is compiled to machine code and called on raw
//! buffers, so a module that writes past them or into its operands would corrupt memory: the
//! file's checksums catch accidents, not edits. So a carried module is used only when it
//! parses, verifies and is exactly what this kiln lowers for the key it is filed under (its
//! printed form equal to the fresh lowering's); otherwise — an edited section, a module written
//! by another kiln version, a key no node has — the kernel is lowered afresh and the reason
//! logged, never an error. This is the plan section's stance (`kiln_runtime::artifact::plan`);
//! it keeps `--codegen mlir` on an artifact exactly as safe as on a model directory, at the
//! price of lowering each kernel at load as before (building a module takes a small part of a
//! kernel's compilation; the pipeline and LLVM's JIT take the rest, see BENCHMARKS.md).

use super::build::context;
use super::cpu::MlirKernel;
use super::lower::{diagnosed, lower, verify, Lowered, Target};
use super::provider::MlirProvider;
use super::spec::{KernelKey, KernelSpec};
use super::MlirError;
use kiln_ir::{Bindings, Graph};
use kiln_runtime::artifact::mlir::{CarriedKernel, MlirRecord, CPU};
use kiln_runtime::cpu::external::Provider;
use kiln_runtime::cpu::legalize::legalize;
use kiln_runtime::cpu::{Plan, Step};
use melior::ir::Module;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The sizes symbolic dims (batch, sequence, past length) are bound to when listing a graph's
/// kernels: every combination of them when a graph has at most [`MAX_COMBINED`] symbols, else
/// each size for all at once. A kernel's key fixes only the sizes its lowering needs, mostly
/// model dims, so these cover the keys of most runs; a run whose key was not listed lowers
/// that kernel afresh.
pub const SIZES: [i64; 2] = [1, 8];

/// The most symbols whose size combinations [`record`] enumerates.
const MAX_COMBINED: usize = 4;

/// Where a kernel's module came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The carried module.
    Carried,
    /// Lowered afresh, for this reason (no module carried, or it was unusable).
    Afresh(String),
}

/// The MLIR of every distinct kernel the CPU backend's `--codegen mlir` plan of `graphs` runs
/// through [`MlirProvider`], at the sizes of [`SIZES`]. Kernels MLIR cannot lower are left
/// out (they run natively).
pub fn record(graphs: &[Graph]) -> MlirRecord {
    let provider = Provider::new(Arc::new(MlirProvider::new()));
    let mut kernels: BTreeMap<String, String> = BTreeMap::new();
    let ctx = context();
    for g in graphs {
        let g = legalize(g);
        let plan = Plan::with_provider(&g, Some(&provider));
        let nodes = g.nodes();
        for env in bindings(&g) {
            for (node, step) in nodes.iter().zip(&plan.steps) {
                if !matches!(step, Step::External { .. }) {
                    continue;
                }
                let tys: Vec<_> = node.inputs.iter().map(|v| g.ty(*v)).collect();
                let Ok(key) = KernelSpec::from_types(&node.op, &tys, &env).and_then(|s| s.key())
                else {
                    continue;
                };
                let text = key.text();
                if kernels.contains_key(&text) {
                    continue;
                }
                if let Ok(l) = lower(&ctx, &key, Target::Cpu) {
                    let mlir = l.module.as_operation().to_string();
                    kernels.insert(text, mlir);
                }
            }
        }
    }
    MlirRecord::new(
        kernels
            .into_iter()
            .map(|(key, mlir)| CarriedKernel {
                key,
                target: CPU.to_string(),
                mlir,
            })
            .collect(),
    )
}

/// The bindings of `g`'s symbols [`record`] lists kernels at.
fn bindings(g: &Graph) -> Vec<Bindings> {
    let mut symbols: Vec<String> = g
        .nodes()
        .iter()
        .flat_map(|n| n.ty.shape.iter().flat_map(|d| d.symbols()))
        .map(|s| s.to_string())
        .collect();
    symbols.sort();
    symbols.dedup();
    let uniform = |size: i64| symbols.iter().map(|s| (s.clone(), size)).collect();
    if symbols.len() > MAX_COMBINED {
        return SIZES.iter().map(|&n| uniform(n)).collect();
    }
    let combos = SIZES.len().pow(symbols.len() as u32);
    (0..combos)
        .map(|mut c| {
            symbols
                .iter()
                .map(|s| {
                    let size = SIZES[c % SIZES.len()];
                    c /= SIZES.len();
                    (s.clone(), size)
                })
                .collect()
        })
        .collect()
}

/// The kernel of `key`, JIT-compiled from `carried` (its module from an artifact) when that is
/// exactly this kiln's lowering of `key`, else from a fresh lowering; with where it came from.
/// `Err` only when the key cannot be lowered or compiled at all.
pub fn compile(key: &KernelKey, carried: Option<&str>) -> Result<(MlirKernel, Source), MlirError> {
    let ctx = context();
    let fresh = lower(&ctx, key, Target::Cpu)?;
    let Some(text) = carried else {
        let why = "the artifact carries no module for this key".to_string();
        return Ok((MlirKernel::jit(&ctx, fresh, key)?, Source::Afresh(why)));
    };
    let (parsed, errors) = diagnosed(&ctx, || Module::parse(&ctx, text));
    let checked = match parsed {
        None => Err(format!(
            "the carried module does not parse: {}",
            errors.join("; ")
        )),
        Some(m) => verify(&ctx, &m)
            .map_err(|e| format!("the carried module does not verify: {e}"))
            .and_then(|()| {
                let same = m.as_operation().to_string() == fresh.module.as_operation().to_string();
                same.then_some(m).ok_or_else(|| {
                    "the carried module is not this kiln's lowering of its key (edited, or \
                     written by another kiln version)"
                        .to_string()
                })
            }),
    };
    match checked {
        Ok(module) => {
            let first_row = fresh.first_row;
            let carried = Lowered { module, first_row };
            Ok((MlirKernel::jit(&ctx, carried, key)?, Source::Carried))
        }
        Err(why) => Ok((MlirKernel::jit(&ctx, fresh, key)?, Source::Afresh(why))),
    }
}

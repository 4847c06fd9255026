//! `kiln inspect --model DIR --emit mlir`: the MLIR of every distinct kernel of a model's
//! optimized graphs as the CPU backend plans them (legalized: the compiler's head-layout,
//! merged-head and SwiGLU ops written back as the kernels that backend runs, which
//! `--codegen mlir` replaces), or why a kernel is not lowered (needs the `mlir` feature;
//! without it, an error saying so). On an artifact (`--model X.kiln`), the modules it carries
//! (`kiln compile --emit-mlir`), which any build prints: they are text.

use super::CliError;
use std::path::Path;

/// Every symbolic dim (sequence length, past length, ...) is bound to this to give kernels
/// concrete shapes.
#[cfg(feature = "mlir")]
pub const SYMBOL_SIZE: i64 = 8;

/// Prints the MLIR of `path`'s kernels: an artifact's carried modules, or a model directory's
/// kernels lowered now.
pub fn emit_mlir(path: &Path) -> Result<(), CliError> {
    if kiln::load::is_artifact(path) {
        carried(path)
    } else {
        lowered(path)
    }
}

/// Prints the modules the artifact at `path` carries, each under its key.
fn carried(path: &Path) -> Result<(), CliError> {
    use kiln::runtime::artifact::Artifact;
    let art = Artifact::open(path).map_err(|e| CliError::Input(e.to_string()))?;
    let Some(record) = art.mlir() else {
        return Err(CliError::Input(format!(
            "{} carries no MLIR (compile it with `kiln compile --emit-mlir`, or give              --emit mlir a model directory)",
            path.display()
        )));
    };
    println!(
        "// ==== {} kernels carried by {}",
        record.kernels.len(),
        path.display()
    );
    for k in &record.kernels {
        println!(
            "// {} ({})
{}",
            k.key, k.target, k.mlir
        );
    }
    Ok(())
}

/// Prints each distinct kernel (op and operand shapes) once, as MLIR, or why it is not lowered.
#[cfg(feature = "mlir")]
fn lowered(dir: &Path) -> Result<(), CliError> {
    use kiln::compiler::mlir::{emit, KernelSpec};
    use kiln::ir::{Bindings, Op};
    let model = kiln::models::ModelDir::open(dir).map_err(|e| CliError::Input(e.to_string()))?;
    let (names, traced): (Vec<&str>, Vec<_>) = super::inspect::traced(&model)?.into_iter().unzip();
    let (graphs, _) = kiln::load::prepare(traced, &kiln::load::LoadOptions::default())
        .map_err(super::forward::load_error)?;
    for (name, g) in names.iter().zip(&graphs) {
        let g = &kiln::runtime::cpu::legalize::legalize(g);
        let mut env = Bindings::new();
        for n in g.nodes() {
            for s in n.ty.shape.iter().flat_map(|d| d.symbols()) {
                env.insert(s.to_string(), SYMBOL_SIZE);
            }
        }
        println!(
            "// ==== {name} graph of {} (symbolic dims = {SYMBOL_SIZE})",
            dir.display()
        );
        let mut seen = std::collections::HashSet::new();
        for n in g.nodes() {
            if matches!(
                n.op,
                Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. }
            ) {
                continue;
            }
            let tys: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
            let spec = KernelSpec::from_types(&n.op, &tys, &env);
            let key = spec.clone().map_err(|_| format!("{:?} {tys:?}", n.op));
            if !seen.insert(key) {
                continue;
            }
            match spec.and_then(|s| emit(&s).map(|m| (s, m))) {
                Ok((s, m)) => println!("// {} {:?}\n{m}", n.op.name(), s.inputs),
                Err(e) => println!("// {}: {e}", n.op.name()),
            }
        }
    }
    Ok(())
}

/// Without the `mlir` feature: the error saying so.
#[cfg(not(feature = "mlir"))]
fn lowered(_dir: &Path) -> Result<(), CliError> {
    Err(CliError::Input(
        kiln::codegen::missing("--emit mlir").unwrap_or_default(),
    ))
}

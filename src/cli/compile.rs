//! `kiln compile --model DIR -o model.kiln [--target T] [--precision P] [--max-seq N]
//! [--max-batch N] [--emit-mlir]`: writes an ahead-of-time artifact (see
//! `kiln_runtime::artifact`), with `--emit-mlir` carrying its kernels' MLIR (feature `mlir`).

use super::forward::load_error;
use super::opts::{parse_precision, ModelOpts};
use super::CliError;
use clap::Args;
use kiln::compile::{compile as compile_dir, CompileOptions};
use kiln::compiler::{cost::TARGETS, Precision, Target};
use kiln::load::LoadOptions;
use std::path::PathBuf;

/// `kiln compile` flags.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// The artifact to write.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
    /// The target: cpu, cpu-avx512-bf16, cuda:sm_80, cuda:sm_90.
    #[arg(long, default_value = "cpu")]
    target: String,
    /// Numeric precision.
    #[arg(long, value_parser = parse_precision, default_value = "f32")]
    precision: Precision,
    /// The longest sequence (prompt plus new tokens) the artifact accepts.
    #[arg(long)]
    max_seq: Option<usize>,
    /// The largest batch (texts or beams) the artifact accepts.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Carry each kernel's MLIR (as `--codegen mlir` lowers it) in the artifact: `kiln inspect
    /// --emit mlir` prints it, `--codegen mlir` compiles from it (needs the `mlir` feature).
    #[arg(long)]
    emit_mlir: bool,
}

/// The target called `name` (`cuda:sm_90` is the cost model's `cuda-sm90`).
fn target(name: &str) -> Result<Target, CliError> {
    let canonical = match name.strip_prefix("cuda:sm_") {
        Some(sm) => format!("cuda-sm{sm}"),
        None => name.to_string(),
    };
    Target::by_name(&canonical).ok_or_else(|| {
        let names: Vec<String> = TARGETS
            .iter()
            .map(|t| match t.name.strip_prefix("cuda-sm") {
                Some(sm) => format!("cuda:sm_{sm}"),
                None => t.name.to_string(),
            })
            .collect();
        CliError::Input(format!(
            "--target {name:?}: unknown target (expected one of {})",
            names.join(", ")
        ))
    })
}

/// Runs the command.
pub fn compile(a: &CompileArgs) -> Result<(), CliError> {
    let target = target(&a.target)?;
    kiln::compiler::precision::check(a.precision, &target)
        .map_err(|e| CliError::Input(e.to_string()))?;
    if let Some(why) = a
        .emit_mlir
        .then(|| kiln::codegen::missing("--emit-mlir"))
        .flatten()
    {
        return Err(CliError::Input(why));
    }
    if a.max_seq == Some(0) || a.max_batch == Some(0) {
        return Err(CliError::Input(
            "--max-seq and --max-batch must be at least 1".into(),
        ));
    }
    let opts = CompileOptions {
        load: LoadOptions {
            target,
            precision: a.precision,
            ..Default::default()
        },
        max_seq: a.max_seq,
        max_batch: a.max_batch,
        emit_mlir: a.emit_mlir,
    };
    let (bytes, reports) = compile_dir(&a.model, &opts).map_err(load_error)?;
    ModelOpts::warn(&reports);
    std::fs::write(&a.out, &bytes).map_err(|e| CliError::input(a.out.display(), e))?;
    eprintln!(
        "kiln: wrote {} ({} bytes, target {}, {})",
        a.out.display(),
        bytes.len(),
        target.name,
        a.precision.name()
    );
    Ok(())
}

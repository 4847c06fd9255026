//! Options shared by every command that runs a model, and their checks.

use super::CliError;
use clap::{Args, ValueEnum};
use kiln::compiler::Precision;
use std::path::PathBuf;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA device 0 when there is one (driver, device, cuBLAS), else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

fn placement(device: Device) -> kiln::placement::Placement {
    match device {
        Device::Auto => kiln::placement::Placement::Auto,
        Device::Cpu => kiln::placement::Placement::Cpu,
        Device::Cuda => kiln::placement::Placement::Cuda,
    }
}

/// The CUDA backend `device` asks for (`None`: the CPU), or the reason CUDA cannot be had.
pub fn backend(
    device: Device,
) -> Result<Option<std::sync::Arc<kiln_cuda::exec::Backend>>, CliError> {
    kiln::placement::resolve(placement(device))
        .map_err(|why| CliError::Input(format!("--device cuda: {why}; use --device cpu (or auto)")))
}

/// Whose kernels the CPU backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodegenArg {
    /// kiln's hand-written kernels.
    Native,
    /// MLIR-JIT kernels where MLIR lowers the node, native kernels elsewhere (needs a build
    /// with `--features mlir`).
    Mlir,
}

/// Parses `--precision` into the compiler's precision.
pub fn parse_precision(name: &str) -> Result<Precision, String> {
    Precision::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Precision::ALL.iter().map(|p| p.name()).collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// `--model DIR --device D --precision P`.
#[derive(Debug, Clone, Args)]
pub struct ModelOpts {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or an
    /// artifact written by `kiln compile`.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Numeric precision.
    #[arg(long, value_parser = parse_precision, default_value = "f32")]
    pub precision: Precision,
    /// Run the traced graphs as they are, without the optimizer (to compare).
    #[arg(long)]
    pub no_optimize: bool,
    /// Whose kernels the backend runs (`mlir`: on the CPU, or with `--device cuda` on the GPU).
    #[arg(long, value_enum, default_value_t = CodegenArg::Native)]
    pub codegen: CodegenArg,
}

impl ModelOpts {
    /// How to load the model.
    pub fn load_options(&self) -> kiln::load::LoadOptions {
        kiln::load::LoadOptions {
            optimize: !self.no_optimize,
            precision: self.precision,
            // MLIR kernels run on the CUDA backend only when asked for (`--device cuda`):
            // `auto` then means the CPU.
            placement: match (self.device, self.codegen) {
                (Device::Auto, CodegenArg::Mlir) => kiln::placement::Placement::Cpu,
                (d, _) => placement(d),
            },
            codegen: match self.codegen {
                CodegenArg::Native => kiln::codegen::Codegen::Native,
                CodegenArg::Mlir => kiln::codegen::Codegen::Mlir,
            },
            ..Default::default()
        }
    }

    /// Prints the optimizer's warnings (limits hit; the graph is still correct) to stderr.
    pub fn warn(reports: &[kiln::compiler::pipeline::Report]) {
        for w in reports.iter().flat_map(|r| &r.warnings) {
            eprintln!("kiln: warning: {w}");
        }
    }

    /// Refuses a device or precision that cannot be had, with a message saying what can.
    pub fn check_target(&self) -> Result<(), CliError> {
        let opts = self.load_options();
        if let Some(why) = kiln::codegen::unavailable(opts.codegen) {
            return Err(CliError::Input(why));
        }
        let backend = kiln::placement::resolve(opts.placement).map_err(|why| {
            CliError::Input(format!("--device cuda: {why}; use --device cpu (or auto)"))
        })?;
        let target = match &backend {
            Some(b) => kiln::compiler::Target::by_name(match b.device().arch() {
                kiln_cuda::Arch::Sm80 => "cuda-sm80",
                _ => "cuda-sm90",
            })
            .unwrap_or_else(kiln::compiler::Target::cpu),
            None => kiln::compiler::Target::cpu(),
        };
        kiln::compiler::precision::check(self.precision, &target)
            .map_err(|e| CliError::Input(format!("{e} (this run is on {})", target.name)))
    }
}

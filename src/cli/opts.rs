//! Options shared by every command that runs a model, and their checks.

use super::CliError;
use clap::{Args, ValueEnum};
use kiln::compiler::Precision;
use std::path::PathBuf;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The best available: the CPU until models run on CUDA.
    Auto,
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
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
}

impl ModelOpts {
    /// How to load the model.
    pub fn load_options(&self) -> kiln::load::LoadOptions {
        kiln::load::LoadOptions {
            optimize: !self.no_optimize,
            precision: self.precision,
            ..Default::default()
        }
    }

    /// Prints the optimizer's warnings (limits hit; the graph is still correct) to stderr.
    pub fn warn(reports: &[kiln::compiler::pipeline::Report]) {
        for w in reports.iter().flat_map(|r| &r.warnings) {
            eprintln!("kiln: warning: {w}");
        }
    }

    /// Refuses targets this build cannot run yet, with a message saying what can.
    pub fn check_target(&self) -> Result<(), CliError> {
        if self.device == Device::Cuda {
            // Names why CUDA cannot be had: no driver, no device, or (with one) no model
            // execution on CUDA yet.
            let why = match kiln_cuda::Device::open(0) {
                Err(e) => e.to_string(),
                Ok(d) => format!(
                    "found {} ({}), but kiln cannot run models on CUDA yet",
                    d.name(),
                    d.arch()
                ),
            };
            return Err(CliError::Input(format!(
                "--device cuda: {why}; use --device cpu (or auto)"
            )));
        }
        let target = kiln::compiler::Target::cpu();
        kiln::compiler::precision::check(self.precision, &target)
            .map_err(|e| CliError::Input(format!("{e} (this build runs on {})", target.name)))
    }
}

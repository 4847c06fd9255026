//! Command definitions (clap) and dispatch; each command lives in its own module.

mod error;
mod inspect;
mod run;

pub use error::CliError;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// kiln: an ahead-of-time compiler and lean runtime for transformer models.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and verify a kiln IR file; print it and a summary (ops by kind, parameters, bytes).
    Inspect {
        /// The IR text file.
        #[arg(long)]
        graph: PathBuf,
    },
    /// Run a kiln IR graph on the CPU with the reference executor.
    Run {
        /// The IR text file.
        #[arg(long)]
        graph: PathBuf,
        /// safetensors file(s) holding the graph's parameters, bound by name.
        #[arg(long = "weights")]
        weights: Vec<PathBuf>,
        /// safetensors file holding the graph's inputs, bound by name.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Write the outputs (as f32) to this safetensors file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Inspect { graph } => inspect::inspect(&graph),
        Command::Run {
            graph,
            weights,
            inputs,
            out,
        } => run::run(&graph, &weights, inputs.as_deref(), out.as_deref()),
    }
}

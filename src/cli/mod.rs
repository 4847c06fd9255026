//! Command definitions (clap) and dispatch; each command lives in its own module.

mod bench;
mod bench_kernel;
mod bench_model;
mod compile;
mod emit;
mod encode;
mod error;
mod forward;
mod generate;
mod inspect;
mod opts;
mod run;

pub use error::CliError;

use clap::{Args, Parser, Subcommand};
use opts::ModelOpts;
use std::path::PathBuf;

/// kiln: an ahead-of-time compiler and lean runtime for transformer models.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `kiln inspect` looks at: a model directory or an IR file.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct InspectTarget {
    /// A Hugging Face model directory (prints its traced graphs) or an artifact (prints its
    /// sections, target, sizes and kernels).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A kiln IR text file.
    #[arg(long)]
    graph: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a model's traced IR (or an IR file's) and a summary: ops by kind, parameters, bytes.
    Inspect {
        #[command(flatten)]
        target: InspectTarget,
        /// With --model: print the optimizer's passes (ops before/after, time) and the final kernels.
        #[arg(long, requires = "model")]
        passes: bool,
        /// With --passes: print one JSON object per graph instead.
        #[arg(long, requires = "passes")]
        json: bool,
        /// With --model: print the graph before optimization.
        #[arg(long, requires = "model")]
        no_optimize: bool,
        /// With --model: print the IR right after this optimizer pass (algebra, norm, ...).
        #[arg(long, requires = "model", value_name = "PASS", conflicts_with_all = ["passes", "no_optimize"])]
        dump_ir: Option<String>,
        /// With --model: print each distinct kernel as MLIR (`mlir`; needs the `mlir` feature),
        /// symbolic dims bound to 8.
        #[arg(long, requires = "model", value_name = "FORMAT", value_parser = ["mlir"],
              conflicts_with_all = ["passes", "no_optimize", "dump_ir"])]
        emit: Option<String>,
        /// With --model: lower the graphs to this precision after optimizing (as `generate`
        /// and `compile` do), so the printed IR and kernels are what runs.
        #[arg(long, requires = "model", value_parser = opts::parse_precision, default_value = "f32",
              conflicts_with_all = ["dump_ir", "emit"])]
        precision: kiln::compiler::Precision,
    },
    /// One forward pass on token ids (batch 1): logits for causal LMs, last_hidden_state for encoders.
    Forward {
        #[command(flatten)]
        model: ModelOpts,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        tokens: String,
        /// Write the output (f32) to this safetensors file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compile a model directory into one ahead-of-time artifact file.
    Compile(compile::CompileArgs),
    /// Generate a continuation of a prompt, streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Sentence embeddings (pooling as the model's sentence-transformers modules declare).
    Embed {
        #[command(flatten)]
        model: ModelOpts,
        /// A text to embed (repeat for several).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// Print {"embeddings": [[...], ...]} on one line.
        #[arg(long)]
        json: bool,
    },
    /// Classify texts with a sequence-classification model (labels from id2label).
    Classify {
        #[command(flatten)]
        model: ModelOpts,
        /// A text to classify (repeat for several).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fill the mask token of a text with a masked-LM model.
    FillMask {
        #[command(flatten)]
        model: ModelOpts,
        /// The text, containing the tokenizer's mask token (e.g. [MASK]).
        #[arg(long)]
        text: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure this machine's ceilings or time one CPU kernel.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
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
        Command::Inspect {
            target,
            passes,
            json,
            no_optimize,
            dump_ir,
            emit,
            precision,
        } => match (target.model, target.graph, dump_ir) {
            (Some(model), _, _) if emit.is_some() => emit::emit_mlir(&model),
            (Some(model), _, Some(pass)) => inspect::dump_ir(&model, &pass),
            (Some(model), _, None) => {
                inspect::inspect_model(&model, passes, json, !no_optimize, precision)
            }
            (None, Some(graph), _) => inspect::inspect(&graph),
            (None, None, _) => Err(CliError::Input("give --model DIR or --graph FILE".into())),
        },
        Command::Forward { model, tokens, out } => {
            forward::forward(&model, &tokens, out.as_deref())
        }
        Command::Generate(args) => generate::generate(&args),
        Command::Compile(args) => compile::compile(&args),
        Command::Embed { model, texts, json } => encode::embed(&model, &texts, json),
        Command::Classify { model, texts, json } => encode::classify(&model, &texts, json),
        Command::FillMask { model, text, json } => encode::fill_mask(&model, &text, json),
        Command::Run {
            graph,
            weights,
            inputs,
            out,
        } => run::run(&graph, &weights, inputs.as_deref(), out.as_deref()),
        Command::Bench { command } => bench::bench(&command),
    }
}

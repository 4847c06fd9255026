//! `kiln generate --model DIR --prompt TEXT [...]`: streams a continuation to stdout, or with
//! `--json` prints `{"prompt_ids": [...], "generated_ids": [...], "text": "..."}` at the end.
//!
//! Settings start from the model's `generation_config.json` (transformers' defaults where it is
//! silent); flags override them. `--temperature 0` means greedy; `--temperature T > 0`, or any of
//! `--top-k`, `--top-p`, `--min-p`, turns sampling on (seeded by `--seed`, default 0).

use super::forward::{deploy_error, load_error};
use super::opts::ModelOpts;
use super::CliError;
use clap::Args;
use kiln::load;
use kiln::runtime::generate::GenerationConfig;
use kiln::runtime::CausalModel;
use std::io::Write;

/// `kiln generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelOpts,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate (default: the model's generation config, else 20).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Sample among the k most likely tokens (implies sampling).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] (implies sampling).
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Drop tokens less likely than this fraction of the best one, in [0, 1] (implies sampling).
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f64>,
    /// Penalty > 0 for repeating tokens (1 = none).
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f64>,
    /// Beam search width (greedy beam search; 1 = none).
    #[arg(long)]
    num_beams: Option<usize>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the generated text contains this string (repeatable); it is cut from the output.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming.
    #[arg(long)]
    json: bool,
}

fn bad(msg: String) -> Result<(), CliError> {
    Err(CliError::Input(msg))
}

/// Range checks of the flags, so that a mistyped value is refused rather than ignored.
fn check_flags(a: &GenerateArgs) -> Result<(), CliError> {
    if let Some(t) = a.temperature.filter(|t| !(t.is_finite() && *t >= 0.0)) {
        return bad(format!(
            "--temperature must be a finite number >= 0, got {t}"
        ));
    }
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return bad(format!("--top-p must be in (0, 1], got {p}"));
    }
    if let Some(p) = a.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return bad(format!("--min-p must be in [0, 1], got {p}"));
    }
    if a.top_k == Some(0) {
        return bad("--top-k must be at least 1".into());
    }
    if let Some(r) = a
        .repetition_penalty
        .filter(|r| !(r.is_finite() && *r > 0.0))
    {
        return bad(format!(
            "--repetition-penalty must be a finite number > 0, got {r}"
        ));
    }
    if a.num_beams == Some(0) {
        return bad("--num-beams must be at least 1".into());
    }
    if a.max_new_tokens == Some(0) {
        return bad("--max-new-tokens must be at least 1".into());
    }
    let sampling_flags = a.top_k.is_some() || a.top_p.is_some() || a.min_p.is_some();
    if sampling_flags && a.temperature == Some(0.0) {
        return bad("--top-k, --top-p and --min-p need sampling, but --temperature 0 asks for greedy decoding".into());
    }
    if a.num_beams.is_some_and(|b| b > 1)
        && (sampling_flags || a.temperature.is_some_and(|t| t > 0.0))
    {
        return bad(
            "--num-beams > 1 is greedy beam search and cannot be combined with sampling flags"
                .into(),
        );
    }
    Ok(())
}

/// The generation config: the model's, then the flags.
fn config(a: &GenerateArgs, model: &CausalModel) -> Result<GenerationConfig, CliError> {
    let mut cfg = model.generation_config().map_err(deploy_error)?;
    if let Some(n) = a.max_new_tokens {
        cfg.max_new_tokens = Some(n);
    }
    if a.top_k.is_some() || a.top_p.is_some() || a.min_p.is_some() {
        cfg.do_sample = true;
    }
    if let Some(t) = a.temperature {
        cfg.set_temperature(t);
    }
    if let Some(k) = a.top_k {
        cfg.top_k = k;
    }
    if let Some(p) = a.top_p {
        cfg.top_p = p;
    }
    if a.min_p.is_some() {
        cfg.min_p = a.min_p;
    }
    if let Some(r) = a.repetition_penalty {
        cfg.repetition_penalty = r;
    }
    if let Some(b) = a.num_beams {
        cfg.num_beams = b;
        if b > 1 {
            cfg.do_sample = false;
        }
    }
    cfg.stop_strings.extend(a.stop.iter().cloned());
    cfg.validate().map_err(|e| CliError::Input(e.to_string()))?;
    Ok(cfg)
}

/// Runs the command.
pub fn generate(a: &GenerateArgs) -> Result<(), CliError> {
    a.model.check_target()?;
    check_flags(a)?;
    if a.prompt.is_empty() {
        return bad("--prompt is empty: give some text to continue".into());
    }
    let mut lm =
        load::causal_lm_with(&a.model.model, &a.model.load_options()).map_err(load_error)?;
    ModelOpts::warn(&lm.reports);
    let cfg = config(a, &lm.model)?;
    let mut stdout = std::io::stdout();
    let json = a.json;
    let out = lm
        .model
        .generate_streaming(&a.prompt, &cfg, a.seed, &mut |text| {
            if !json {
                // A closed stdout (e.g. `| head`) only ends the stream early.
                let _ = write!(stdout, "{text}").and_then(|()| stdout.flush());
            }
        })
        .map_err(deploy_error)?;
    if json {
        let out = serde_json::json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.ids,
            "text": out.text,
        });
        println!("{out}");
    } else {
        println!();
    }
    Ok(())
}

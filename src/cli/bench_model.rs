//! `kiln bench model`: end-to-end throughput of a model on the CPU backend with random token
//! ids. Causal LMs: prefill tokens/s over `--batch` prompts of `--prompt-len` tokens, time to
//! first token (prefill plus picking the token), and decode tokens/s over `--gen` greedy
//! steps; encoders: sequences/s at `--batch` × `--prompt-len`. Each figure is the median of
//! `--runs` runs after one warm-up run; peak RSS is the process's high-water mark.

use super::forward::load_error;
use super::opts::ModelOpts;
use super::CliError;
use clap::Args;
use kiln::load;
use kiln::runtime::deploy::Model;
use kiln::runtime::LanguageModel;
use std::time::Instant;

/// `kiln bench model` flags.
#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    opts: ModelOpts,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt (or encoder input) length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps after the prompt (causal LMs).
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

/// Medians of the timed runs; `None` where a figure does not apply.
#[derive(Debug, Default)]
struct Figures {
    prefill_tok_per_s: Option<f64>,
    decode_tok_per_s: Option<f64>,
    seq_per_s: Option<f64>,
    ttft_ms: Option<f64>,
}

/// Runs `kiln bench model`.
pub fn bench_model(args: &ModelArgs) -> Result<(), CliError> {
    args.opts.check_target()?;
    if args.batch == 0 || args.prompt_len == 0 || args.runs == 0 {
        return Err(CliError::Input(
            "--batch, --prompt-len and --runs must be at least 1".into(),
        ));
    }
    let run_error = |e: kiln::runtime::ModelError| CliError::Internal(e.to_string());
    let started = Instant::now();
    let load::Opened {
        model,
        reports,
        precision,
    } = load::model_with(&args.opts.model, &args.opts.load_options()).map_err(load_error)?;
    model.verify().map_err(super::forward::deploy_error)?;
    ModelOpts::warn(&reports);
    let load_s = started.elapsed().as_secs_f64();
    let mut profiles = Vec::new();
    let (figures, plan) = match model {
        Model::Causal(mut model) => {
            let limit = model.info.max_positions.unwrap_or(usize::MAX);
            if args.prompt_len + args.gen > limit {
                return Err(CliError::Input(format!(
                    "--prompt-len {} + --gen {} exceeds the model's {limit} positions",
                    args.prompt_len, args.gen
                )));
            }
            let prompts = random_prompts(args.batch, args.prompt_len, model.lm.vocab_size());
            let plan = model.lm.graphs()[1].kernel_summary();
            let mut runs = Vec::new();
            for _ in 0..=args.runs {
                runs.push(causal_run(&mut model.lm, &prompts, args.gen).map_err(run_error)?);
            }
            for (g, which) in model.lm.graphs().into_iter().zip(["prefill", "decode"]) {
                profiles.extend(g.profile().map(|p| (which, p)));
            }
            let tokens = (args.batch * args.prompt_len) as f64;
            let generated = (args.batch * args.gen) as f64;
            let timed = &runs[1..];
            let figures = Figures {
                prefill_tok_per_s: Some(tokens / median(timed.iter().map(|r| r.0))),
                ttft_ms: Some(median(timed.iter().map(|r| r.0)) * 1e3),
                decode_tok_per_s: (args.gen > 0)
                    .then(|| generated / median(timed.iter().map(|r| r.1))),
                seq_per_s: None,
            };
            (figures, plan)
        }
        Model::Encoder(enc) => {
            let limit = enc.info.max_positions.unwrap_or(usize::MAX);
            if args.prompt_len > limit {
                return Err(CliError::Input(format!(
                    "--prompt-len {} exceeds the model's {limit} positions",
                    args.prompt_len
                )));
            }
            let batch = random_prompts(args.batch, args.prompt_len, enc.info.vocab_size);
            let mut times = Vec::new();
            for _ in 0..=args.runs {
                let t = Instant::now();
                enc.runner.run(&batch).map_err(run_error)?;
                times.push(t.elapsed().as_secs_f64());
            }
            profiles.extend(enc.runner.plan().profile().map(|p| ("encoder", p)));
            let figures = Figures {
                seq_per_s: Some(args.batch as f64 / median(times[1..].iter().copied())),
                ..Figures::default()
            };
            (figures, enc.runner.plan().kernel_summary())
        }
    };
    let rss = peak_rss_bytes();
    let num = |v: Option<f64>| v.map_or(serde_json::Value::Null, |x| serde_json::json!(x));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prefill_tok_per_s": num(figures.prefill_tok_per_s),
                "decode_tok_per_s": num(figures.decode_tok_per_s),
                "seq_per_s": num(figures.seq_per_s),
                "ttft_ms": num(figures.ttft_ms),
                "peak_rss_bytes": rss.map_or(serde_json::Value::Null, |b| serde_json::json!(b)),
                "load_s": load_s,
                "precision": precision,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "gen": args.gen,
            })
        );
    } else {
        let show = |name: &str, v: Option<f64>, unit: &str| {
            if let Some(v) = v {
                println!("{name:<18} {v:>12.1} {unit}");
            }
        };
        println!(
            "{} ({}, batch {}, {} tokens, {} runs after warm-up; load {load_s:.2} s)",
            args.opts.model.display(),
            precision,
            args.batch,
            args.prompt_len,
            args.runs
        );
        println!("kernels (last graph): {plan}");
        show("prefill", figures.prefill_tok_per_s, "tokens/s");
        show("time to 1st token", figures.ttft_ms, "ms");
        show("decode", figures.decode_tok_per_s, "tokens/s");
        show("encode", figures.seq_per_s, "sequences/s");
        if let Some(b) = rss {
            println!(
                "{:<18} {:>12.1} MiB",
                "peak RSS",
                b as f64 / (1 << 20) as f64
            );
        }
        for (which, profile) in &profiles {
            let total: f64 = profile.iter().map(|p| p.1).sum();
            println!("profile of the {which} graph (KILN_PROFILE; all runs, warm-up included):");
            for (kind, secs, calls) in profile {
                println!(
                    "  {kind:<12} {:>10.2} ms {:>5.1}% {calls:>8} calls",
                    secs * 1e3,
                    100.0 * secs / total.max(1e-12)
                );
            }
        }
    }
    Ok(())
}

/// One prefill of `prompts` and `gen` greedy decode steps: (prefill seconds, decode seconds).
fn causal_run(
    lm: &mut impl LanguageModel,
    prompts: &[Vec<u32>],
    gen: usize,
) -> Result<(f64, f64), kiln::runtime::ModelError> {
    let t = Instant::now();
    let mut logits = lm.prefill(prompts)?;
    let mut next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..gen {
        // As the generation loop decodes: into the same vectors every step.
        lm.decode_into(&next, &mut logits)?;
        next.clear();
        next.extend(logits.iter().map(|l| argmax(l)));
    }
    Ok((prefill, t.elapsed().as_secs_f64()))
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `batch` sequences of `len` token ids spread over the vocabulary (deterministic).
fn random_prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % vocab.max(1) as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's peak resident set (`VmHWM`), where `/proc` has it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

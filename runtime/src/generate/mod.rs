//! Text generation over any [`LanguageModel`]: greedy decoding, seeded sampling and beam search,
//! reproducing transformers 5's `GenerationMixin.generate` (`_sample` and `_beam_search` in
//! `transformers/generation/utils.py`) for the settings in [`GenerationConfig`].
//!
//! [`generate`] is tokenizer-free: it works on token ids and reports each new token through a
//! callback. Text concerns live beside it: [`IncrementalDecoder`] turns a stream of ids into
//! complete UTF-8 chunks, and [`Stopper`] adds stop strings on top of it, to be driven from
//! the callback (see [`stop`]).
//!
//! # Semantics of [`generate`]
//!
//! * The configuration is [validated](GenerationConfig::validate) first; every prompt must be
//!   non-empty with ids below the model's vocabulary size.
//! * Each row gets at most [`GenerationConfig::new_token_budget`] new tokens (for a batch the
//!   budget is computed from the longest prompt, as transformers' padded batch does).
//! * Every step, each unfinished row's f32 logits go through the [`LogitsPipeline`] (in place;
//!   the repetition penalty sees the row's prompt and generated tokens), then the token is the
//!   argmax (greedy) or a draw from that row's seeded stream (see [`sampling`]).
//! * A row finishes after emitting an EOS id (the EOS token is part of its output, as in
//!   transformers' output before the padding) or when `on_token(row, token)` returns false
//!   (that token is kept). Finished rows stop growing; the loop ends when every row has
//!   finished or the budget is reached.
//! * The model sees the whole batch at every step: one `prefill`, then one `decode` per step
//!   for all rows. A finished row is fed its own last token again (transformers feeds the pad
//!   token; the row's output is discarded either way, and this keeps the batch shape constant
//!   and every id valid for the model). The logits tables the model returns are processed in
//!   place, never copied.
//! * Beam search (`num_beams > 1`) runs the prompts one at a time, each as a batch of
//!   `num_beams` rows (see [`beam`]); `on_token` is called with the finished best beam's
//!   tokens after its search ends (beam search cannot stream, as in transformers), and
//!   returning false truncates the output after that token.
//!
//! The result is, for each prompt, its new tokens only.

pub mod beam;
pub mod config;
pub mod processors;
pub mod sampling;
pub mod stop;
pub mod stream;
pub mod torch_order;

pub use config::{ConfigError, EarlyStopping, GenerationConfig};
pub use processors::{LogitsPipeline, Processor};
pub use sampling::RowSampler;
pub use stop::{StopStep, Stopper};
pub use stream::{IncrementalDecoder, StreamError};

use crate::lm::{LanguageModel, ModelError};

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The configuration is invalid or leaves no room for new tokens.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model failed.
    #[error("model error: {0}")]
    Model(#[from] ModelError),
    /// A prompt is empty or holds an id outside the vocabulary.
    #[error("prompt {row}: {reason}")]
    InvalidPrompt {
        /// The prompt's index.
        row: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The model returned logits of the wrong shape.
    #[error("the model returned {got}, expected {expected}")]
    BadLogits {
        /// What was expected, in words.
        expected: String,
        /// What came back, in words.
        got: String,
    },
    /// Sampling found no token with a positive probability (all scores -inf, or NaN / +inf).
    #[error(
        "row {row}: no token can be sampled (the scores are all -inf, or contain NaN or +inf)"
    )]
    NoValidToken {
        /// The row.
        row: usize,
    },
}

/// Checks that the model returned `rows` rows of `vocab` logits.
pub(crate) fn check_logits(
    logits: &[Vec<f32>],
    rows: usize,
    vocab: usize,
) -> Result<(), GenerateError> {
    if logits.len() != rows {
        return Err(GenerateError::BadLogits {
            expected: format!("{rows} rows of logits"),
            got: format!("{} rows", logits.len()),
        });
    }
    if let Some((r, row)) = logits
        .iter()
        .enumerate()
        .find(|(_, row)| row.len() != vocab)
    {
        return Err(GenerateError::BadLogits {
            expected: format!("{vocab} logits per row (the vocabulary size)"),
            got: format!("{} logits in row {r}", row.len()),
        });
    }
    Ok(())
}

/// Checks prompts against the vocabulary.
fn check_prompts(prompts: &[Vec<u32>], vocab: usize) -> Result<(), GenerateError> {
    for (row, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(GenerateError::InvalidPrompt {
                row,
                reason: "the prompt is empty".into(),
            });
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::InvalidPrompt {
                row,
                reason: format!("token id {t} is outside the vocabulary (size {vocab})"),
            });
        }
    }
    Ok(())
}

/// Generates new tokens for every prompt (see the module documentation for the exact
/// semantics). `seed` drives sampling only. `on_token(row, token)` is called for every new
/// token; returning false finishes that row. Returns each row's new tokens.
pub fn generate(
    model: &mut dyn LanguageModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    seed: u64,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<Vec<u32>>, GenerateError> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.vocab_size();
    check_prompts(prompts, vocab)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let budget = cfg.new_token_budget(longest)?;
    let mut pipeline = LogitsPipeline::from_config(cfg);

    if cfg.num_beams > 1 {
        let mut out = Vec::with_capacity(prompts.len());
        for (row, prompt) in prompts.iter().enumerate() {
            let mut tokens = beam::beam_search(model, prompt, cfg, budget, &mut pipeline)?;
            if let Some(stop) = tokens.iter().position(|&t| !on_token(row, t)) {
                tokens.truncate(stop + 1);
            }
            out.push(tokens);
        }
        return Ok(out);
    }

    let n = prompts.len();
    let mut samplers: Vec<RowSampler> = if cfg.do_sample {
        (0..n).map(|r| RowSampler::new(seed, r)).collect()
    } else {
        Vec::new()
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut finished = vec![false; n];
    let mut logits = model.prefill(prompts)?;
    let mut next = Vec::with_capacity(n);
    check_logits(&logits, n, vocab)?;
    for step in 0..budget {
        for row in 0..n {
            if finished[row] {
                continue;
            }
            let scores = &mut logits[row];
            pipeline.apply(scores, &prompts[row], &out[row]);
            let token = if cfg.do_sample {
                samplers[row]
                    .sample(scores)
                    .ok_or(GenerateError::NoValidToken { row })?
            } else {
                sampling::argmax(scores) as u32
            };
            out[row].push(token);
            let go_on = on_token(row, token);
            if !go_on || cfg.eos_token_id.contains(&token) {
                finished[row] = true;
            }
        }
        if step + 1 == budget || finished.iter().all(|&f| f) {
            break;
        }
        // Every row has at least one token here (each row emitted one at step 0).
        next.clear();
        next.extend(out.iter().map(|o| o.last().copied().unwrap_or(0)));
        model.decode_into(&next, &mut logits)?;
        check_logits(&logits, n, vocab)?;
    }
    Ok(out)
}

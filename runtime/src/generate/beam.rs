//! Beam search (`num_beams > 1`, `do_sample = false`), step for step as transformers 5's
//! `GenerationMixin._beam_search` (`transformers/generation/utils.py`, with its helpers
//! `_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
//! `_update_finished_beams`, `_check_early_stop_heuristic` and
//! `_beam_search_has_unfinished_sequences`), for one prompt.
//!
//! Each step, for `num_beams` running beams:
//!
//! 1. scores = `log_softmax(logits)` (f32), then the processors (only the repetition penalty
//!    applies without sampling), plus the beam's running score;
//! 2. the top `K = max(2, 1 + #eos) * num_beams` candidates over beams × vocabulary;
//! 3. a candidate "hits the stopping criteria" when its token is an EOS id or the sequence
//!    reaches the maximum length; the next running beams are the best `num_beams` candidates
//!    after adding -1e9 to those that hit;
//! 4. candidates ranked among the first `num_beams` that hit become finished hypotheses, scored
//!    `score / generated_len ^ length_penalty` (the generated length includes the new token, the
//!    prompt does not count). The `num_beams` best hypotheses are kept ("slots", which start
//!    at -1e9, unfinished); with `early_stopping = true` nothing is added once every slot holds
//!    a finished hypothesis, and nothing once the early-stop heuristic says no improvement is
//!    possible;
//! 5. the early-stop heuristic: the best running score divided by `L ^ length_penalty` is
//!    compared with the worst finished score (only once all slots hold finished hypotheses);
//!    `L` is the generated length so far, or the maximum generated length with
//!    `early_stopping = "never"` and a positive length penalty. Once no improvement is
//!    possible, that stays so;
//! 6. the search ends when no improvement is possible, or (with `early_stopping = true`) all
//!    slots are finished, or every candidate hit the stopping criteria (maximum length).
//!
//! The answer is the best slot's tokens (EOS included when it ended with one). As in
//! transformers, the first step starts all beams from the same prompt with scores 0 for beam 0
//! and -1e9 for the others, and all scores are f32 with transformers' -1e9 sentinels added in
//! the same order, so that rounding matches. Every `torch.topk` is reproduced with torch's CPU
//! tie order ([`torch_order`](super::torch_order)); candidates are indexed beam-major
//! (`beam * vocab + token`) as in transformers' flattened scores.
//!
//! The model is prefilled with the prompt as one row; after each step it is reordered to the
//! new running beams (`reorder` with each beam's source row; after the first step every source
//! is row 0), then `decode` appends the beams' new tokens.

use super::processors::{log_softmax_in_place, LogitsPipeline};
use super::torch_order::{topk, StreamingTopK};
use super::{check_logits, EarlyStopping, GenerateError, GenerationConfig};
use crate::lm::LanguageModel;

/// transformers' sentinel for impossible scores.
const NEG: f32 = -1.0e9;

/// `x / (len ^ length_penalty)`: the power in f64 (Python), rounded to f32 (torch scalar).
fn length_normalized(score: f32, len: usize, length_penalty: f64) -> f32 {
    score / ((len as f64).powf(length_penalty) as f32)
}

#[derive(Clone)]
struct Slot {
    score: f32,
    finished: bool,
    tokens: Vec<u32>,
}

/// Runs beam search for one prompt and returns its new tokens (at most `budget`).
pub(crate) fn beam_search(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    cfg: &GenerationConfig,
    budget: usize,
    pipeline: &mut LogitsPipeline,
) -> Result<Vec<u32>, GenerateError> {
    let num_beams = cfg.num_beams;
    let vocab = model.vocab_size();
    let eos = &cfg.eos_token_id;
    let beams_to_keep = 2.max(1 + eos.len()) * num_beams;
    let lp = cfg.length_penalty;
    // transformers' max_length - decoder_prompt_len.
    let max_generated = budget;

    let mut logits = model.prefill(&[prompt.to_vec()])?;
    check_logits(&logits, 1, vocab)?;

    // Running beams: generated tokens and f32 scores; beam b reads logits row `rows[b]`.
    let mut running: Vec<Vec<u32>> = vec![Vec::new(); num_beams];
    let mut running_scores: Vec<f32> = (0..num_beams)
        .map(|b| if b == 0 { 0.0 } else { NEG })
        .collect();
    let mut rows: Vec<usize> = vec![0; num_beams];
    let mut slots: Vec<Slot> = vec![
        Slot {
            score: NEG,
            finished: false,
            tokens: Vec::new(),
        };
        num_beams
    ];
    let mut improvement_possible = true;
    let mut generated = 0usize; // cur_len - decoder_prompt_len

    loop {
        // 1. log-softmax + processors, once per distinct model row.
        let distinct_rows = if generated == 0 { 1 } else { num_beams };
        for (r, row) in logits.iter_mut().enumerate().take(distinct_rows) {
            log_softmax_in_place(row);
            if !pipeline.is_empty() {
                pipeline.apply(row, prompt, &running[r]);
            }
        }

        // 2. top-K over beams × vocab (torch.topk on the flattened row, ties in torch's order).
        let total = num_beams * vocab;
        let acc = |b: usize, s: f32| s + running_scores[b];
        let cands: Vec<(f32, usize)> = if beams_to_keep * 64 <= total {
            let mut sel = StreamingTopK::new(beams_to_keep);
            for b in 0..num_beams {
                for &s in &logits[rows[b]] {
                    sel.push(acc(b, s));
                }
            }
            sel.finish()
        } else {
            let flat: Vec<f32> = (0..num_beams)
                .flat_map(|b| logits[rows[b]].iter().map(move |&s| (b, s)))
                .map(|(b, s)| acc(b, s))
                .collect();
            topk(&flat, beams_to_keep)
                .into_iter()
                .map(|i| (flat[i], i))
                .collect()
        };
        let k = cands.len();

        // 3. stopping criteria per candidate (EOS, or the maximum length reached).
        let at_max = generated + 1 >= max_generated;
        let hits: Vec<bool> = cands
            .iter()
            .map(|&(_, i)| at_max || eos.contains(&((i % vocab) as u32)))
            .collect();
        let seq = |j: usize| -> Vec<u32> {
            let (_, i) = cands[j];
            let mut s = running[i / vocab].clone();
            s.push((i % vocab) as u32);
            s
        };

        // e. next running beams.
        let running_log_probs: Vec<f32> = (0..k)
            .map(|j| cands[j].0 + if hits[j] { NEG } else { 0.0 })
            .collect();
        let next = topk(&running_log_probs, num_beams);

        // f. finished hypotheses.
        let all_finished = slots.iter().all(|s| s.finished);
        let mut merged_scores: Vec<f32> = slots.iter().map(|s| s.score).collect();
        for j in 0..k {
            let just_finished = hits[j] && j < num_beams;
            let mut s = length_normalized(cands[j].0, generated + 1, lp);
            if all_finished && cfg.early_stopping == EarlyStopping::AllFinished {
                s += NEG;
            }
            if !improvement_possible {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            merged_scores.push(s);
        }
        let chosen = topk(&merged_scores, num_beams);
        slots = chosen
            .iter()
            .map(|&m| {
                if m < num_beams {
                    slots[m].clone()
                } else {
                    let j = m - num_beams;
                    Slot {
                        score: merged_scores[m],
                        finished: hits[j] && j < num_beams,
                        tokens: seq(j),
                    }
                }
            })
            .collect();

        // New running beams (the source row of each, for the cache).
        let src: Vec<usize> = next.iter().map(|&j| rows[cands[j].1 / vocab]).collect();
        let new_running: Vec<Vec<u32>> = next.iter().map(|&j| seq(j)).collect();
        running_scores = next.iter().map(|&j| running_log_probs[j]).collect();
        running = new_running;
        generated += 1;

        // g. early-stop heuristic and the loop condition.
        let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
            max_generated
        } else {
            generated
        };
        let best_possible = length_normalized(running_scores[0], best_len, lp);
        let min_slot = slots.iter().map(|s| s.score).fold(f32::INFINITY, |m, x| {
            if x.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.min(x)
            }
        });
        let can_improve = slots
            .iter()
            .any(|s| best_possible > if s.finished { min_slot } else { NEG });
        improvement_possible &= can_improve;
        let all_finished = slots.iter().all(|s| s.finished);
        let open = !(all_finished && cfg.early_stopping == EarlyStopping::AllFinished);
        let valid_continuations = !hits.iter().all(|&h| h);
        if !(improvement_possible && open && valid_continuations) {
            break;
        }

        model.reorder(&src)?;
        rows = (0..num_beams).collect();
        let tokens: Vec<u32> = running
            .iter()
            .map(|s| s.last().copied().unwrap_or(0))
            .collect();
        logits = model.decode(&tokens)?;
        check_logits(&logits, num_beams, vocab)?;
    }
    Ok(slots.swap_remove(0).tokens)
}

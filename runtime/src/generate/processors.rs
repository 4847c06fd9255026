//! Logits processors, computed as transformers 5 computes them
//! (`transformers/generation/logits_process.py`) on one row of f32 logits, in place.
//!
//! * [`repetition_penalty`] — `RepetitionPenaltyLogitsProcessor`: every distinct token of the
//!   row's history (prompt and generated tokens; ids outside the vocabulary are ignored, as
//!   transformers clamps them to a dropped column) is penalized once: `s < 0 ? s * p : s / p`.
//! * [`temperature`] — `TemperatureLogitsWarper`: `s / t`, `t` rounded to f32 as torch does with a
//!   Python scalar.
//! * [`top_k`] — `TopKLogitsWarper`: `k = min(max(top_k, min_tokens_to_keep), vocab)`; every
//!   token with `s < kth largest` becomes -inf, so ties with the k-th value are kept.
//! * [`top_p`] — `TopPLogitsWarper`: ascending sort (`torch.sort`, which is *not* stable: equal
//!   scores come out in the order of torch's CPU `std::sort`, reproduced by
//!   [`torch_order`](super::torch_order)), softmax, cumulative sum, tokens whose cumulative
//!   probability is `<= 1 - top_p` become -inf, the last `min_tokens_to_keep` of the ascending
//!   order are always kept.
//! * [`min_p`] — `MinPLogitsWarper`: `p = softmax(s)`; tokens with `p < min_p * max(p)` become
//!   -inf, except the `min_tokens_to_keep` most likely.
//!
//! [`LogitsPipeline`] applies them in the order transformers' `_get_logits_processor` builds
//! them: repetition penalty (all modes, when not 1.0), then, only when sampling, temperature
//! (when not 1.0), top-k (when not 0), top-p (when < 1.0), min-p (when set). With beam search
//! (no sampling) only the repetition penalty applies, to log-probabilities.
//!
//! # Arithmetic
//!
//! Scores stay f32 as in transformers (which casts logits to f32 before processing). Python
//! float parameters are rounded to f32 where torch rounds them (tensor-scalar arithmetic);
//! `1 - top_p` is computed in f64 and then rounded, as Python does before the comparison.
//! Softmax probabilities are computed in f64 and rounded to f32, and the top-p cumulative sum
//! is accumulated in f64 and rounded to f32 after every addition, which is what torch's CPU
//! `cumsum` does. torch's CPU softmax uses a fast, slightly inexact `exp` (relative error about
//! 4e-6), so kiln's probabilities agree with torch's to about 1e-5 relative, not bit for bit; a
//! token whose cumulative probability lies within that distance of the top-p threshold can be
//! kept by one and dropped by the other. NaN scores sort as the largest values, as in torch.

use super::torch_order::{sort_ascending, Pair};
use std::cmp::Ordering;

/// Orders f32 values with NaN above everything (torch's sort and topk order).
pub(crate) fn cmp_nan_max(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Index of the largest value, the first one on ties; a NaN counts as the largest (as
/// `torch.argmax`). 0 for an empty slice.
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in scores.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > scores[best] {
            best = i;
        }
    }
    best
}

/// The maximum, NaN if any value is NaN, -inf for no values.
fn max_nan(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(f32::NEG_INFINITY, |m, x| {
        if x.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

/// Softmax of `scores` into `out`: f64 arithmetic, rounded to f32.
pub(crate) fn softmax_into(scores: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let max = f64::from(max_nan(scores.iter().copied()));
    let sum: f64 = scores.iter().map(|&x| libm::exp(f64::from(x) - max)).sum();
    out.extend(
        scores
            .iter()
            .map(|&x| (libm::exp(f64::from(x) - max) / sum) as f32),
    );
}

/// In-place log-softmax of one row: `x - max - ln(sum(exp(x - max)))`, the sum in f64.
pub(crate) fn log_softmax_in_place(scores: &mut [f32]) {
    let max = max_nan(scores.iter().copied());
    let sum: f64 = scores.iter().map(|&x| libm::exp(f64::from(x - max))).sum();
    let lse = libm::log(sum) as f32;
    for x in scores.iter_mut() {
        *x = (*x - max) - lse;
    }
}

/// `RepetitionPenaltyLogitsProcessor` over a row whose history is `prompt` then `generated`.
pub fn repetition_penalty(scores: &mut [f32], prompt: &[u32], generated: &[u32], penalty: f64) {
    let mut seen = Vec::new();
    repetition_penalty_with(scores, prompt, generated, penalty as f32, &mut seen);
}

/// Penalizes each distinct in-vocabulary id of the history once; `seen` is scratch space.
fn repetition_penalty_with(
    scores: &mut [f32],
    prompt: &[u32],
    generated: &[u32],
    p: f32,
    seen: &mut Vec<u32>,
) {
    let v = scores.len();
    seen.clear();
    seen.extend(
        prompt
            .iter()
            .chain(generated)
            .copied()
            .filter(|&t| (t as usize) < v),
    );
    seen.sort_unstable();
    seen.dedup();
    for &t in seen.iter() {
        let s = &mut scores[t as usize];
        *s = if *s < 0.0 { *s * p } else { *s / p };
    }
}

/// `TemperatureLogitsWarper`: divides every score by `t` (rounded to f32).
pub fn temperature(scores: &mut [f32], t: f64) {
    let t = t as f32;
    for s in scores.iter_mut() {
        *s /= t;
    }
}

/// `TopKLogitsWarper` with the given `min_tokens_to_keep`.
pub fn top_k(scores: &mut [f32], k: usize, min_tokens_to_keep: usize) {
    let mut scratch = Vec::new();
    top_k_with(scores, k, min_tokens_to_keep, &mut scratch);
}

fn top_k_with(scores: &mut [f32], k: usize, min_tokens_to_keep: usize, scratch: &mut Vec<f32>) {
    let k = k.max(min_tokens_to_keep).min(scores.len());
    if k == 0 || k == scores.len() {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(scores);
    // Descending order: the k-th largest lands at index k - 1.
    let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| cmp_nan_max(*b, *a));
    let kth = *kth;
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper` with the given `min_tokens_to_keep`.
pub fn top_p(scores: &mut [f32], p: f64, min_tokens_to_keep: usize) {
    let mut pairs = Vec::new();
    top_p_with(scores, p, min_tokens_to_keep, &mut pairs);
}

fn top_p_with(scores: &mut [f32], p: f64, min_tokens_to_keep: usize, pairs: &mut Vec<Pair>) {
    // torch.sort(scores, descending=False): ties in torch's CPU order.
    sort_ascending(scores, pairs);
    // softmax of the sorted scores (f64, each probability rounded to f32), then the cumulative
    // sum accumulated in f64 and rounded to f32 at every step (torch's CPU cumsum).
    let max = f64::from(max_nan(pairs.iter().map(|&(v, _)| v)));
    let sum: f64 = pairs
        .iter()
        .map(|&(v, _)| libm::exp(f64::from(v) - max))
        .sum();
    let threshold = (1.0 - p) as f32;
    let keep_from = scores.len().saturating_sub(min_tokens_to_keep);
    // The cumulative sum never decreases, so the removed tokens are a prefix of the order.
    let mut cum = 0.0f64;
    let mut removed = 0;
    for &(v, _) in pairs.iter().take(keep_from) {
        let prob = (libm::exp(f64::from(v) - max) / sum) as f32;
        cum += f64::from(prob);
        if (cum as f32) <= threshold {
            removed += 1;
        } else {
            break;
        }
    }
    for &(_, i) in &pairs[..removed] {
        scores[i] = f32::NEG_INFINITY;
    }
}

/// `MinPLogitsWarper` with the given `min_tokens_to_keep`.
pub fn min_p(scores: &mut [f32], min_p: f64, min_tokens_to_keep: usize) {
    let mut probs = Vec::new();
    let mut order = Vec::new();
    min_p_with(scores, min_p, min_tokens_to_keep, &mut probs, &mut order);
}

fn min_p_with(
    scores: &mut [f32],
    min_p: f64,
    min_tokens_to_keep: usize,
    probs: &mut Vec<f32>,
    order: &mut Vec<u32>,
) {
    softmax_into(scores, probs);
    let top = max_nan(probs.iter().copied());
    let threshold = (min_p as f32) * top;
    let k = min_tokens_to_keep.min(probs.len());
    // The `k` most likely tokens are kept whatever their probability (descending; among equal
    // probabilities the lower index first).
    order.clear();
    if k == 1 {
        order.push(argmax(probs) as u32);
    } else if k > 1 {
        order.extend(0..probs.len() as u32);
        order.sort_by(|&a, &b| cmp_nan_max(probs[b as usize], probs[a as usize]));
        order.truncate(k);
    }
    for (i, s) in scores.iter_mut().enumerate() {
        if probs[i] < threshold && !order.contains(&(i as u32)) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// One of the processors, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Processor {
    /// `RepetitionPenaltyLogitsProcessor(penalty)`.
    RepetitionPenalty(f64),
    /// `TemperatureLogitsWarper(temperature)`.
    Temperature(f64),
    /// `TopKLogitsWarper(top_k, min_tokens_to_keep)`.
    TopK(usize, usize),
    /// `TopPLogitsWarper(top_p, min_tokens_to_keep)`.
    TopP(f64, usize),
    /// `MinPLogitsWarper(min_p, min_tokens_to_keep)`.
    MinP(f64, usize),
}

impl Processor {
    /// transformers' class name for this processor.
    pub fn hf_name(&self) -> &'static str {
        match self {
            Processor::RepetitionPenalty(_) => "RepetitionPenaltyLogitsProcessor",
            Processor::Temperature(_) => "TemperatureLogitsWarper",
            Processor::TopK(..) => "TopKLogitsWarper",
            Processor::TopP(..) => "TopPLogitsWarper",
            Processor::MinP(..) => "MinPLogitsWarper",
        }
    }
}

/// The processors a configuration uses, in transformers' order, with reusable scratch space
/// (no allocation per step after the first).
#[derive(Debug, Clone, Default)]
pub struct LogitsPipeline {
    processors: Vec<Processor>,
    ids: Vec<u32>,
    floats: Vec<f32>,
    pairs: Vec<Pair>,
}

impl LogitsPipeline {
    /// A pipeline applying exactly these processors, in this order.
    pub fn new(processors: Vec<Processor>) -> Self {
        LogitsPipeline {
            processors,
            ids: Vec::new(),
            floats: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// The pipeline transformers' `_get_logits_processor` builds for this configuration
    /// (`min_tokens_to_keep` is 1: kiln has no beam sampling).
    pub fn from_config(cfg: &super::GenerationConfig) -> Self {
        let mut p = Vec::new();
        if cfg.repetition_penalty != 1.0 {
            p.push(Processor::RepetitionPenalty(cfg.repetition_penalty));
        }
        if cfg.do_sample {
            if cfg.temperature != 1.0 {
                p.push(Processor::Temperature(cfg.temperature));
            }
            if cfg.top_k != 0 {
                p.push(Processor::TopK(cfg.top_k, 1));
            }
            if cfg.top_p < 1.0 {
                p.push(Processor::TopP(cfg.top_p, 1));
            }
            if let Some(m) = cfg.min_p {
                p.push(Processor::MinP(m, 1));
            }
        }
        Self::new(p)
    }

    /// The processors, in order.
    pub fn processors(&self) -> &[Processor] {
        &self.processors
    }

    /// True when the pipeline leaves scores unchanged.
    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }

    /// Applies the pipeline to one row whose history is `prompt` followed by `generated`.
    pub fn apply(&mut self, scores: &mut [f32], prompt: &[u32], generated: &[u32]) {
        for &proc in &self.processors {
            match proc {
                Processor::RepetitionPenalty(pen) => {
                    repetition_penalty_with(scores, prompt, generated, pen as f32, &mut self.ids)
                }
                Processor::Temperature(t) => temperature(scores, t),
                Processor::TopK(k, keep) => top_k_with(scores, k, keep, &mut self.floats),
                Processor::TopP(p, keep) => top_p_with(scores, p, keep, &mut self.pairs),
                Processor::MinP(m, keep) => {
                    min_p_with(scores, m, keep, &mut self.floats, &mut self.ids)
                }
            }
        }
    }
}

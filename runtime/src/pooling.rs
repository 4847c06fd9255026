//! Sentence embeddings from an encoder's `last_hidden_state`, as sentence-transformers computes
//! them: its `Pooling` module (and an optional `Normalize`). Reading a sentence-transformers
//! directory's settings lives in `kiln_models::pooling::load`; artifacts carry the settings in
//! their metadata.
//!
//! [`pool`] follows `Pooling._forward_padded` and `Normalize.forward` on f32 tensors: sums are
//! accumulated exactly (in f64) and rounded to f32 once, then combined with f32 operations in
//! the same order as sentence-transformers (counts clamped to at least `1e-9`; L2 norms to at
//! least `1e-12`).

use serde::{Deserialize, Serialize};

/// How token embeddings become one vector (sentence-transformers' `pooling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingMode {
    /// `cls`: the first non-padding token.
    Cls,
    /// `max`: elementwise maximum over the non-padding tokens.
    Max,
    /// `mean`: mean over the non-padding tokens.
    Mean,
    /// `mean_sqrt_len_tokens`: sum over the non-padding tokens divided by `sqrt(count)`.
    MeanSqrtLen,
    /// `weightedmean`: mean weighted by position (1, 2, ... from the first non-padding token).
    WeightedMean,
    /// `lasttoken`: the last non-padding token.
    LastToken,
}

impl PoolingMode {
    /// The modes with their sentence-transformers names.
    pub const ALL: [(&'static str, PoolingMode); 6] = [
        ("cls", PoolingMode::Cls),
        ("max", PoolingMode::Max),
        ("mean", PoolingMode::Mean),
        ("mean_sqrt_len_tokens", PoolingMode::MeanSqrtLen),
        ("weightedmean", PoolingMode::WeightedMean),
        ("lasttoken", PoolingMode::LastToken),
    ];

    /// The legacy boolean keys of `config.json`, in sentence-transformers' order.
    pub const LEGACY_KEYS: [(&'static str, PoolingMode); 6] = [
        ("pooling_mode_cls_token", PoolingMode::Cls),
        ("pooling_mode_max_tokens", PoolingMode::Max),
        ("pooling_mode_mean_tokens", PoolingMode::Mean),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            PoolingMode::MeanSqrtLen,
        ),
        (
            "pooling_mode_weightedmean_tokens",
            PoolingMode::WeightedMean,
        ),
        ("pooling_mode_lasttoken", PoolingMode::LastToken),
    ];

    /// The mode called `name` in sentence-transformers.
    pub fn from_name(name: &str) -> Option<PoolingMode> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|&(_, m)| m)
    }

    /// Its sentence-transformers name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("mean", |&(n, _)| n)
    }
}

/// A sentence-transformers pooling pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pooling {
    /// The pooling mode.
    pub mode: PoolingMode,
    /// L2-normalize the pooled vector (a `Normalize` module follows `Pooling`).
    pub normalize: bool,
}

impl Default for Pooling {
    /// Mean pooling without normalization: what sentence-transformers uses for a plain
    /// transformers model.
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

/// Pools `hidden` (`[batch, seq, dim]`, row-major) under the 0/1 `mask` (`[batch, seq]`) into
/// one vector per row, as sentence-transformers' `Pooling` (and `Normalize` if
/// `pooling.normalize`) does.
///
/// # Panics
/// If `hidden.len() != batch * seq * dim` or `mask.len() != batch * seq` (a caller's bug: both
/// come from the same batch).
pub fn pool(
    hidden: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    dim: usize,
    pooling: &Pooling,
) -> Vec<Vec<f32>> {
    assert_eq!(
        hidden.len(),
        batch * seq * dim,
        "pool: hidden is not [batch, seq, dim]"
    );
    assert_eq!(mask.len(), batch * seq, "pool: mask is not [batch, seq]");
    (0..batch)
        .map(|r| {
            let h = &hidden[r * seq * dim..(r + 1) * seq * dim];
            let m = &mask[r * seq..(r + 1) * seq];
            let mut v = pool_row(h, m, seq, dim, pooling.mode);
            if pooling.normalize {
                l2_normalize(&mut v);
            }
            v
        })
        .collect()
}

/// Index of the first maximum of `m` (`torch.argmax`; 0 for an empty row).
fn argmax_first(m: &[i64]) -> usize {
    let mut best = 0;
    for (j, &x) in m.iter().enumerate() {
        if x > m[best] {
            best = j;
        }
    }
    best
}

/// `sum_j w_j * h[j, :]` with the products rounded to f32 (as the f32 tensor product) and the
/// sum accumulated exactly, then rounded to f32.
fn weighted_sum(h: &[f32], weights: &[f32], dim: usize) -> Vec<f32> {
    let mut acc = vec![0f64; dim];
    for (j, &w) in weights.iter().enumerate() {
        for (a, &x) in acc.iter_mut().zip(&h[j * dim..(j + 1) * dim]) {
            *a += f64::from(x * w);
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

fn pool_row(h: &[f32], m: &[i64], seq: usize, dim: usize, mode: PoolingMode) -> Vec<f32> {
    let row = |j: usize| h[j * dim..(j + 1) * dim].to_vec();
    match mode {
        PoolingMode::Cls => {
            if seq == 0 {
                return vec![0.0; dim];
            }
            row(argmax_first(m))
        }
        PoolingMode::Max => {
            let mut out = vec![f32::NEG_INFINITY; dim];
            for j in (0..seq).filter(|&j| m[j] != 0) {
                for (o, &x) in out.iter_mut().zip(&h[j * dim..(j + 1) * dim]) {
                    // torch.max propagates NaN.
                    if x.is_nan() || x > *o {
                        *o = x;
                    }
                }
            }
            out
        }
        PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
            let w: Vec<f32> = m.iter().map(|&x| x as f32).collect();
            let sum = weighted_sum(h, &w, dim);
            let count = (w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32).max(1e-9);
            let denom = if mode == PoolingMode::Mean {
                count
            } else {
                count.sqrt()
            };
            sum.into_iter().map(|s| s / denom).collect()
        }
        PoolingMode::WeightedMean => {
            let pad = argmax_first(m) as f32;
            let w: Vec<f32> = m
                .iter()
                .enumerate()
                .map(|(j, &x)| x as f32 * ((j + 1) as f32 - pad))
                .collect();
            let sum = weighted_sum(h, &w, dim);
            let total = (w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32).max(1e-9);
            sum.into_iter().map(|s| s / total).collect()
        }
        PoolingMode::LastToken => {
            if seq == 0 {
                return vec![0.0; dim];
            }
            // mask.flip(1).max(1): the last maximum; an all-zero row picks index 0 (zeros after
            // masking).
            let max = m.iter().copied().max().unwrap_or(0);
            let j = if max == 0 {
                0
            } else {
                m.iter().rposition(|&x| x == max).unwrap_or(0)
            };
            let w = m[j] as f32;
            row(j).into_iter().map(|x| x * w).collect()
        }
    }
}

/// `x / max(||x||_2, 1e-12)` (`torch.nn.functional.normalize`), the norm accumulated exactly
/// and rounded to f32.
fn l2_normalize(v: &mut [f32]) {
    let norm = (v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt() as f32)
        .max(1e-12);
    for x in v.iter_mut() {
        *x /= norm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_like_sentence_transformers() {
        // Two rows of three tokens, dim 2; row 1 is left-padded, row 0 right-padded.
        let h = [
            1.0, 2.0, 3.0, -4.0, 100.0, 100.0, 100.0, 100.0, 5.0, 6.0, 7.0, -8.0,
        ];
        let m = [1, 1, 0, 0, 1, 1];
        let p = |mode, normalize| pool(&h, &m, 2, 3, 2, &Pooling { mode, normalize });
        assert_eq!(
            p(PoolingMode::Mean, false),
            vec![vec![2.0, -1.0], vec![6.0, -1.0]]
        );
        assert_eq!(
            p(PoolingMode::Cls, false),
            vec![vec![1.0, 2.0], vec![5.0, 6.0]]
        );
        assert_eq!(
            p(PoolingMode::LastToken, false),
            vec![vec![3.0, -4.0], vec![7.0, -8.0]]
        );
        assert_eq!(
            p(PoolingMode::Max, false),
            vec![vec![3.0, 2.0], vec![7.0, 6.0]]
        );
        let s = 2f32.sqrt();
        assert_eq!(
            p(PoolingMode::MeanSqrtLen, false)[0],
            vec![4.0 / s, -2.0 / s]
        );
        // weights 1, 2 from the first real token: (1*[5,6] + 2*[7,-8]) / 3.
        assert_eq!(
            p(PoolingMode::WeightedMean, false)[1],
            vec![19.0 / 3.0, -10.0 / 3.0]
        );
        let n = p(PoolingMode::Mean, true);
        let norm = 5f32.sqrt();
        assert_eq!(n[0], vec![2.0 / norm, -1.0 / norm]);
        // An all-padding row: mean 0 (count clamped), normalize leaves zeros.
        let z = pool(
            &[1.0, 2.0],
            &[0],
            1,
            1,
            2,
            &Pooling {
                mode: PoolingMode::Mean,
                normalize: true,
            },
        );
        assert_eq!(z, vec![vec![0.0, 0.0]]);
    }
}

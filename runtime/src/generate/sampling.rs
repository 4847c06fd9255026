//! Choosing the next token from processed scores: greedy argmax or a seeded multinomial draw.
//!
//! * Greedy: [`argmax`] — the first index among equal maxima (as `torch.argmax`), a NaN counting
//!   as the maximum.
//! * Sampling: the probabilities are the softmax of the processed f32 scores computed in **f64**
//!   (`exp(s - max) / sum`, with the pure-Rust `libm` `exp`, so every platform gets the same bits);
//!   tokens filtered to -inf have probability exactly 0 and are never drawn. One uniform number
//!   `u` in [0, 1) is drawn per token from a [`ChaCha8Rng`] (53 random bits: `next_u64() >> 11`
//!   scaled by 2^-53), and the token is the first whose running sum of weights exceeds
//!   `u * total`.
//!
//! Each row has its own random stream: the ChaCha8 key is the user's seed (its 8 little-endian
//! bytes, then zeros) and the stream number is the row index, so a row's tokens depend only on
//! the seed, its row index and its own scores — not on the other rows of the batch, nor on when
//! they finish. The same seed gives the same tokens on every platform. kiln does not try to
//! reproduce torch's random generator: sampled text differs from transformers' for the same
//! seed; only the distribution is the same.

use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use super::processors::argmax;

/// A seeded random stream for one row of a batch.
#[derive(Debug, Clone)]
pub struct RowSampler {
    rng: ChaCha8Rng,
    weights: Vec<f64>,
}

impl RowSampler {
    /// The stream for `row` under `seed`.
    pub fn new(seed: u64, row: usize) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(row as u64);
        RowSampler {
            rng,
            weights: Vec::new(),
        }
    }

    /// A uniform number in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Draws a token from the softmax of `scores`. `None` when no token has a positive, finite
    /// probability (every score -inf, or a NaN / +inf among them).
    pub fn sample(&mut self, scores: &[f32]) -> Option<u32> {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() || scores.iter().any(|x| x.is_nan()) {
            return None;
        }
        let max = f64::from(max);
        self.weights.clear();
        self.weights
            .extend(scores.iter().map(|&s| libm::exp(f64::from(s) - max)));
        let total: f64 = self.weights.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return None;
        }
        let target = self.uniform() * total;
        let mut cum = 0.0;
        let mut last_positive = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                cum += w;
                last_positive = Some(i);
                if target < cum {
                    return Some(i as u32);
                }
            }
        }
        // Rounding can leave `target` at or just above the final sum.
        last_positive.map(|i| i as u32)
    }
}

//! A Llama of 7B shape (32 layers, hidden 4096; config only, no weights) optimizes within the
//! limits; the time is printed (`--nocapture`), not asserted. The prefill graph applies the
//! final norm twice (every position's logits, and `last_logits`).

mod common;

use common::{count, heads, optimize_config};

/// A 7B-shaped Llama config (the shape of Llama 2 7B), shared with `benches/optimize.rs`.
const LLAMA_7B: &str = include_str!("../../tests/fixtures/configs/llama-7b/config.json");

#[test]
fn llama_7b_shape_optimizes() {
    for (which, h) in optimize_config(LLAMA_7B, "llama 7B") {
        assert_eq!(count(&h, "rmsnorm"), 2 * 32 + heads(&h), "{which}");
    }
}

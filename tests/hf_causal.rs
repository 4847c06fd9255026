//! Causal LM families against transformers (fixtures from `scripts/reference/hf_fixtures.py`):
//! full-prompt logits within 1e-4, and prefill + decode steps through the KV cache equal to the
//! full forward pass.

mod common;

use common::{fixture, ids, max_abs, reference};
use kiln::load::{causal_lm, causal_lm_with, LoadOptions};
use kiln::runtime::LanguageModel;

const FAMILIES: [&str; 9] = [
    "llama",
    "llama_tied",
    "llama_rope_linear",
    "llama_rope_dynamic",
    "llama_rope_llama3",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
];

/// Tolerance for logits against transformers (f32 on both sides, different summation orders).
const TOL: f32 = 1e-4;

/// Both the traced graph as it is and the optimized one (the default) match transformers.
#[test]
fn prompt_logits_match_transformers() {
    for name in FAMILIES {
        let (r, tensors) = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let n = prompt.len();
        let want = tensors.load("logits").unwrap();
        for optimize in [false, true] {
            let opts = LoadOptions {
                optimize,
                ..Default::default()
            };
            let logits = causal_lm_with(&fixture(name), &opts)
                .unwrap()
                .model
                .lm
                .forward(&prompt)
                .unwrap();
            assert_eq!(logits.shape(), want.shape(), "{name}");
            let err = max_abs(logits.as_f32().unwrap(), want.as_f32().unwrap());
            eprintln!(
                "{name} (optimize {optimize}): prompt of {n} tokens, logits max abs error {err:e}"
            );
            assert!(err <= TOL, "{name}: logits max abs error {err:e} > {TOL:e}");
        }
    }
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    // Dynamic NTK RoPE is excluded by design: its frequencies depend on the current length, so
    // cached keys keep the frequencies of the step that computed them, in transformers too
    // (its greedy continuation is checked against transformers' cached `generate` instead).
    for name in FAMILIES.into_iter().filter(|n| *n != "llama_rope_dynamic") {
        let (r, tensors) = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = tensors.load("logits").unwrap();
        let want = want.as_f32().unwrap();
        let vocab = want.len() / prompt.len();
        let mut model = causal_lm(&fixture(name)).unwrap();
        let split = prompt.len() / 2;
        let first = model.model.lm.prefill(&[prompt[..split].to_vec()]).unwrap();
        let row = |i: usize| &want[i * vocab..(i + 1) * vocab];
        let mut worst = max_abs(&first[0], row(split - 1));
        for (i, &tok) in prompt.iter().enumerate().skip(split) {
            let logits = model.model.lm.decode(&[tok]).unwrap();
            worst = worst.max(max_abs(&logits[0], row(i)));
        }
        assert!(worst <= TOL, "{name}: cached decoding differs by {worst:e}");
    }
}

//! The CPU plan's kernels per decoder layer for the Llama-shaped families (issue 4's "a Llama
//! decoder layer ends as ≤ 8 kernels"), on the decode graphs as `kiln` loads them in f32, bf16
//! and fp8: the last decoder layer (from its first rmsnorm to the final norm; the first layer
//! also holds the model-wide rotary tables and mask) is exactly rmsnorm, the QKV group (with
//! RoPE, bf16 rounding and the KV-cache appends), attention, o_proj + residual, rmsnorm,
//! gate/up with SwiGLU and down_proj + residual: 7 kernels. Free steps (aliases, views) and
//! nodes computed by another step are not kernels. Results are checked elsewhere
//! (`cpu_backend.rs`, `runtime/tests/cpu_steps.rs`).

use kiln::load::{causal_lm_with, LoadOptions};
use kiln_compiler::precision::Precision;
use kiln_runtime::cpu::{CpuGraph, Step};
use std::path::PathBuf;

#[test]
fn a_llama_decoder_layer_is_seven_kernels() {
    for fixture in ["llama", "mistral", "qwen2"] {
        for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hf")
                .join(fixture);
            let opts = LoadOptions {
                precision,
                ..LoadOptions::default()
            };
            let m = causal_lm_with(&dir, &opts).unwrap();
            let lm = &m.model.lm;
            let decode = lm.graphs()[1].graph().clone();
            let cpu = CpuGraph::compile(vec![decode], lm.params()).unwrap();
            let kernels: Vec<(usize, String)> = cpu[0]
                .plan()
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    !matches!(
                        s,
                        Step::Source | Step::Skip | Step::Grouped | Step::Alias | Step::View
                    )
                })
                .map(|(i, s)| (i, s.name()))
                .collect();
            let norms: Vec<usize> = kernels
                .iter()
                .filter(|(_, n)| n == "rmsnorm")
                .map(|(i, _)| *i)
                .collect();
            let what = format!("{fixture} {}", precision.name());
            assert!(
                norms.len() >= 5 && norms.len() % 2 == 1,
                "{what}: {norms:?}"
            );
            let (start, end) = (norms[norms.len() - 3], norms[norms.len() - 1]);
            let layer: Vec<&str> = kernels
                .iter()
                .filter(|(i, _)| (start..end).contains(i))
                .map(|(_, n)| n.split(' ').next().unwrap_or_default())
                .collect();
            assert_eq!(
                layer,
                [
                    "rmsnorm",
                    "linear",
                    "attention",
                    "linear",
                    "rmsnorm",
                    "linear",
                    "linear"
                ],
                "{what}: {kernels:?}"
            );
        }
    }
}

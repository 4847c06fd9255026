//! The CPU plan's kernels per decoder layer for the Llama-shaped families (issue 4's "a Llama
//! decoder layer ends as ≤ 8 kernels"), on the decode graphs as `kiln` loads them in f32, bf16
//! and fp8: the last decoder layer (from its first rmsnorm to the final norm; the first layer
//! also holds the model-wide rotary tables and mask) is exactly rmsnorm, the QKV group (with
//! RoPE, bf16 rounding and the KV-cache appends), attention, o_proj + residual, rmsnorm,
//! gate/up with SwiGLU and down_proj + residual: 7 kernels. Free steps (aliases, views) and
//! nodes computed by another step are not kernels. Results are checked elsewhere
//! (`cpu_backend.rs`, `runtime/tests/cpu_steps.rs`).
//!
//! Encoders (bert, distilbert) and GPT-2: a layer's biases, residual adds and GELUs are its
//! linear layers' epilogues, so a layer holds no elementwise step (`fused`).

use kiln::load::{causal_lm_with, encoder_with, LoadOptions};
use kiln_compiler::precision::Precision;
use kiln_ir::Op;
use kiln_runtime::cpu::{CpuGraph, Step};
use std::path::PathBuf;

#[test]
fn a_llama_decoder_layer_is_seven_kernels() {
    for fixture in ["llama", "mistral", "qwen2"] {
        for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            let dir = fixture_dir(fixture);
            let opts = LoadOptions {
                precision,
                ..LoadOptions::default()
            };
            let m = causal_lm_with(&dir, &opts).unwrap();
            let lm = &m.model.lm;
            let decode = lm.graphs()[1].graph().clone();
            let cpu = CpuGraph::compile(vec![decode], lm.params()).unwrap();
            let kernels = kernels(&cpu[0]);
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

/// The fixture directory of a family.
fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// The kernels of a plan: `(node, name)` of every step that computes (not sources, skipped or
/// grouped nodes, aliases or views).
fn kernels(cpu: &CpuGraph) -> Vec<(usize, String)> {
    cpu.plan()
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
        .collect()
}

/// The kernels of the second layer of a 2-layer fixture: after its third layernorm, up to and
/// including its fifth (embedding norm or not, each layer holds two).
fn second_layer(kernels: &[(usize, String)]) -> Vec<(usize, &str)> {
    let norms: Vec<usize> = kernels
        .iter()
        .filter(|(_, n)| n == "layernorm")
        .map(|(i, _)| *i)
        .collect();
    assert!(norms.len() >= 5, "{kernels:?}");
    kernels
        .iter()
        .filter(|(i, _)| *i > norms[2] && *i <= norms[4])
        .map(|(i, n)| (*i, n.split(' ').next().unwrap_or_default()))
        .collect()
}

#[test]
fn encoder_and_gpt2_layers_have_no_elementwise_steps() {
    for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
        let opts = LoadOptions {
            precision,
            ..LoadOptions::default()
        };
        for fixture in ["bert", "distilbert"] {
            let enc = encoder_with(&fixture_dir(fixture), &opts).unwrap();
            let (graph, params) = enc.model.runner.parts();
            let cpu = CpuGraph::compile(vec![graph.clone()], params).unwrap();
            let kernels = kernels(&cpu[0]);
            let layer: Vec<&str> = second_layer(&kernels).iter().map(|k| k.1).collect();
            // The QKV group, attention, o_proj + bias + residual, norm, the first MLP layer +
            // bias + GELU, the second + bias + residual, norm.
            assert_eq!(
                layer,
                [
                    "linear",
                    "attention",
                    "linear",
                    "layernorm",
                    "linear",
                    "linear",
                    "layernorm"
                ],
                "{fixture} {}: {kernels:?}",
                precision.name()
            );
        }
        let m = causal_lm_with(&fixture_dir("gpt2"), &opts).unwrap();
        let lm = &m.model.lm;
        let decode = lm.graphs()[1].graph().clone();
        let cpu = CpuGraph::compile(vec![decode], lm.params()).unwrap();
        let kernels = kernels(&cpu[0]);
        let layer = second_layer(&kernels);
        // ln_1 … ln_f: c_attn, attention, c_proj + bias + residual, ln_2, c_fc + bias + GELU,
        // c_proj + bias + residual; the only elementwise steps are bf16 roundings.
        let what = format!("gpt2 {}: {layer:?}", precision.name());
        let linear = layer.iter().filter(|k| k.1 == "linear").count();
        assert_eq!(linear, 4, "{what}");
        for (i, _) in layer.iter().filter(|k| k.1 == "fused") {
            let op = &cpu[0].graph().nodes()[*i].op;
            assert!(matches!(op, Op::Cast { .. }), "{what}: %{i} is {op:?}");
        }
    }
}

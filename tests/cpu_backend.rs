//! The CPU backend against the reference executor on every Hugging Face family fixture: the
//! optimized (and precision-lowered) graphs as `kiln` loads them, run by both on the same
//! random inputs (batch 2, 3 new tokens after 2 cached ones for decode graphs). f32 outputs
//! agree within 1e-5 of each output's largest magnitude (the kernels accumulate in f32, the
//! reference in f64); bf16 and fp8 graphs within 2e-2, because a last-bit difference before a
//! rounding to bf16 moves that value by one bf16 step (2^-8 relative).

#[path = "../compiler/tests/common/mod.rs"]
mod optimized;

use kiln::load::{causal_lm_with, encoder_with, LoadOptions};
use kiln_compiler::precision::Precision;
use kiln_runtime::reference::{self, ParamSource};
use kiln_runtime::GraphExecutor;
use kiln_runtime::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;

const FAMILIES: [&str; 9] = [
    "llama",
    "llama_tied",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
    "bert",
    "bert_cls",
    "distilbert",
];

fn path(fixture: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(fixture)
}

/// Largest |got - want| over the largest |want|, per output, must stay within `tol`.
fn assert_close(
    label: &str,
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    tol: f64,
) {
    assert_eq!(got.len(), want.len(), "{label}: outputs");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape(), w.shape(), "{label} {name}: shape");
        assert_eq!(g.dtype(), w.dtype(), "{label} {name}: dtype");
        let (g, w) = (g.to_f64_vec(), w.to_f64_vec());
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        let err = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        assert!(
            err <= tol * scale,
            "{label} {name}: max error {err:e} over scale {scale:e} exceeds {tol:e}"
        );
    }
}

fn check(plan: &dyn GraphExecutor, params: &dyn ParamSource, label: &str, tol: f64) {
    let inputs = optimized::inputs(plan.graph());
    let want = reference::run(plan.graph(), &inputs, params).unwrap();
    let got = plan.run_host(&inputs, params).unwrap();
    assert_close(label, &got, &want, tol);
    // A second run reuses the buffers and gives the same result.
    let again = plan.run_host(&inputs, params).unwrap();
    assert_eq!(again, got, "{label}: second run");
}

fn family(fixture: &str, precision: Precision, tol: f64) {
    let opts = LoadOptions {
        precision,
        ..LoadOptions::default()
    };
    let label = format!("{fixture} {}", precision.name());
    match causal_lm_with(&path(fixture), &opts) {
        Ok(m) => {
            let lm = &m.model.lm;
            for (g, which) in lm.graphs().into_iter().zip(["prefill", "decode"]) {
                check(g, lm.params(), &format!("{label} {which}"), tol);
            }
        }
        Err(_) => {
            let e = encoder_with(&path(fixture), &opts).unwrap();
            let runner = &e.model.runner;
            check(runner.plan(), runner.parts().1, &label, tol);
        }
    }
}

#[test]
fn f32_matches_the_reference_executor() {
    for f in FAMILIES {
        family(f, Precision::F32, 1e-5);
    }
}

#[test]
fn bf16_matches_the_reference_executor() {
    for f in FAMILIES {
        family(f, Precision::Bf16, 2e-2);
    }
}

#[test]
fn fp8_matches_the_reference_executor() {
    for f in FAMILIES {
        family(f, Precision::Fp8, 2e-2);
    }
}

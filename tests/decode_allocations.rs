//! Heap allocations per decode token (issue 5's "no allocation inside the decode loop"): a
//! counting global allocator around `System` counts every allocation and reallocation on every
//! thread (the kernels' pool helpers included) while the Llama fixture, loaded as `kiln` loads
//! it in f32, bf16 and fp8, decodes one token at a time through [`GraphLm`]'s
//! [`LanguageModel::decode_into`] after a few warm-up steps: none, in any layer or at the
//! `GraphLm` boundary (inputs and outputs by position, the step's tensors, state handles and
//! logits reused). The generation loop around it allocates only to grow its vectors.
//!
//! `KILN_BENCH_MODEL=~/.cache/kiln/llama125m cargo bench --bench decode_allocations` prints the
//! same figures for another model (the counting is `common/allocations.rs`).

#[path = "common/allocations.rs"]
mod allocations;
mod common;

use allocations::{per_generated, per_step, PRECISIONS};
use kiln_compiler::precision::Precision;
use std::path::PathBuf;

/// A copy of the Llama fixture whose config keeps only its first `layers` decoder layers (the
/// later layers' weights are left unread).
fn llama_with_layers(layers: usize) -> PathBuf {
    let src = common::fixture("llama");
    let dir = std::env::temp_dir().join(format!(
        "kiln-decode-allocations-{}-{layers}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["num_hidden_layers"] = layers.into();
    std::fs::write(&config, json.to_string()).unwrap();
    dir
}

/// Allocations per decode step of the Llama fixture with 1 and 2 layers: none in f32, on
/// any machine; in bf16 and fp8 none where the packed bf16 tiles run (AVX2 and FMA or
/// AVX512-BF16; the portable fallback of the bf16 GEMM unpacks each weight per call, into
/// new vectors).
#[test]
fn a_decode_step_allocates_nothing() {
    let dirs = [llama_with_layers(1), common::fixture("llama")];
    let mut counts = Vec::new();
    for precision in PRECISIONS {
        let [one, two] = dirs.clone().map(|d| per_step(&d, precision, 8, 16));
        println!(
            "llama fixture {}: {one} allocations per decode step with 1 layer, {two} with 2",
            precision.name()
        );
        counts.push((precision, one, two));
    }
    std::fs::remove_dir_all(&dirs[0]).unwrap();
    let wide = kiln_kernels::Isa::best() >= kiln_kernels::Isa::Avx2;
    for (precision, one, two) in counts {
        if precision == Precision::F32 || wide {
            assert_eq!((one, two), (0, 0), "{}", precision.name());
        }
    }
}

/// The generation loop (greedy, and sampling with top-k and top-p) allocates nothing per
/// token in f32 beyond its vectors' amortized growth: 24 more tokens cost at most `GROWTH`
/// allocations (the tokens' vector and the attention mask double a few times).
#[test]
fn the_generation_loop_allocates_only_to_grow() {
    const GROWTH: usize = 6;
    let dir = common::fixture("llama");
    for sample in [false, true] {
        let n = per_generated(&dir, Precision::F32, sample, 8, 24);
        println!("llama fixture f32, sample {sample}: {n} allocations for 24 more tokens");
        assert!(
            n <= GROWTH,
            "sample {sample}: {n} allocations for 24 more tokens"
        );
    }
}

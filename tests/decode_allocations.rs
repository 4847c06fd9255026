//! Heap allocations per decode token (issue 5's "no allocation inside the decode loop"): a
//! counting global allocator around `System` counts every allocation and reallocation on every
//! thread (the kernels' pool helpers included) while the Llama fixture, loaded as `kiln` loads
//! it in f32, bf16 and fp8, decodes one token at a time through [`GraphLm`]'s
//! [`LanguageModel::decode`] after a few warm-up steps. The count must not grow with the
//! number of layers: what remains is the step's bookkeeping at the `GraphLm` boundary (the
//! inputs map with each layer's cache, the outputs map, the logits), bounded below.
//!
//! `KILN_BENCH_MODEL=~/.cache/kiln/llama125m cargo bench --bench decode_allocations` prints the
//! same figures for another model (the counting is `common/allocations.rs`).

#[path = "common/allocations.rs"]
mod allocations;
mod common;

use allocations::{per_step, PRECISIONS};
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

/// Allocations per decode step of the Llama fixture with 1 and 2 layers: a layer adds no more
/// than its share of the `GraphLm` boundary (`PER_LAYER`: the names of its `past` inputs and
/// `present` outputs and the two state handles, as `HashMap<String, Value>` holds them), and
/// a step no more than `BOUND` in all (what remains is listed in BENCHMARKS.md).
#[test]
fn a_decode_step_allocates_independently_of_the_layers() {
    const PER_LAYER: usize = 6;
    const BOUND: usize = 115;
    let dirs = [llama_with_layers(1), common::fixture("llama")];
    let mut counts = Vec::new();
    for precision in PRECISIONS {
        let [one, two] = dirs.clone().map(|d| per_step(&d, precision, 8, 16));
        println!(
            "llama fixture {}: {one} allocations per decode step with 1 layer, {two} with 2",
            precision.name()
        );
        counts.push((precision.name(), one, two));
    }
    std::fs::remove_dir_all(&dirs[0]).unwrap();
    for (precision, one, two) in counts {
        assert!(
            two <= one + PER_LAYER,
            "{precision}: a layer adds {} allocations per step",
            two as isize - one as isize
        );
        assert!(two <= BOUND, "{precision}: {two} allocations per step");
    }
}

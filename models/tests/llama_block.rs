//! One Llama decoder layer (RMSNorm, RoPE, GQA attention with a causal mask, SwiGLU MLP),
//! traced with the tracer and run by the reference executor, against transformers'
//! `LlamaDecoderLayer` on the same weights (fixture made by `scripts/reference/core_fixtures.py`).

use kiln_models::llama::{standalone_layer, LayerConfig};
use kiln_runtime::reference;
use kiln_runtime::weights::{Checkpoint, Convert};
use std::collections::HashMap;
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/core");

#[test]
fn llama_block_matches_transformers() {
    let cfg_text = std::fs::read_to_string(format!("{FIXTURES}/llama_block.json")).unwrap();
    let cfg: LayerConfig = serde_json::from_str(&cfg_text).unwrap();
    let graph = standalone_layer(&cfg).unwrap();
    let ckpt = Checkpoint::open(Path::new(&format!("{FIXTURES}/llama_block.safetensors"))).unwrap();
    let params = ckpt.bind(&graph, Convert::Exact).unwrap();
    let inputs = HashMap::from([(
        "input.hidden_states".to_string(),
        ckpt.load("input.hidden_states").unwrap(),
    )]);
    let outputs = reference::run(&graph, &inputs, &params).unwrap();
    let got = &outputs["output.hidden_states"];
    let want = ckpt.load("output.hidden_states").unwrap();
    assert_eq!(got.shape(), want.shape());
    let max_err = got
        .to_f64_vec()
        .iter()
        .zip(want.to_f64_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("llama block: max abs error {max_err:e}");
    // Tolerance: 1e-5 absolute on outputs of magnitude up to ~20 (f32 rounding in PyTorch).
    assert!(max_err <= 1e-5, "max abs error {max_err:e} exceeds 1e-5");
}

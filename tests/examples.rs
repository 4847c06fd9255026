//! The committed example graph stays what the tracer produces for the fixture's layer sizes
//! (regenerate with `cargo run --example trace_llama_block -- tests/fixtures/core/llama_block.json`).

use kiln::models::llama::{standalone_layer, LayerConfig};

#[test]
fn llama_block_example_is_current() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cfg =
        std::fs::read_to_string(format!("{root}/tests/fixtures/core/llama_block.json")).unwrap();
    let cfg: LayerConfig = serde_json::from_str(&cfg).unwrap();
    let traced = standalone_layer(&cfg).unwrap();
    let committed = std::fs::read_to_string(format!("{root}/examples/llama_block.kir")).unwrap();
    assert_eq!(kiln::ir::text::parse(&committed).unwrap(), traced);
}

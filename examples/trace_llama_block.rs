//! Traces one Llama decoder layer from a JSON file of its sizes (as
//! `tests/fixtures/core/llama_block.json`) and prints the graph in kiln's IR text format:
//!
//! ```sh
//! cargo run --example trace_llama_block -- tests/fixtures/core/llama_block.json > examples/llama_block.kir
//! ```

use kiln::models::llama::{standalone_layer, LayerConfig};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: trace_llama_block CONFIG.json");
        return ExitCode::from(2);
    };
    let cfg: Result<LayerConfig, String> = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()));
    match cfg.map(|c| standalone_layer(&c).map_err(|e| e.to_string())) {
        Ok(Ok(graph)) => {
            print!("{}", kiln::ir::text::print(&graph));
            ExitCode::SUCCESS
        }
        Ok(Err(e)) | Err(e) => {
            eprintln!("{path}: {e}");
            ExitCode::from(2)
        }
    }
}

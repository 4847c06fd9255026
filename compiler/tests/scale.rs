//! A Llama of 7B shape (32 layers, hidden 4096; config only, no weights) optimizes within the
//! limits; the time is printed (`--nocapture`), not asserted.

use kiln_compiler::{optimize, Limits, Target};
use kiln_models::config::{parse, Family};
use std::path::Path;
use std::time::Instant;

/// A 7B-shaped Llama config (the shape of Llama 2 7B), shared with `benches/optimize.rs`.
const LLAMA_7B: &str = include_str!("../../tests/fixtures/configs/llama-7b/config.json");

#[test]
fn llama_7b_shape_optimizes() {
    let cfg = parse(LLAMA_7B, Path::new("llama-7b/config.json")).unwrap();
    let Family::Decoder(d) = &cfg.family else {
        panic!("not a decoder")
    };
    let graphs = d.trace().unwrap();
    for (which, g) in [("prefill", &graphs.prefill), ("decode", &graphs.decode)] {
        let start = Instant::now();
        let (h, report) = optimize(g, &Target::cpu(), &Limits::default()).unwrap();
        let took = start.elapsed();
        println!(
            "llama 7B {which}: {} -> {} ops in {:.3} s\n{report}",
            g.nodes().len(),
            h.nodes().len(),
            took.as_secs_f64()
        );
        assert!(report.warnings.is_empty(), "{report}");
        let rmsnorms = h
            .nodes()
            .iter()
            .filter(|n| n.op.name() == "rmsnorm")
            .count();
        assert_eq!(rmsnorms, 2 * 32 + 1);
    }
}

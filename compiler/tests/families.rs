//! Every Hugging Face family fixture, optimized: the graph verifies, each application of a
//! normalization of the model is exactly one composite op, each RoPE of a decoder family's
//! queries and keys is one `rotary` op (two per layer, none left as a negation), and the
//! reference executor gives the unoptimized graph's outputs (within 1e-5 of each output's
//! largest magnitude) with the fixture's weights.

mod common;

use common::{count, optimize_fixture};
use kiln_ir::{Graph, Op};
use kiln_models::config::Family;

/// Parameters named like a normalization's weight (`*norm.weight`, `*LayerNorm.weight`,
/// `ln_*.weight`): one per normalization of the model.
fn norm_weights(g: &Graph) -> usize {
    g.params()
        .filter(|(name, ..)| {
            let Some(stem) = name.strip_suffix(".weight") else {
                return false;
            };
            let last = stem.rsplit('.').next().unwrap_or(stem).to_lowercase();
            last.contains("norm") || last.starts_with("ln_")
        })
        .count()
}

fn check(fixture: &str, norm: &str) {
    let (dir, graphs) = optimize_fixture(fixture);
    for common::Optimized {
        which,
        original: g,
        optimized: h,
    } in graphs
    {
        let norms = norm_weights(&g);
        assert!(norms > 0);
        if let Family::Decoder(_) | Family::Gpt2(_) = dir.config.family {
            let layers = g
                .outputs()
                .iter()
                .filter(|o| o.name.ends_with(".key"))
                .count();
            assert_eq!(norms, 2 * layers + 1, "{fixture}");
            let rotary = match dir.config.family {
                Family::Decoder(_) => 2 * layers,
                _ => 0,
            };
            assert_eq!(count(&h, "rotary"), rotary, "{fixture} {which}");
            assert_eq!(count(&h, "neg"), 0, "{fixture} {which}");
        }
        // The prefill graph's `last_logits` applies the final norm a second time.
        let applied = norms - 1 + common::heads(&g);
        assert_eq!(count(&h, norm), applied, "{fixture} {which}: {norm} ops");
        assert_eq!(
            count(&h, "rsqrt"),
            0,
            "{fixture} {which}: a normalization was left"
        );
        assert!(h.nodes().iter().all(|n| !matches!(
            n.op,
            Op::RmsNorm { .. } | Op::LayerNorm { .. }
        ) || n.op.name() == norm));
    }
}

#[test]
fn llama() {
    check("llama", "rmsnorm");
}

#[test]
fn mistral() {
    check("mistral", "rmsnorm");
}

#[test]
fn qwen2() {
    check("qwen2", "rmsnorm");
}

#[test]
fn mixtral() {
    check("mixtral", "rmsnorm");
}

#[test]
fn gpt2() {
    check("gpt2", "layernorm");
}

#[test]
fn bert() {
    check("bert", "layernorm");
}

#[test]
fn distilbert() {
    check("distilbert", "layernorm");
}

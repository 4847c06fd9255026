//! Attention fusion on every Hugging Face family fixture: each optimized graph (prefill and
//! decode for causal LMs, the encoder otherwise) has exactly one `attention` per layer and no
//! attention `softmax` (no softmax at all where attention had the only ones), the causal LMs'
//! attention takes the cached (un-repeated) keys and values, and the reference executor still
//! gives the unoptimized graph's outputs (checked by `common::optimize_fixture`). Causal LMs'
//! attention is `causal` (with the configured sliding window); encoders' is not.

mod common;

use common::{count, optimize_fixture};
use kiln_ir::{Graph, Op};
use kiln_models::config::Family;
use std::collections::BTreeSet;

/// The layers of `g`: its query projections' weights (`q_proj`, `query`, `q_lin`, or GPT-2's
/// fused `c_attn`).
fn layers(g: &Graph) -> usize {
    g.params()
        .filter(|(name, ..)| {
            [
                ".q_proj.weight",
                ".query.weight",
                ".q_lin.weight",
                ".c_attn.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s))
        })
        .count()
}

/// Softmaxes of `g` over rank-4 values (attention scores `[b, h, sq, sk]`).
fn attention_softmaxes(g: &Graph) -> usize {
    g.nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Softmax { .. }) && n.ty.rank() == 4)
        .count()
}

fn check(fixture: &str) {
    let (dir, graphs) = optimize_fixture(fixture);
    for common::Optimized {
        which,
        original: g,
        optimized: h,
    } in graphs
    {
        let n = layers(&g);
        assert!(n > 0, "{fixture}: no layers found");
        assert_eq!(
            count(&h, "attention"),
            n,
            "{fixture} {which}: attention ops"
        );
        // Every attention softmax (over rank-4 scores) is gone; any other softmax (Mixtral's
        // router) is the MoE rules' business.
        assert_eq!(
            attention_softmaxes(&g),
            n,
            "{fixture} {which}: traced attention"
        );
        if count(&g, "softmax") == n {
            assert_eq!(
                count(&h, "softmax"),
                0,
                "{fixture} {which}: a softmax was left"
            );
        }
        assert_eq!(attention_softmaxes(&h), 0, "{fixture} {which}");
        let attention: Vec<_> = h
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Attention { .. }))
            .collect();
        // Causal LMs: the causal and sliding-window parts of the mask become the op's flags and
        // the padding part stays an additive mask; encoders keep their padding mask as it is.
        let (causal, window) = match &dir.config.family {
            Family::Decoder(d) => (true, d.layer.sliding_window.unwrap_or(0)),
            Family::Gpt2(_) => (true, 0),
            Family::Bert(_) | Family::DistilBert(_) => (false, 0),
        };
        for a in &attention {
            let Op::Attention {
                causal: c,
                window: w,
                ..
            } = a.op
            else {
                unreachable!()
            };
            assert_eq!((c, w), (causal, window), "{fixture} {which}: {:?}", a.op);
            assert_eq!(a.inputs.len(), 4, "{fixture} {which}: the padding mask");
        }
        if let Family::Decoder(_) | Family::Gpt2(_) = dir.config.family {
            // Keys and values enter as cached (the present `.key`/`.value` outputs), so
            // grouped-query heads are not repeated before the op.
            let present = |suffix: &str| -> BTreeSet<_> {
                h.outputs()
                    .iter()
                    .filter(|o| o.name.ends_with(suffix))
                    .map(|o| o.value)
                    .collect()
            };
            let operand =
                |i: usize| -> BTreeSet<_> { attention.iter().map(|a| a.inputs[i]).collect() };
            assert_eq!(operand(1), present(".key"), "{fixture} {which}: keys");
            assert_eq!(operand(2), present(".value"), "{fixture} {which}: values");
        }
    }
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn mistral() {
    check("mistral");
}

#[test]
fn qwen2() {
    check("qwen2");
}

#[test]
fn mixtral() {
    check("mixtral");
}

#[test]
fn gpt2() {
    check("gpt2");
}

#[test]
fn bert() {
    check("bert");
}

#[test]
fn distilbert() {
    check("distilbert");
}

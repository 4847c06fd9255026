//! Every Hugging Face family fixture, optimized: the graph verifies, each application of a
//! normalization of the model is exactly one composite op, each RoPE of a decoder family's
//! queries and keys is part of its projection's `linear` op (two per layer, no `rotary` op or
//! negation left), each matmul epilogue the architecture has (a residual or bias add alone
//! after a projection) is part of one `linear` op, each projection split into attention heads
//! is one `linear` op with `heads` or a group of a `packed_linear` op (an attention's q, k
//! and v projections packed into one), each attention writes its heads merged into rows, each
//! SwiGLU MLP's gate and up projections are one `swiglu` op, and the reference executor gives
//! the unoptimized graph's outputs (within 1e-5 of each output's largest magnitude) with the
//! fixture's weights.

mod common;

use common::{count, optimize_fixture, projections};
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

/// The `linear` ops a fixture's graph must have: `per_layer` in each layer (one layer per
/// attention op), `extra` outside them; `heads` of each layer's split into attention heads
/// (as `linear` ops or groups of its `packed` `packed_linear` ops); and the `swiglu` ops of
/// each layer.
struct Epilogues {
    per_layer: usize,
    extra: usize,
    heads: usize,
    packed: usize,
    swiglu: usize,
}

fn check(fixture: &str, norm: &str, epilogues: Epilogues) {
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
            let (_, rotated) = projections(&h);
            assert_eq!(rotated, rotary, "{fixture} {which}: rotated projections");
            assert_eq!(count(&h, "rotary"), 0, "{fixture} {which}");
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
        let layers = count(&h, "attention");
        assert_eq!(
            count(&h, "linear"),
            epilogues.per_layer * layers + epilogues.extra,
            "{fixture} {which}: linear ops over {layers} layers"
        );
        let (split, _) = projections(&h);
        assert_eq!(split, epilogues.heads * layers, "{fixture} {which}: heads");
        assert_eq!(
            count(&h, "packed_linear"),
            epilogues.packed * layers,
            "{fixture} {which}: packed q, k and v"
        );
        let merged = h.nodes().iter().filter(|n| {
            matches!(
                n.op,
                Op::Attention {
                    merge_heads: true,
                    ..
                }
            )
        });
        assert_eq!(merged.count(), layers, "{fixture} {which}: merged heads");
        let swiglu = epilogues.swiglu * layers;
        assert_eq!(count(&h, "swiglu"), swiglu, "{fixture} {which}");
    }
}

/// The o_proj and down_proj residual adds; the q, k and v projections (split into heads, q
/// and k rotated) are one `packed_linear` op; gate and up are a `swiglu` op.
const LLAMA: Epilogues = Epilogues {
    per_layer: 2,
    extra: 0,
    heads: 3,
    packed: 1,
    swiglu: 1,
};

#[test]
fn llama() {
    check("llama", "rmsnorm", LLAMA);
}

#[test]
fn mistral() {
    check("mistral", "rmsnorm", LLAMA);
}

#[test]
fn qwen2() {
    // Llama's; the q, k and v projections' biases are part of their `linear` ops.
    check("qwen2", "rmsnorm", LLAMA);
}

#[test]
fn mixtral() {
    // o_proj's residual add (the experts' sum is part of the `moe` op); q, k and v split
    // into heads in one `packed_linear`.
    let epilogues = Epilogues {
        per_layer: 1,
        extra: 0,
        heads: 3,
        packed: 1,
        swiglu: 0,
    };
    check("mixtral", "rmsnorm", epilogues);
}

#[test]
fn gpt2() {
    // c_attn's bias; the other projections' biases are added with the residual or fed to
    // GELU in one elementwise kernel (the `fuse` pass), which a `linear` op cannot hold.
    // Its heads are slices of c_attn's output, which no projection's head layout holds
    // (so no `packed_linear` either).
    let epilogues = Epilogues {
        per_layer: 1,
        extra: 0,
        heads: 0,
        packed: 0,
        swiglu: 0,
    };
    check("gpt2", "layernorm", epilogues);
}

#[test]
fn bert() {
    // The MLM decoder's bias; the other biases are added with the residual or fed to GELU
    // in one elementwise kernel (the `fuse` pass). The query, key and value projections,
    // biases included, split into heads in one `packed_linear`.
    let epilogues = Epilogues {
        per_layer: 0,
        extra: 1,
        heads: 3,
        packed: 1,
        swiglu: 0,
    };
    check("bert", "layernorm", epilogues);
}

#[test]
fn distilbert() {
    // The MLM decoder's bias; the other biases are added with the residual or fed to GELU
    // in one elementwise kernel (the `fuse` pass). The query, key and value projections,
    // biases included, split into heads in one `packed_linear`.
    let epilogues = Epilogues {
        per_layer: 0,
        extra: 1,
        heads: 3,
        packed: 1,
        swiglu: 0,
    };
    check("distilbert", "layernorm", epilogues);
}

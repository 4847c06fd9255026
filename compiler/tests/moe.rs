//! The Mixtral fixture (2 layers, 4 experts, top-2), optimized with the default passes (and the
//! lowered passes, at f32): each
//! layer's sparse MoE block becomes exactly one `moe` op in the prefill and decode graphs, over
//! the checkpoint's own router and expert weights, and the reference executor gives the
//! unoptimized graph's outputs (within 1e-5 of each output's largest magnitude) with the
//! fixture's weights (checked by [`common::optimize_fixture`]).

mod common;

use common::{count, heads, optimize_config, optimize_fixture, Optimized};
use kiln_ir::Op;

#[test]
fn mixtral_moe_blocks_become_one_moe_each() {
    let (_, graphs) = optimize_fixture("mixtral");
    assert_eq!(graphs.len(), 2);
    for Optimized {
        which,
        original: g,
        optimized: h,
    } in graphs
    {
        let layers = g
            .outputs()
            .iter()
            .filter(|o| o.name.ends_with(".key"))
            .count();
        assert_eq!(layers, 2);
        assert_eq!(count(&g, "topk"), layers, "{which}: traced routers");
        assert_eq!(count(&h, "moe"), layers, "{which}: moe ops");
        // The dense form is gone: no router softmax, top-k or routing comparison, no expert
        // MLP; the only matmuls left are the LM head(s); attention's q, k, v projections
        // (split into heads) are one `packed_linear` op and o_proj with its residual add a
        // `linear` op.
        for op in ["topk", "softmax", "gather_along", "eq", "silu"] {
            assert_eq!(count(&h, op), 0, "{which}: {op} left");
        }
        assert_eq!(count(&h, "matmul"), heads(&g), "{which}");
        assert_eq!(count(&h, "linear"), layers, "{which}");
        assert_eq!(count(&h, "packed_linear"), layers, "{which}");
        for node in h.nodes().iter().filter(|n| matches!(n.op, Op::Moe { .. })) {
            assert_eq!(node.op, Op::Moe { top_k: 2 });
            assert_eq!(node.inputs.len(), 2 + 3 * 4);
            let names: Vec<&str> = node.inputs[1..]
                .iter()
                .map(|&v| match &h.node(v).unwrap().op {
                    Op::Param { name } => name.as_str(),
                    other => panic!("{which}: moe weight from {}", other.name()),
                })
                .collect();
            let layer = names[0]
                .strip_suffix(".block_sparse_moe.gate.weight")
                .unwrap_or_else(|| panic!("{names:?}"));
            let mut want = vec![format!("{layer}.block_sparse_moe.gate.weight")];
            for e in 0..4 {
                for w in ["w1", "w3", "w2"] {
                    want.push(format!("{layer}.block_sparse_moe.experts.{e}.{w}.weight"));
                }
            }
            assert_eq!(names, want, "{which}");
        }
    }
}

/// Mixtral 8x7B's shape (32 layers, 8 experts, top-2; config only, no weights): every layer's
/// block becomes one `moe`, within the optimizer's limits; the time is printed, not asserted.
#[test]
fn mixtral_8x7b_shape_optimizes() {
    let graphs = optimize_config(
        include_str!("../../tests/fixtures/configs/mixtral-8x7b/config.json"),
        "mixtral 8x7B",
    );
    for (which, h) in graphs {
        assert_eq!(count(&h, "moe"), 32, "{which}");
        assert_eq!(count(&h, "topk"), 0, "{which}");
    }
}

//! Elementwise, rotary, epilogue, head-layout and SwiGLU fusion on the Llama fixture: the
//! optimized graphs have fewer kernels per layer than the same pipeline without the `fuse` and
//! `swiglu` passes (SwiGLU's `silu * up` and its two projections become one kernel), each RoPE
//! `x * cos + rotate_half(x) * sin` is part of its projection's `linear` op (its slices,
//! negation and concat gone), each residual add is a projection's `linear` epilogue, each
//! layer's q, k and v are one `packed_linear` op (at every precision), and the graphs still give the unoptimized graph's outputs (checked by `optimize_fixture`).

mod common;

use common::{count, optimize_fixture, projections};
use kiln_compiler::pipeline::{default_passes, lowered_passes, optimize, run_lowered, run_passes};
use kiln_compiler::precision::{lower_precision, Precision};
use kiln_compiler::{Limits, Target};
use kiln_ir::{Graph, Op};

/// Nodes that become kernels (as `kiln inspect` counts them: parts of a `packed_linear` are
/// free, `kiln_ir::decompose::group_part`).
fn kernels(g: &Graph) -> usize {
    g.iter()
        .filter(|&(v, n)| {
            !matches!(
                n.op,
                Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. }
            ) && kiln_ir::decompose::group_part(g, v).is_none()
        })
        .count()
}

fn bodies(g: &Graph) -> Vec<String> {
    g.nodes()
        .iter()
        .filter_map(|n| match &n.op {
            Op::FusedElementwise { body } => Some(body.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn llama_decode_has_fewer_kernels_per_layer() {
    let (_, graphs) = optimize_fixture("llama");
    for o in graphs {
        let layers = o
            .original
            .outputs()
            .iter()
            .filter(|x| x.name.ends_with(".key"))
            .count();
        let unfused: Vec<_> = default_passes()
            .into_iter()
            .chain(lowered_passes())
            .filter(|p| p.name != "fuse" && p.name != "swiglu")
            .collect();
        let (before, _) =
            run_passes(&o.original, &unfused, &Target::cpu(), &Limits::default()).unwrap();
        let h = &o.optimized;
        println!(
            "llama {}: {} layers, {} -> {} kernels",
            o.which,
            layers,
            kernels(&before),
            kernels(h)
        );
        // Per layer: gate, up, silu, mul -> 1 (saves 3).
        assert!(
            kernels(&before) >= kernels(h) + 3 * layers,
            "{} -> {}",
            kernels(&before),
            kernels(h)
        );
        assert_eq!(count(h, "silu"), 0, "{}", o.which);
        assert!(bodies(h).is_empty(), "{}: {:?}", o.which, bodies(h));
        assert_eq!(count(h, "swiglu"), layers, "{}", o.which);
        let (_, rotated) = projections(h);
        assert_eq!(
            (count(h, "rotary"), rotated),
            (0, 2 * layers),
            "{}",
            o.which
        );
        assert_eq!(count(h, "neg"), 0, "{}", o.which);
        // Each residual add is o_proj's or down_proj's epilogue; q, k and v are one
        // `packed_linear` op with heads.
        assert_eq!(count(h, "add"), 0, "{}", o.which);
        assert_eq!(count(h, "linear"), 2 * layers, "{}", o.which);
        assert_eq!(count(h, "packed_linear"), layers, "{}", o.which);
    }
}

/// The head-layout and SwiGLU passes run after precision lowering, so they fire in bf16 and
/// fp8 too (through bf16's roundings and fp8's weight scales): every Llama layer's q, k and v
/// are one `packed_linear` op with heads (q and k rotated; at fp8 q scaled, k and v not),
/// attention writes merged heads, gate and up
/// are one `swiglu` op, and no permute or `rotary` op is left.
#[test]
fn llama_layers_fuse_at_every_precision() {
    let dir = kiln_models::ModelDir::open(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/llama"),
    )
    .unwrap();
    let (target, limits) = (Target::cpu(), Limits::default());
    for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
        for (which, g) in common::graphs(&dir) {
            let layers = g
                .outputs()
                .iter()
                .filter(|o| o.name.ends_with(".key"))
                .count();
            let (h, mut report) = optimize(&g, &target, &limits).unwrap();
            let h = lower_precision(&h, precision, &target).unwrap();
            let h = run_lowered(&h, &target, &limits, &mut report).unwrap();
            let what = format!("{} {which}", precision.name());
            let with = |f: fn(&Op) -> bool| h.nodes().iter().filter(|n| f(&n.op)).count();
            let (split, rotated) = projections(&h);
            let scaled: Vec<usize> = h
                .nodes()
                .iter()
                .filter_map(|n| match n.op {
                    Op::PackedLinear { scaled, .. } => Some(scaled),
                    _ => None,
                })
                .collect();
            let fp8 = usize::from(precision == Precision::Fp8);
            assert_eq!(scaled, vec![fp8; layers], "{what}: packed, scaled");
            let merged = with(|op| {
                matches!(
                    op,
                    Op::Attention {
                        merge_heads: true,
                        ..
                    }
                )
            });
            assert_eq!(
                (rotated, split, merged),
                (2 * layers, 3 * layers, layers),
                "{what}"
            );
            assert_eq!(count(&h, "swiglu"), layers, "{what}");
            for gone in ["permute", "rotary", "fused_elementwise"] {
                assert_eq!(count(&h, gone), 0, "{what}: {gone}");
            }
        }
    }
}

//! Elementwise, rotary and epilogue fusion on the Llama fixture: the optimized graphs have
//! fewer kernels per layer than the same pipeline without the `fuse` pass (SwiGLU's
//! `silu * up` becomes one kernel), each RoPE `x * cos + rotate_half(x) * sin` is one `rotary`
//! op (its slices, negation and concat gone), each residual add is a projection's `linear`
//! epilogue, and the graphs still give the unoptimized graph's outputs (checked by
//! `optimize_fixture`).

mod common;

use common::{count, optimize_fixture};
use kiln_compiler::pipeline::{default_passes, lowered_passes, run_passes};
use kiln_compiler::{Limits, Target};
use kiln_ir::{Graph, Op};

/// Nodes that become kernels (as `kiln inspect` counts them).
fn kernels(g: &Graph) -> usize {
    g.nodes()
        .iter()
        .filter(|n| {
            !matches!(
                n.op,
                Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. }
            )
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
            .filter(|p| p.name != "fuse")
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
        // Per layer: silu+mul -> 1 (saves 1).
        assert!(
            kernels(&before) >= kernels(h) + layers,
            "{} -> {}",
            kernels(&before),
            kernels(h)
        );
        assert_eq!(count(h, "silu"), 0, "{}", o.which);
        let b = bodies(h);
        let swiglu = b.iter().filter(|s| *s == "(mul (silu $0) $1)").count();
        assert_eq!(swiglu, layers, "{}: {b:?}", o.which);
        assert_eq!(count(h, "rotary"), 2 * layers, "{}", o.which);
        assert_eq!(count(h, "neg"), 0, "{}", o.which);
        // Each residual add is o_proj's or down_proj's epilogue.
        assert_eq!(count(h, "add"), 0, "{}", o.which);
        assert_eq!(count(h, "linear"), 2 * layers, "{}", o.which);
    }
}

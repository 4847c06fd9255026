//! The compiler's fused layer forms, written back as the graph forms this backend's plan fuses
//! itself ([`super::fuse`]): a `linear` op with a head layout (and RoPE) becomes its `linear`
//! (or matmul), reshape, permute and `rotary`; a `packed_linear` becomes its groups' such
//! projections (its parts read them directly, no `concat` unless the packed result itself is
//! read); `attention` with merged heads becomes
//! `attention`, permute and reshape; `swiglu` becomes its two projections and the
//! `fused_elementwise` `(mul (silu $0) $1)` of them ([`kiln_ir::decompose::expand`], exact).
//! The plan then fuses those into the same steps as before: a Llama layer stays 7 kernels.
//!
//! Every entry of the backend that plans a graph ([`super::CpuGraph::compile`], the artifact's
//! plan and packed-weight sections) plans the legalized graph, so node numbers agree.

use kiln_ir::decompose::expand;
use kiln_ir::{Graph, Op};

/// True for the ops [`legalize`] expands.
fn fused_layout(op: &Op) -> bool {
    matches!(
        op,
        Op::Linear { heads: 1.., .. }
            | Op::PackedLinear { .. }
            | Op::SwiGlu { .. }
            | Op::Attention {
                merge_heads: true,
                ..
            }
    )
}

/// `g` (verified) with its head-layout linears, merged-head attentions and SwiGLUs expanded.
/// Expansion cannot fail on a verified graph; were it to, `g` is planned as it is (its fused
/// ops then run the reference executor's op, correct but slow).
pub fn legalize(g: &Graph) -> Graph {
    if !g.nodes().iter().any(|n| fused_layout(&n.op)) {
        return g.clone();
    }
    expand(g, fused_layout).unwrap_or_else(|_| g.clone())
}

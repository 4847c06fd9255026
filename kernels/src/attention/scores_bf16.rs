//! Prefill scores `Q·Kᵀ` with `vdpbf16ps` when every query and key element is a bf16 value (a
//! bf16 graph rounds its attention operands to bf16 before the op): the products of bf16
//! values are exact in f32 and `vdpbf16ps` sums them in f32, so the scores are those of the
//! f32 path up to the order of the additions — the op's semantics are unchanged, and the check
//! (one pass over q and k) makes an f32 graph's operands, which are not bf16 values, keep the
//! f32 GEMM.
//!
//! Each (batch, kv head)'s keys are packed once per call into the weight layout of
//! [`crate::gemm_bf16`] (panels of [`NR`] keys, one 64-byte vector of key pairs per pair of
//! head dimensions), shared by every query block of the GQA group; a task converts its query
//! rows to bf16 pairs and runs the GEMM micro-kernel over the key panels it needs.

use super::{Ctx, View};
use crate::gemm_bf16::{self, NR};
use crate::simd::Isa;
use rayon::prelude::*;

/// Query rows per micro-kernel tile (the GEMM's tile height).
const ROWS: usize = gemm_bf16::MR;

/// Every (batch, kv head)'s keys in panels of [`NR`] keys.
pub(super) struct Keys {
    /// Per (batch, kv head), row-major over (batch, kv head): `panels · pairs · NR` pairs.
    heads: Vec<Vec<u32>>,
    /// Pairs of head dimensions.
    pairs: usize,
}

/// Head dimensions below which the f32 GEMM scores as fast (all-MiniLM's 32: the check and
/// key packing cost what the shorter micro-kernel runs save; measured 2026-11-28).
const MIN_HEAD_DIM: usize = 64;

/// The packed keys when level `isa` has `vdpbf16ps`, the head dimension is at least
/// [`MIN_HEAD_DIM`] and every element of q and k is a bf16 value, else `None`.
pub(super) fn pack_keys(isa: Isa, c: &Ctx) -> Option<Keys> {
    let s = &c.s;
    if !gemm_bf16::has_panel_row(isa) || s.head_dim < MIN_HEAD_DIM {
        return None;
    }
    let all_bf16 = |v: &View, heads: usize, len: usize| {
        (0..s.batch * heads).into_par_iter().all(|bh| {
            (0..len).all(|i| {
                let o = v.strides.offset(bh / heads, bh % heads, i);
                v.data[o..o + s.head_dim]
                    .iter()
                    .all(|x| x.to_bits() & 0xffff == 0)
            })
        })
    };
    if !all_bf16(&c.q, s.q_heads, s.q_len) || !all_bf16(&c.k, s.kv_heads, s.kv_len) {
        return None;
    }
    let pairs = s.head_dim.div_ceil(2);
    let panels = s.kv_len.div_ceil(NR);
    let heads = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|bh| {
            let mut out = vec![0u32; panels * pairs * NR];
            for j in 0..s.kv_len {
                let o = c.k.strides.offset(bh / s.kv_heads, bh % s.kv_heads, j);
                let key = &c.k.data[o..o + s.head_dim];
                let (panel, col) = (j / NR, j % NR);
                for (p, two) in key.chunks(2).enumerate() {
                    let hi = two.get(1).map_or(0, |x| x.to_bits() & 0xffff_0000);
                    out[(panel * pairs + p) * NR + col] = (two[0].to_bits() >> 16) | hi;
                }
            }
            out
        })
        .collect();
    Some(Keys { heads, pairs })
}

impl Keys {
    /// `scores[r][j - k0] = Q[rows.start + r] · K[j]` (unscaled) for keys `k0 .. k0 + width`
    /// of head `(b, h)`, `k0` a multiple of [`NR`]; `scores` is `rows.len() × width` row-major,
    /// `qp` the task's scratch for its query pairs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scores(
        &self,
        c: &Ctx,
        b: usize,
        h: usize,
        rows: std::ops::Range<usize>,
        k0: usize,
        width: usize,
        scores: &mut [f32],
        qp: &mut Vec<u32>,
    ) {
        let (pairs, d) = (self.pairs, c.s.head_dim);
        let n = rows.len();
        qp.clear();
        qp.resize(n.next_multiple_of(ROWS) * pairs, 0);
        for (i, o) in rows.zip(qp.chunks_exact_mut(pairs)) {
            let q = &c.q.data[c.q.strides.offset(b, h, i)..][..d];
            for (o, two) in o.iter_mut().zip(q.chunks(2)) {
                let hi = two.get(1).map_or(0, |x| x.to_bits() & 0xffff_0000);
                *o = (two[0].to_bits() >> 16) | hi;
            }
        }
        let keys = &self.heads[b * c.s.kv_heads + h / c.group];
        for p0 in (0..width).step_by(NR) {
            let panel = (k0 + p0) / NR;
            let w = &keys[panel * pairs * NR..][..pairs * NR];
            let cols = NR.min(width - p0);
            for t in (0..n).step_by(ROWS) {
                let r = ROWS.min(n - t);
                let a = &qp[t * pairs..][..ROWS * pairs];
                gemm_bf16::tile_into(
                    c.level,
                    a,
                    pairs,
                    w,
                    &mut scores[t * width + p0..],
                    width,
                    r,
                    cols,
                );
            }
        }
    }
}

//! The CPU backend's mixture-of-experts step (the IR's `moe`, f32): route every token to its
//! `top_k` experts, then run each expert once on the tokens routed to it — gathered rows, the
//! gate and up projections as GEMMs, `silu(g) · u`, the down projection — and add the weighted
//! results in ascending expert order. No expert computes on a token not routed to it.

use kiln_kernels::elementwise::silu_mul;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::{rowwise, KernelError};

/// `x · wᵀ` for row-major `x` (`m × k`) and `w` (`n × k`).
fn linear(m: usize, n: usize, k: usize, x: &[f32], w: &[f32]) -> Result<Vec<f32>, KernelError> {
    let mut y = vec![0.0; m * n];
    matmul_f32(&Gemm::dense(m, n, k, false, true), x, w, &mut y)?;
    Ok(y)
}

/// The `moe` op on f32 data: `x` is `tokens × h`, `gate` `E × h`, `experts[e]` the
/// `(w1, w3, w2)` of expert `e` (`[i, h]`, `[i, h]`, `[h, i]`); writes `tokens × h` into `out`.
pub fn moe_f32(
    top_k: usize,
    h: usize,
    x: &[f32],
    gate: &[f32],
    experts: &[[&[f32]; 3]],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let e_count = experts.len();
    let tokens = x.len() / h.max(1);
    let bad = |m: String| Err(KernelError::Layout(format!("moe: {m}")));
    if h == 0 || x.len() != tokens * h || out.len() != x.len() || gate.len() != e_count * h {
        return bad(format!(
            "x {}, gate {}, out {} for h {h}",
            x.len(),
            gate.len(),
            out.len()
        ));
    }
    if top_k == 0 || top_k > e_count {
        return bad(format!("top_k {top_k} of {e_count} experts"));
    }
    // Router: softmax over the experts, the top_k largest (ties to the lower expert), weights
    // renormalized over the chosen.
    let logits = linear(tokens, e_count, h, x, gate)?;
    let mut probs = vec![0.0; logits.len()];
    rowwise::softmax(tokens, e_count, &logits, &mut probs)?;
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_count];
    let mut order: Vec<usize> = Vec::with_capacity(e_count);
    for (t, p) in probs.chunks_exact(e_count).enumerate() {
        order.clear();
        order.extend(0..e_count);
        // NaN sorts first (largest), as the reference's topk.
        order.sort_by(|&a, &b| match (p[a].is_nan(), p[b].is_nan()) {
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            _ => p[b]
                .partial_cmp(&p[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b)),
        });
        let chosen = &order[..top_k];
        let total: f32 = chosen.iter().map(|&e| p[e]).sum();
        for &e in chosen {
            routed[e].push((t, p[e] / total));
        }
    }
    out.fill(0.0);
    for (e, pairs) in routed.iter().enumerate() {
        if pairs.is_empty() {
            continue;
        }
        let [w1, w3, w2] = experts[e];
        let inter = w1.len() / h;
        if w1.len() != inter * h || w3.len() != w1.len() || w2.len() != w1.len() {
            return bad(format!(
                "expert {e}: weights of {}, {}, {} elements",
                w1.len(),
                w3.len(),
                w2.len()
            ));
        }
        let n = pairs.len();
        let mut xe = Vec::with_capacity(n * h);
        for &(t, _) in pairs {
            xe.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        let g = linear(n, inter, h, &xe, w1)?;
        let u = linear(n, inter, h, &xe, w3)?;
        let mut a = vec![0.0; g.len()];
        silu_mul(&g, &u, &mut a)?;
        let y = linear(n, h, inter, &a, w2)?;
        for (r, &(t, w)) in pairs.iter().enumerate() {
            for (o, &v) in out[t * h..(t + 1) * h]
                .iter_mut()
                .zip(&y[r * h..(r + 1) * h])
            {
                *o += w * v;
            }
        }
    }
    Ok(())
}

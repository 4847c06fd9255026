//! The CPU backend's mixture-of-experts step (the IR's `moe`, f32): route every token to its
//! `top_k` experts, then run each expert once on the tokens routed to it — gathered rows, the
//! gate and up projections as GEMMs, `silu(g) · u`, the down projection — and add the weighted
//! results in ascending expert order. No expert computes on a token not routed to it.
//!
//! Weights are f32 data, or narrow parameters (precision lowering's `cast(w, f32)`, times a
//! per-row scale for fp8) widened exactly as those ops would, by the step, and only for the
//! router and the experts that receive tokens. An expert that receives at most
//! [`FEW_TOKENS`] tokens (every expert of a batch-1 decode step) reads its weights where they
//! are stored instead (`kiln_kernels::gemv::gemv_narrow_batch`: each block of weight rows
//! widened on the fly in L1, exactly, and multiplied by every token's row, x left in f32):
//! nothing is widened into a buffer or packed.

use crate::tensor::Elements;
use kiln_ir::f8::{f8e4m3_to_f32, f8e5m2_to_f32};
use kiln_kernels::elementwise::silu_mul;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::gemv::{gemv_narrow_batch, Narrow};
use kiln_kernels::{rowwise, KernelError};
use std::borrow::Cow;

/// One weight as the step reads it.
#[derive(Debug, Clone, Copy)]
pub enum MoeData<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// A narrow parameter's elements, widened to f32 on use and multiplied by `scale[row]`
    /// when given (rows of `len / scale.len()` elements).
    Narrow {
        /// The parameter's elements.
        elements: Elements<'a>,
        /// Per-row factors.
        scale: Option<&'a [f32]>,
    },
}

impl<'a> MoeData<'a> {
    /// Elements.
    fn len(&self) -> usize {
        match self {
            MoeData::F32(d) => d.len(),
            MoeData::Narrow { elements, .. } => elements.len(),
        }
    }

    /// `y[r] = self · x[r]` for the `m` rows of `x`, the weight as `n × k` (row-major) read as
    /// stored: narrow elements widened on the fly (exact), then each output times its row's
    /// scale — the values of [`MoeData::widen`] and an f32 product up to the rounding of the
    /// scale's product.
    fn gemv(&self, m: usize, n: usize, k: usize, x: &[f32], y: &mut [f32]) -> Result<(), String> {
        let (elements, scale) = match *self {
            MoeData::F32(d) => (Elements::F32(d), None),
            MoeData::Narrow { elements, scale } => (elements, scale),
        };
        let narrow = match elements {
            Elements::F32(v) => Narrow::F32(v),
            Elements::F16(v) => Narrow::F16(v),
            Elements::BF16(v) => Narrow::Bf16(v),
            Elements::F8E4M3(v) => Narrow::F8E4M3(v),
            Elements::F8E5M2(v) => Narrow::F8E5M2(v),
            other => return Err(format!("a {} weight", other.dtype())),
        };
        gemv_narrow_batch(m, n, k, narrow, x, y).map_err(|e| e.to_string())?;
        if let Some(scale) = scale {
            if scale.len() != n {
                return Err(format!("{} scales for {n} rows", scale.len()));
            }
            for row in y.chunks_exact_mut(n) {
                for (v, s) in row.iter_mut().zip(scale) {
                    *v *= s;
                }
            }
        }
        Ok(())
    }

    /// The f32 elements: borrowed, or widened (and scaled) into a new buffer.
    fn widen(&self) -> Result<Cow<'a, [f32]>, KernelError> {
        let (elements, scale) = match *self {
            MoeData::F32(d) => return Ok(Cow::Borrowed(d)),
            MoeData::Narrow { elements, scale } => (elements, scale),
        };
        let mut w: Vec<f32> = match elements {
            Elements::F32(v) => v.to_vec(),
            Elements::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Elements::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Elements::F8E4M3(v) => v.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
            Elements::F8E5M2(v) => v.iter().map(|&b| f8e5m2_to_f32(b)).collect(),
            other => {
                return Err(KernelError::Layout(format!(
                    "moe: a {} weight",
                    other.dtype()
                )))
            }
        };
        if let Some(scale) = scale {
            let cols = w.len() / scale.len().max(1);
            if scale.is_empty() || cols * scale.len() != w.len() {
                return Err(KernelError::Layout(format!(
                    "moe: {} scales for a weight of {} elements",
                    scale.len(),
                    w.len()
                )));
            }
            for (row, &f) in w.chunks_exact_mut(cols).zip(scale) {
                row.iter_mut().for_each(|v| *v *= f);
            }
        }
        Ok(Cow::Owned(w))
    }
}

/// Routed tokens up to which an expert reads its weights where they are stored (each block of
/// weight rows widened in L1 once and multiplied by every token's row: nothing widened into a
/// buffer or packed); with more, widening once and one GEMM per weight computes faster.
const FEW_TOKENS: usize = 4;

/// The `(w1, w3, w2)` of an expert: `[i, h]`, `[i, h]`, `[h, i]` for `i` the intermediate size.
fn intermediate(h: usize, expert: &[MoeData<'_>; 3]) -> Result<usize, String> {
    let lens = expert.map(|w| w.len());
    let i = lens[0] / h;
    if lens[0] != i * h || lens[1] != lens[0] || lens[2] != lens[0] {
        return Err(format!(
            "weights of {}, {}, {} elements",
            lens[0], lens[1], lens[2]
        ));
    }
    Ok(i)
}

/// `silu(x · w1ᵀ) · (x · w3ᵀ) · w2ᵀ` for the rows of `xe`, on the weights as stored.
fn expert_in_place(h: usize, xe: &[f32], expert: &[MoeData<'_>; 3]) -> Result<Vec<f32>, String> {
    let i = intermediate(h, expert)?;
    let m = xe.len() / h;
    let [w1, w3, w2] = expert;
    let (mut g, mut u, mut a) = (vec![0.0; m * i], vec![0.0; m * i], vec![0.0; m * i]);
    let mut y = vec![0.0; xe.len()];
    w1.gemv(m, i, h, xe, &mut g)?;
    w3.gemv(m, i, h, xe, &mut u)?;
    silu_mul(&g, &u, &mut a).map_err(|e| e.to_string())?;
    w2.gemv(m, h, i, &a, &mut y)?;
    Ok(y)
}

/// The same for many rows: each weight widened once (narrow ones) and one GEMM per weight.
fn expert_widened(h: usize, xe: &[f32], expert: &[MoeData<'_>; 3]) -> Result<Vec<f32>, String> {
    let text = |e: KernelError| e.to_string();
    let i = intermediate(h, expert)?;
    let n = xe.len() / h;
    let [w1, w3, w2] = expert.map(|w| w.widen());
    let (w1, w3, w2) = (w1.map_err(text)?, w3.map_err(text)?, w2.map_err(text)?);
    let g = linear(n, i, h, xe, &w1).map_err(text)?;
    let u = linear(n, i, h, xe, &w3).map_err(text)?;
    let mut a = vec![0.0; g.len()];
    silu_mul(&g, &u, &mut a).map_err(text)?;
    linear(n, h, i, &a, &w2).map_err(text)
}

/// `x · wᵀ` for row-major `x` (`m × k`) and `w` (`n × k`).
fn linear(m: usize, n: usize, k: usize, x: &[f32], w: &[f32]) -> Result<Vec<f32>, KernelError> {
    let mut y = vec![0.0; m * n];
    matmul_f32(&Gemm::dense(m, n, k, false, true), x, w, &mut y)?;
    Ok(y)
}

/// The `moe` op on f32 activations: `x` is `tokens × h`, `gate` `E × h`, `experts[e]` the
/// `(w1, w3, w2)` of expert `e` (`[i, h]`, `[i, h]`, `[h, i]`); writes `tokens × h` into `out`.
pub fn moe_f32(
    top_k: usize,
    h: usize,
    x: &[f32],
    gate: MoeData<'_>,
    experts: &[[MoeData<'_>; 3]],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let gate = gate.widen()?;
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
    let logits = linear(tokens, e_count, h, x, &gate)?;
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
        let n = pairs.len();
        let mut xe = Vec::with_capacity(n * h);
        for &(t, _) in pairs {
            xe.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        let run = if n <= FEW_TOKENS {
            expert_in_place
        } else {
            expert_widened
        };
        let y = run(h, &xe, &experts[e])
            .map_err(|m| KernelError::Layout(format!("moe: expert {e}: {m}")))?;
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

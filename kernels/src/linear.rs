//! Linear layers with their epilogue, alone or in groups: `y = (x · Wᵀ) ⊙ s + r` for f32, packed
//! bf16 or fp8 e4m3 weights `W[n, k]` (or f32 `W[k, n]` read as `x · W`), an optional scale per
//! output column `s[n]` (fp8's per-channel scales) and an optional addend `r` (a residual
//! `[m, n]` or a bias `[n]` broadcast over the rows).
//!
//! [`linear`] takes several layers that read the same `x` (a transformer's Q/K/V or gate/up
//! projections). With one row of x (decode), all their output rows are computed in ONE
//! parallel region, blocks of [`BLOCK`] rows of any layer handed out to the threads, each block
//! finishing its epilogue while its values are hot: one fork/join per group instead of one per
//! weight plus one per elementwise epilogue, which is what small decode GEMVs pay most for.
//! x is converted once per group (rounded to bf16 for bf16 and fp8 weights). With more rows
//! (prefill, batched decode) each layer runs its GEMM (already parallel and large), then its
//! epilogue. The results are those of [`crate::gemv`] / [`crate::gemm_bf16`] / [`crate::gemm`]
//! followed by the epilogue in f32; only the order of f32 additions can differ.

use crate::gemm::{matmul_f32, Gemm};
use crate::gemm_bf16::{self, PackedBf16, NR};
use crate::gemv::{f32_rows, gemv_f8e4m3_batch_with, PreparedX};
use crate::simd::{vector_level, Isa};
use crate::KernelError;
use rayon::prelude::*;

/// Output rows per task of a decode group (one packed bf16 panel).
pub const BLOCK: usize = NR;

/// Groups with fewer weights than this run on the calling thread only.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 15;

/// A layer's weights.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// f32 `W[n, k]`, row-major (`x · Wᵀ`).
    F32(&'a [f32]),
    /// f32 `W[k, n]`, row-major (`x · W`).
    F32Kn(&'a [f32]),
    /// bf16 `W[n, k]` packed once ([`PackedBf16`]); x rounded to bf16.
    Bf16(&'a PackedBf16),
    /// fp8 e4m3 `W[n, k]` bytes, row-major; x rounded to bf16.
    F8E4M3(&'a [u8]),
}

impl Weight<'_> {
    /// Output columns for inner dimension `k`, if the weight's size is a multiple of `k`.
    fn n(&self, k: usize) -> Option<usize> {
        let len = match self {
            Weight::Bf16(w) => return (w.k() == k).then(|| w.n()),
            Weight::F32(w) | Weight::F32Kn(w) => w.len(),
            Weight::F8E4M3(w) => w.len(),
        };
        (k > 0 && len % k == 0).then(|| len / k)
    }
}

/// One layer of a group: its weight, epilogue and output `[m, n]`.
#[derive(Debug)]
pub struct Layer<'a> {
    /// The weight.
    pub weight: Weight<'a>,
    /// Multiplies output column j by `scale[j]` (length n).
    pub scale: Option<&'a [f32]>,
    /// Added after the scale: `[m, n]` (a residual) or `[n]` (a bias, every row).
    pub add: Option<&'a [f32]>,
    /// The result, `m × n` row-major (overwritten).
    pub out: &'a mut [f32],
}

/// `layer.out = (x · Wᵀ) ⊙ scale + add` for every layer, `x` being `m × k` row-major, at the
/// best [`Isa`].
pub fn linear(m: usize, k: usize, x: &[f32], layers: &mut [Layer<'_>]) -> Result<(), KernelError> {
    linear_with(Isa::best(), m, k, x, layers)
}

/// As [`linear`] at instruction-set level `isa`.
pub fn linear_with(
    isa: Isa,
    m: usize,
    k: usize,
    x: &[f32],
    layers: &mut [Layer<'_>],
) -> Result<(), KernelError> {
    let mut ns = Vec::with_capacity(layers.len());
    for l in layers.iter() {
        let n = check(m, k, x, l)?;
        ns.push(n);
    }
    if m == 0 || ns.iter().all(|&n| n == 0) {
        return Ok(());
    }
    if k == 0 {
        for (l, &n) in layers.iter_mut().zip(&ns) {
            l.out.fill(0.0);
            rows_epilogue(l, n);
        }
        return Ok(());
    }
    // Layers that one decode region cannot take run on their own first (their own GEMM is
    // parallel), then the region takes the rest.
    let in_region = |l: &Layer<'_>| {
        m == 1
            && match l.weight {
                Weight::F32(_) | Weight::F8E4M3(_) => true,
                Weight::Bf16(_) => gemm_bf16::has_panel_row(isa),
                Weight::F32Kn(_) => false,
            }
    };
    for (l, &n) in layers.iter_mut().zip(&ns) {
        if !in_region(l) {
            alone(isa, m, n, k, x, l)?;
        }
    }
    let mut tasks: Vec<Task<'_>> = Vec::new();
    let mut weights = 0;
    for (l, &n) in layers.iter_mut().zip(&ns) {
        if !in_region(l) {
            continue;
        }
        weights += n * k;
        let (weight, scale, add) = (l.weight, l.scale, l.add);
        for (b, y) in l.out.chunks_mut(BLOCK).enumerate() {
            let cols = b * BLOCK..b * BLOCK + y.len();
            tasks.push(Task {
                weight,
                row0: cols.start,
                scale: scale.map(|s| &s[cols.clone()]),
                add: add.map(|a| &a[cols]),
                y,
            });
        }
    }
    if tasks.is_empty() {
        return Ok(());
    }
    let bf16_x = tasks
        .iter()
        .any(|t| matches!(t.weight, Weight::Bf16(_)))
        .then(|| gemm_bf16::pack_a(1, k, x));
    let f8_x = tasks
        .iter()
        .any(|t| matches!(t.weight, Weight::F8E4M3(_)))
        .then(|| PreparedX::new(isa, x, 1, k));
    let level = vector_level(isa);
    let run = |t: Task<'_>| {
        let (r0, rows) = (t.row0, t.y.len());
        match t.weight {
            Weight::F32(w) => f32_rows(level, &w[r0 * k..(r0 + rows) * k], k, x, t.y),
            Weight::F8E4M3(w) => {
                if let Some(p) = &f8_x {
                    p.rows(&w[r0 * k..(r0 + rows) * k], t.y)
                }
            }
            Weight::Bf16(w) => {
                if let Some(ap) = &bf16_x {
                    gemm_bf16::panel_row(ap, w, r0 / BLOCK, t.y)
                }
            }
            Weight::F32Kn(_) => {}
        }
        epilogue(t.scale, t.add, t.y);
    };
    if crate::threads() <= 1 || weights < PARALLEL_MIN_WEIGHTS {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
    Ok(())
}

/// Output rows `row0 .. row0 + y.len()` of one layer in a decode region, with the matching
/// slices of its epilogue.
struct Task<'a> {
    weight: Weight<'a>,
    row0: usize,
    scale: Option<&'a [f32]>,
    add: Option<&'a [f32]>,
    y: &'a mut [f32],
}

/// The output columns of `l`, checking every length against `m`, `k` and `x`.
fn check(m: usize, k: usize, x: &[f32], l: &Layer<'_>) -> Result<usize, KernelError> {
    let err = |what: String| Err(KernelError::Layout(format!("linear {m}x?x{k}: {what}")));
    if m.checked_mul(k) != Some(x.len()) {
        return err(format!("x has {} elements", x.len()));
    }
    let n = match (l.weight.n(k), k) {
        (Some(n), _) => n,
        (None, 0) => l.out.len() / m.max(1),
        (None, _) => return err("the weight's size is not a multiple of k".into()),
    };
    if m.checked_mul(n) != Some(l.out.len()) {
        return err(format!("out has {} elements for n = {n}", l.out.len()));
    }
    if l.scale.is_some_and(|s| s.len() != n) {
        return err(format!("scale is not [{n}]"));
    }
    if l.add.is_some_and(|a| a.len() != n && a.len() != m * n) {
        return err(format!("the addend is neither [{n}] nor [{m}, {n}]"));
    }
    Ok(n)
}

/// Rows of x up to which an f32 `x · Wᵀ` runs as one GEMV per row.
const GEMV_MAX_ROWS: usize = 4;

/// One layer by its own (parallel) kernel, then its epilogue.
fn alone(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    l: &mut Layer<'_>,
) -> Result<(), KernelError> {
    match l.weight {
        // A few rows: one GEMV per row beats a GEMM call (a 2-token f32 prefill of the 125M
        // Llama took 40 ms this way against 194 ms through the GEMM).
        Weight::F32(w) if m <= GEMV_MAX_ROWS => {
            for (x, y) in x.chunks_exact(k).zip(l.out.chunks_exact_mut(n)) {
                crate::gemv::gemv_f32(n, k, w, x, y)?;
            }
        }
        Weight::F32(w) => matmul_f32(&Gemm::dense(m, n, k, false, true), x, w, l.out)?,
        Weight::F32Kn(w) => matmul_f32(&Gemm::dense(m, n, k, false, false), x, w, l.out)?,
        Weight::Bf16(w) => gemm_bf16::matmul_bf16_with(isa, m, x, w, l.out)?,
        Weight::F8E4M3(w) => gemv_f8e4m3_batch_with(isa, m, n, k, w, 1.0, x, l.out)?,
    }
    rows_epilogue(l, n);
    Ok(())
}

/// The epilogue of every row (`n` columns) of `l.out`.
fn rows_epilogue(l: &mut Layer<'_>, n: usize) {
    let (scale, add) = (l.scale, l.add);
    if n == 0 || (scale.is_none() && add.is_none()) {
        return;
    }
    let bias = add.is_some_and(|a| a.len() == n);
    let row = |(r, y): (usize, &mut [f32])| {
        let add = add.map(|a| if bias { a } else { &a[r * n..(r + 1) * n] });
        epilogue(scale, add, y)
    };
    if l.out.len() >= PARALLEL_MIN_WEIGHTS && l.out.len() > n {
        l.out.par_chunks_mut(n).enumerate().for_each(row);
    } else {
        l.out.chunks_mut(n).enumerate().for_each(row);
    }
}

/// `y[j] = y[j] · scale[j] + add[j]` (each slice as long as `y`).
#[inline]
fn epilogue(scale: Option<&[f32]>, add: Option<&[f32]>, y: &mut [f32]) {
    if let Some(s) = scale {
        for (v, s) in y.iter_mut().zip(s) {
            *v *= s;
        }
    }
    if let Some(a) = add {
        for (v, a) in y.iter_mut().zip(a) {
            *v += a;
        }
    }
}

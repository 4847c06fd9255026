//! Row-wise kernels over the last axis of a row-major f32 tensor: [`rmsnorm`], [`layernorm`]
//! and [`softmax`].
//! `x` and `y` hold `rows × cols` elements; rows are spread over [`crate::threads`] threads
//! when there are enough elements. The loops are plain Rust compiled three times (AVX-512,
//! AVX2 + FMA, portable) and picked at run time; LLVM vectorizes them.

use crate::simd::{exp, hsum, madd, vector_level, Isa, LANES};
use crate::KernelError;
use rayon::prelude::*;

/// Tensors with fewer elements than this run on the calling thread only.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

fn check(what: &str, rows: usize, cols: usize, lens: &[usize]) -> Result<(), KernelError> {
    let need = rows.saturating_mul(cols);
    if lens.iter().any(|&l| l != need) {
        return Err(KernelError::Layout(format!(
            "{what} {rows}x{cols}: operands have {lens:?} elements, want {need}"
        )));
    }
    Ok(())
}

/// Runs `row(x_row, y_row)` on every row, in parallel when large.
fn for_rows(cols: usize, x: &[f32], y: &mut [f32], row: impl Fn(&[f32], &mut [f32]) + Sync) {
    if cols == 0 {
        return;
    }
    let rows = x.len() / cols;
    if crate::threads() > 1 && x.len() >= PARALLEL_MIN_ELEMS && rows > 1 {
        let per = rows.div_ceil(crate::threads() * 4).max(1) * cols;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(cols).zip(xb.chunks_exact(cols)) {
                    row(xr, yr)
                }
            });
    } else {
        for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            row(xr, yr)
        }
    }
}

/// Compiles `$body::<true>` for AVX-512 and AVX2 + FMA and `$body::<false>` portably, and
/// dispatches on `$isa`.
macro_rules! dispatch_row {
    ($isa:expr, $body:ident, $a:expr, $w:expr, $b:expr) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        fn f512(x: &[f32], y: &mut [f32], a: f64, w: &[f32], b: &[f32]) {
            $body::<true>(x, y, a, w, b)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn f256(x: &[f32], y: &mut [f32], a: f64, w: &[f32], b: &[f32]) {
            $body::<true>(x, y, a, w, b)
        }
        let lvl = vector_level($isa);
        let (a, w, b) = ($a, $w, $b);
        move |x: &[f32], y: &mut [f32]| match lvl {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => {
                // SAFETY: `level` returned an available level, so AVX-512 F/BW/VL, AVX2 and
                // FMA are present.
                unsafe { f512(x, y, a, w, b) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: `level` returned an available level, so AVX2 and FMA are present.
                unsafe { f256(x, y, a, w, b) }
            }
            _ => $body::<false>(x, y, a, w, b),
        }
    }};
}

/// `y = x / sqrt(mean(x²) + eps) · weight` over each row of `cols` (the IR's `rmsnorm`), at
/// the best [`Isa`]. The sum of squares is accumulated in f32 lanes; the scale
/// `1 / sqrt(mean + eps)` is computed in f64.
pub fn rmsnorm(
    rows: usize,
    cols: usize,
    x: &[f32],
    weight: &[f32],
    eps: f64,
    y: &mut [f32],
) -> Result<(), KernelError> {
    rmsnorm_with(Isa::best(), rows, cols, x, weight, eps, y)
}

/// As [`rmsnorm`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_with(
    isa: Isa,
    rows: usize,
    cols: usize,
    x: &[f32],
    weight: &[f32],
    eps: f64,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check("rmsnorm", rows, cols, &[x.len(), y.len()])?;
    check("rmsnorm weight", 1, cols, &[weight.len()])?;
    let row = dispatch_row!(isa, rmsnorm_row, eps, weight, &[]);
    for_rows(cols, x, y, row);
    Ok(())
}

#[inline(always)]
fn rmsnorm_row<const FMA: bool>(x: &[f32], y: &mut [f32], eps: f64, w: &[f32], _: &[f32]) {
    let mut acc = [0.0f32; LANES];
    let mut cx = x.chunks_exact(LANES);
    for c in &mut cx {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(c[l], c[l], acc[l]);
        }
    }
    let tail: f32 = cx.remainder().iter().map(|v| v * v).sum();
    let ss = f64::from(hsum(&acc) + tail);
    let scale = (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, v), g) in y.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// `y = (x - mean) / sqrt(var + eps) · weight + bias` over each row of `cols` (the IR's
/// `layernorm`, biased variance), at the best [`Isa`]. The mean and the sum of squared
/// deviations are accumulated in f32 lanes (two passes over the row); the scale
/// `1 / sqrt(var + eps)` is computed in f64.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(
    rows: usize,
    cols: usize,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    y: &mut [f32],
) -> Result<(), KernelError> {
    layernorm_with(Isa::best(), rows, cols, x, weight, bias, eps, y)
}

/// As [`layernorm`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_with(
    isa: Isa,
    rows: usize,
    cols: usize,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check("layernorm", rows, cols, &[x.len(), y.len()])?;
    check(
        "layernorm weight and bias",
        1,
        cols,
        &[weight.len(), bias.len()],
    )?;
    let row = dispatch_row!(isa, layernorm_row, eps, weight, bias);
    for_rows(cols, x, y, row);
    Ok(())
}

#[inline(always)]
fn layernorm_row<const FMA: bool>(x: &[f32], y: &mut [f32], eps: f64, w: &[f32], b: &[f32]) {
    let n = x.len() as f64;
    let mut acc = [0.0f32; LANES];
    let mut cx = x.chunks_exact(LANES);
    for c in &mut cx {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let tail: f32 = cx.remainder().iter().sum();
    let mean = (f64::from(hsum(&acc) + tail) / n) as f32;
    let mut acc = [0.0f32; LANES];
    let mut cx = x.chunks_exact(LANES);
    for c in &mut cx {
        for l in 0..LANES {
            let d = c[l] - mean;
            acc[l] = madd::<FMA>(d, d, acc[l]);
        }
    }
    let tail: f32 = cx.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    let var = f64::from(hsum(&acc) + tail) / n;
    let scale = (1.0 / (var + eps).sqrt()) as f32;
    for (((o, v), g), c) in y.iter_mut().zip(x).zip(w).zip(b) {
        *o = madd::<FMA>((v - mean) * scale, *g, *c);
    }
}

/// `y = exp(x - max) / Σ exp(x - max)` over each row of `cols` (the IR's `softmax` on the last
/// axis), at the best [`Isa`]. exp is a vectorizable polynomial within 2 ulp (values below
/// e^-87.3 relative to the row's maximum flush to 0); the sum is accumulated in f32 lanes.
pub fn softmax(rows: usize, cols: usize, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    softmax_with(Isa::best(), rows, cols, x, y)
}

/// As [`softmax`] at instruction-set level `isa`.
pub fn softmax_with(
    isa: Isa,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    check("softmax", rows, cols, &[x.len(), y.len()])?;
    let row = dispatch_row!(isa, softmax_row, 0.0, &[], &[]);
    for_rows(cols, x, y, row);
    Ok(())
}

#[inline(always)]
fn softmax_row<const FMA: bool>(x: &[f32], y: &mut [f32], _: f64, _: &[f32], _: &[f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut cx = x.chunks_exact(LANES);
    for c in &mut cx {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
        }
    }
    let m = cx
        .remainder()
        .iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    // A row of -inf (or all NaN) has no finite maximum: subtract 0 instead, as the reference's
    // arithmetic then gives NaN everywhere (0/0) for -inf rows.
    let m = if m.is_finite() { m } else { 0.0 };
    let mut acc = [0.0f32; LANES];
    let mut cy = y.chunks_exact_mut(LANES);
    let mut cx = x.chunks_exact(LANES);
    for (o, c) in (&mut cy).zip(&mut cx) {
        for l in 0..LANES {
            let e = exp::<FMA>(c[l] - m);
            o[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0.0f32;
    for (o, v) in cy.into_remainder().iter_mut().zip(cx.remainder()) {
        let e = exp::<FMA>(v - m);
        *o = e;
        tail += e;
    }
    let inv = 1.0 / (hsum(&acc) + tail);
    for o in y.iter_mut() {
        *o *= inv;
    }
}

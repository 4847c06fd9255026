//! Matrix-vector products for decode: `y[n] = W[n, k] · x[k]`, W row-major (dense, row stride
//! k), x and y f32, accumulated in f32. Rows are split over the [`crate::pool`] team (each
//! member a contiguous share).
//!
//! [`gemv_bf16`] takes bf16 weights. On every path x is first rounded to bf16 (to nearest
//! even), so the result is `Σ_j W[i,j] · bf16(x[j])` accumulated in f32 whatever the CPU: the
//! AVX512-BF16 path multiplies bf16 pairs with `vdpbf16ps` (the products of two bf16 are exact
//! in f32), the AVX2 and portable paths widen W to f32 by a 16-bit shift and use f32 FMAs.
//! Only the order of the f32 additions differs between paths.
//!
//! [`gemv_f8e4m3`] and [`gemv_f8e4m3_batch`] take fp8 e4m3 weights with a per-tensor scale
//! (module `f8`). [`gemv_narrow_batch`] takes bf16, f16 or fp8 weights and leaves x in f32 (module
//! `narrow`).

use crate::simd::{dot, madd, Isa, LANES};
use crate::KernelError;
use half::bf16;

mod f8;
mod narrow;
pub(crate) use f8::dot_rows as dot_rows_f8e4m3;
pub(crate) use f8::PreparedX;
pub use f8::{gemv_f8e4m3, gemv_f8e4m3_batch, gemv_f8e4m3_batch_with, gemv_f8e4m3_with, MAX_BATCH};
pub use narrow::{gemv_narrow_batch, gemv_narrow_batch_with, Narrow};

/// Products with fewer weights than this run on the calling thread only.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 15;

fn check(n: usize, k: usize, w: usize, x: usize, y: usize) -> Result<(), KernelError> {
    let need = n
        .checked_mul(k)
        .ok_or_else(|| KernelError::Layout(format!("{n}x{k} overflows")))?;
    if w != need || x != k || y != n {
        return Err(KernelError::Layout(format!(
            "gemv {n}x{k}: W has {w} elements (want {need}), x {x} (want {k}), y {y} (want {n})"
        )));
    }
    Ok(())
}

/// Splits the `n` rows of `y` (`width` elements each) over the threads (blocks of a multiple
/// of 4 rows) and runs `rows(first_row, y_block)` on each block.
fn split_rows(
    n: usize,
    k: usize,
    width: usize,
    y: &mut [f32],
    rows: impl Fn(usize, &mut [f32]) + Sync,
) {
    let threads = crate::threads();
    if threads <= 1 || n * k * width < PARALLEL_MIN_WEIGHTS || n < 8 {
        rows(0, y);
        return;
    }
    // Several blocks per thread so an uneven split costs little; at least 4 rows each.
    let block = n.div_ceil(threads * 8).next_multiple_of(4).max(4);
    // Inline for up to 16 threads' blocks: no allocation per call.
    let mut blocks: smallvec::SmallVec<[&mut [f32]; 128]> = y.chunks_mut(block * width).collect();
    crate::pool::for_each(&mut blocks, |b, yb| rows(b * block, yb));
}

/// `y = W · bf16(x)` with bf16 weights `w` (`n × k`, row-major), at the best [`Isa`].
pub fn gemv_bf16(
    n: usize,
    k: usize,
    w: &[bf16],
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_bf16_with(Isa::best(), n, k, w, x, y)
}

/// As [`gemv_bf16`] at instruction-set level `isa` (lowered to the best available one the
/// kernel has: AVX512-BF16, AVX2 or portable).
pub fn gemv_bf16_with(
    isa: Isa,
    n: usize,
    k: usize,
    w: &[bf16],
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    check(n, k, w.len(), x.len(), y.len())?;
    if n == 0 {
        return Ok(());
    }
    // bf16 bit patterns of the weights.
    let wb: &[u16] = bytemuck_u16(w);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Bf16 && Isa::Avx512Bf16.available() {
        let xb: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        split_rows(n, k, 1, y, |r0, yb| {
            let wrows = &wb[r0 * k..(r0 + yb.len()) * k];
            // SAFETY: the CPU has AVX-512 F/BW/VL and BF16 (checked just above); the slices
            // hold yb.len() rows of k weights and k values of x, as the kernel requires.
            unsafe { x86::rows_bf16_avx512(wrows, k, &xb, yb) }
        });
        return Ok(());
    }
    let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && Isa::Avx2.available() {
        split_rows(n, k, 1, y, |r0, yb| {
            let wrows = &wb[r0 * k..(r0 + yb.len()) * k];
            // SAFETY: the CPU has AVX2 and FMA (checked just above); the slices hold yb.len()
            // rows of k weights and k values of x, as the kernel requires.
            unsafe { x86::rows_bf16_avx2(wrows, k, &xr, yb) }
        });
        return Ok(());
    }
    split_rows(n, k, 1, y, |r0, yb| {
        for (i, yi) in yb.iter_mut().enumerate() {
            let row = &wb[(r0 + i) * k..(r0 + i + 1) * k];
            *yi = dot_bf16_portable(row, &xr);
        }
    });
    Ok(())
}

/// The bit patterns of a bf16 slice.
fn bytemuck_u16(w: &[bf16]) -> &[u16] {
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over `u16`, so a `[bf16]` is a `[u16]` of
    // the same length, alignment and validity (every bit pattern is a valid u16).
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u16>(), w.len()) }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
fn widen(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `Σ widen(w[j]) · x[j]` in `LANES` f32 lanes.
fn dot_bf16_portable(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut cw = w.chunks_exact(LANES);
    let mut cx = x.chunks_exact(LANES);
    for (a, b) in (&mut cw).zip(&mut cx) {
        for l in 0..LANES {
            acc[l] = madd::<false>(widen(a[l]), b[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (a, b) in cw.remainder().iter().zip(cx.remainder()) {
        tail = madd::<false>(widen(*a), *b, tail);
    }
    crate::simd::hsum(&acc) + tail
}

/// `y = W · x` with f32 weights `w` (`n × k`, row-major), at the best [`Isa`].
pub fn gemv_f32(
    n: usize,
    k: usize,
    w: &[f32],
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_f32_with(Isa::best(), n, k, w, x, y)
}

/// As [`gemv_f32`] at instruction-set level `isa` (AVX-512, AVX2 or portable).
pub fn gemv_f32_with(
    isa: Isa,
    n: usize,
    k: usize,
    w: &[f32],
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    check(n, k, w.len(), x.len(), y.len())?;
    if n == 0 {
        return Ok(());
    }
    let level = crate::simd::vector_level(isa);
    split_rows(n, k, 1, y, |r0, yb| {
        f32_rows(level, &w[r0 * k..(r0 + yb.len()) * k], k, x, yb)
    });
    Ok(())
}

/// `yb[i] = W_i · x` for the rows of `wrows` (each `k` long) at `level`, a level returned by
/// [`crate::simd::vector_level`] (so available on this CPU).
pub(crate) fn f32_rows(level: Isa, wrows: &[f32], k: usize, x: &[f32], yb: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => {
            // SAFETY: AVX-512 F/BW/VL, AVX2 and FMA are available (`level` is an available
            // level at or above Avx512).
            unsafe { x86::rows_f32_avx512(wrows, k, x, yb) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: AVX2 and FMA are available (`level` is an available level).
            unsafe { x86::rows_f32_avx2(wrows, k, x, yb) }
        }
        _ => rows_f32::<false>(wrows, k, x, yb),
    }
}

/// `yb[i] = W_i · x` for the rows of `wrows` (each `k` long). Four rows are read side by side
/// (four memory streams, one load of x for four rows), each accumulated in `LANES` f32 lanes.
#[inline(always)]
fn rows_f32<const FMA: bool>(wrows: &[f32], k: usize, x: &[f32], yb: &mut [f32]) {
    if k == 0 {
        yb.fill(0.0);
        return;
    }
    let mut quads = wrows.chunks_exact(4 * k);
    let mut yq = yb.chunks_exact_mut(4);
    for (w4, y4) in (&mut quads).zip(&mut yq) {
        let (r0, rest) = w4.split_at(k);
        let (r1, rest) = rest.split_at(k);
        let (r2, r3) = rest.split_at(k);
        let mut acc = [[0.0f32; LANES]; 4];
        let full = k / LANES * LANES;
        let next = w4.as_ptr_range().end;
        let mut j = 0;
        while j < full {
            // The next four rows (contiguous) stream in while these are computed: four rows
            // read side by side are too many short streams for the hardware prefetcher.
            for line in 0..4 {
                crate::simd::prefetch(next.wrapping_add(4 * j + line * LANES));
            }
            let xv = &x[j..j + LANES];
            let (a, b, c, d) = (
                &r0[j..j + LANES],
                &r1[j..j + LANES],
                &r2[j..j + LANES],
                &r3[j..j + LANES],
            );
            for l in 0..LANES {
                acc[0][l] = madd::<FMA>(a[l], xv[l], acc[0][l]);
                acc[1][l] = madd::<FMA>(b[l], xv[l], acc[1][l]);
                acc[2][l] = madd::<FMA>(c[l], xv[l], acc[2][l]);
                acc[3][l] = madd::<FMA>(d[l], xv[l], acc[3][l]);
            }
            j += LANES;
        }
        for (i, row) in [r0, r1, r2, r3].into_iter().enumerate() {
            let mut t = 0.0f32;
            for jj in full..k {
                t = madd::<FMA>(row[jj], x[jj], t);
            }
            y4[i] = crate::simd::hsum(&acc[i]) + t;
        }
    }
    for (row, yi) in quads.remainder().chunks_exact(k).zip(yq.into_remainder()) {
        *yi = dot::<FMA>(row, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::rows_f32;
    use std::arch::x86_64::*;

    /// f32 GEMV rows compiled for AVX-512 (auto-vectorized [`rows_f32`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn rows_f32_avx512(wrows: &[f32], k: usize, x: &[f32], yb: &mut [f32]) {
        rows_f32::<true>(wrows, k, x, yb)
    }

    /// f32 GEMV rows compiled for AVX2 + FMA (auto-vectorized [`rows_f32`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rows_f32_avx2(wrows: &[f32], k: usize, x: &[f32], yb: &mut [f32]) {
        rows_f32::<true>(wrows, k, x, yb)
    }

    /// `yb[i] = Σ_j W[i,j] · xb[j]` with `vdpbf16ps`: `w` holds `yb.len()` rows of `k` bf16
    /// weights, `xb` the `k` bf16 values of x. Four rows share each load of x; the last
    /// `k % 32` columns are read with zero-masked loads (zeros add nothing).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) fn rows_bf16_avx512(w: &[u16], k: usize, xb: &[u16], yb: &mut [f32]) {
        assert!(w.len() == yb.len() * k && xb.len() == k);
        let full = k / 32;
        let rem = k % 32;
        let mask: __mmask32 = ((1u64 << rem) - 1) as u32;
        let wp = w.as_ptr();
        let xp = xb.as_ptr();
        // Loads 32 bf16 at `p + off` (or the first `rem` of them, zero-filled, when `tail`).
        // SAFETY (for every call below): `off + 32 ≤ len` for full blocks and `off + rem ≤
        // len` for the masked tail of each row (masked-off lanes are not accessed), where the
        // row starts at `r·k` inside `w` (r < yb.len()) or at 0 inside `xb`, both checked by
        // the assert above.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn ld(p: *const u16, off: usize, tail: Option<__mmask32>) -> __m512bh {
            // SAFETY: see the caller's contract just above.
            let v = unsafe {
                match tail {
                    None => _mm512_loadu_si512(p.add(off).cast()),
                    Some(m) => _mm512_maskz_loadu_epi16(m, p.add(off).cast()),
                }
            };
            // SAFETY: both are 512-bit plain-data vectors; any bit pattern is valid.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
        }
        let rows = yb.len();
        let mut r = 0;
        while r + 4 <= rows {
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let base = r * k;
            for c in 0..full {
                let off = c * 32;
                // SAFETY: full blocks of rows r..r+4 and of x, in bounds (see `ld`).
                unsafe {
                    let xv = ld(xp, off, None);
                    a0 = _mm512_dpbf16_ps(a0, ld(wp, base + off, None), xv);
                    a1 = _mm512_dpbf16_ps(a1, ld(wp, base + k + off, None), xv);
                    a2 = _mm512_dpbf16_ps(a2, ld(wp, base + 2 * k + off, None), xv);
                    a3 = _mm512_dpbf16_ps(a3, ld(wp, base + 3 * k + off, None), xv);
                }
            }
            if rem > 0 {
                let off = full * 32;
                // SAFETY: masked tails of rows r..r+4 and of x, in bounds (see `ld`).
                unsafe {
                    let xv = ld(xp, off, Some(mask));
                    a0 = _mm512_dpbf16_ps(a0, ld(wp, base + off, Some(mask)), xv);
                    a1 = _mm512_dpbf16_ps(a1, ld(wp, base + k + off, Some(mask)), xv);
                    a2 = _mm512_dpbf16_ps(a2, ld(wp, base + 2 * k + off, Some(mask)), xv);
                    a3 = _mm512_dpbf16_ps(a3, ld(wp, base + 3 * k + off, Some(mask)), xv);
                }
            }
            yb[r] = _mm512_reduce_add_ps(a0);
            yb[r + 1] = _mm512_reduce_add_ps(a1);
            yb[r + 2] = _mm512_reduce_add_ps(a2);
            yb[r + 3] = _mm512_reduce_add_ps(a3);
            r += 4;
        }
        while r < rows {
            let mut a0 = _mm512_setzero_ps();
            let base = r * k;
            for c in 0..full {
                let off = c * 32;
                // SAFETY: a full block of row r and of x, in bounds (see `ld`).
                unsafe { a0 = _mm512_dpbf16_ps(a0, ld(wp, base + off, None), ld(xp, off, None)) };
            }
            if rem > 0 {
                let off = full * 32;
                // SAFETY: the masked tail of row r and of x, in bounds (see `ld`).
                unsafe {
                    a0 = _mm512_dpbf16_ps(
                        a0,
                        ld(wp, base + off, Some(mask)),
                        ld(xp, off, Some(mask)),
                    )
                };
            }
            yb[r] = _mm512_reduce_add_ps(a0);
            r += 1;
        }
    }

    /// `yb[i] = Σ_j widen(W[i,j]) · xr[j]` with AVX2: W widened 8 at a time by zero-extending
    /// to 32 bits and shifting left 16, then f32 FMAs; four rows share each load of x.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rows_bf16_avx2(w: &[u16], k: usize, xr: &[f32], yb: &mut [f32]) {
        assert!(w.len() == yb.len() * k && xr.len() == k);
        let full = k / 8;
        let wp = w.as_ptr();
        let xp = xr.as_ptr();
        // SAFETY (callers): `off + 8 ≤ w.len()`, checked by the assert and the loop bounds.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn wv(p: *const u16, off: usize) -> __m256 {
            // SAFETY: 8 u16 = 16 bytes at p+off are in bounds (caller); unaligned load.
            let h = unsafe { _mm_loadu_si128(p.add(off).cast()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
        let tail = |row: usize| -> f32 {
            let mut t = 0.0f32;
            for j in full * 8..k {
                t = super::widen(w[row * k + j]).mul_add(xr[j], t);
            }
            t
        };
        let rows = yb.len();
        let mut r = 0;
        while r + 4 <= rows {
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let base = r * k;
            for c in 0..full {
                let off = c * 8;
                // SAFETY: columns off..off+8 < k of rows r..r+4 (< yb.len()) and of x.
                unsafe {
                    let xv = _mm256_loadu_ps(xp.add(off));
                    a0 = _mm256_fmadd_ps(wv(wp, base + off), xv, a0);
                    a1 = _mm256_fmadd_ps(wv(wp, base + k + off), xv, a1);
                    a2 = _mm256_fmadd_ps(wv(wp, base + 2 * k + off), xv, a2);
                    a3 = _mm256_fmadd_ps(wv(wp, base + 3 * k + off), xv, a3);
                }
            }
            yb[r] = hsum(a0) + tail(r);
            yb[r + 1] = hsum(a1) + tail(r + 1);
            yb[r + 2] = hsum(a2) + tail(r + 2);
            yb[r + 3] = hsum(a3) + tail(r + 3);
            r += 4;
        }
        while r < rows {
            let mut a0 = _mm256_setzero_ps();
            for c in 0..full {
                let off = c * 8;
                // SAFETY: columns off..off+8 < k of row r (< yb.len()) and of x.
                unsafe {
                    a0 = _mm256_fmadd_ps(wv(wp, r * k + off), _mm256_loadu_ps(xp.add(off)), a0)
                };
            }
            yb[r] = hsum(a0) + tail(r);
            r += 1;
        }
    }
}

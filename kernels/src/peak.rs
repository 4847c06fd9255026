//! Machine ceilings: the rates no kernel can beat, measured on this CPU with all of rayon's
//! threads. Each function runs its loop `trials` times and returns the best rate (a ceiling is
//! the fastest the machine was seen to go).
//!
//! * [`fma_f32_gflops`]: register-only f32 FMA throughput at the widest available vector;
//! * [`dot_bf16_gflops`]: register-only `vdpbf16ps` throughput (`None` without AVX512-BF16);
//! * [`read_gbps`]: streaming read of a buffer far larger than the caches (summed, four
//!   streams per thread);
//! * [`copy_gbps`]: streaming copy, counting the bytes read plus the bytes written.

use crate::simd::{hsum, Isa, LANES};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Runs `f` once on every thread of the pool, `trials` times; returns the shortest wall time
/// in seconds.
fn best_broadcast(trials: usize, f: impl Fn() + Sync) -> f64 {
    (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            rayon::broadcast(|_| f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Independent accumulators per thread in the register loops (enough to cover FMA latency ×
/// throughput on current cores).
const CHAINS: usize = 12;
/// Loop iterations per thread per trial.
const ITERS: usize = 4_000_000;

/// Peak f32 FMA rate in GFLOP/s (2 flops per lane per FMA) over all threads, at AVX-512 or
/// AVX2 width; `None` when neither is available.
pub fn fma_f32_gflops(trials: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let (secs, lanes) = if Isa::Avx512.available() {
            // SAFETY: AVX-512 F is available (checked).
            (best_broadcast(trials, || unsafe { x86::fma512(ITERS) }), 16)
        } else if Isa::Avx2.available() {
            // SAFETY: AVX2 and FMA are available (checked).
            (best_broadcast(trials, || unsafe { x86::fma256(ITERS) }), 8)
        } else {
            return None;
        };
        let flops = (crate::threads() * ITERS * CHAINS * lanes * 2) as f64;
        Some(flops / secs / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = trials;
        None
    }
}

/// Peak bf16 dot-product rate in GFLOP/s (`vdpbf16ps`: 32 multiply-adds, 64 flops, per
/// instruction) over all threads; `None` without AVX512-BF16.
pub fn dot_bf16_gflops(trials: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !Isa::Avx512Bf16.available() {
            return None;
        }
        // SAFETY: AVX-512 F and BF16 are available (checked).
        let secs = best_broadcast(trials, || unsafe { x86::dpbf16(ITERS) });
        let flops = (crate::threads() * ITERS * CHAINS * 64) as f64;
        Some(flops / secs / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = trials;
        None
    }
}

/// Default buffer size of the bandwidth measurements: far beyond any cache.
pub const BANDWIDTH_BYTES: usize = 256 << 20;

/// Streaming read bandwidth in GB/s: sums `bytes` of f32 (split over the threads).
pub fn read_gbps(bytes: usize, trials: usize) -> f64 {
    let v = vec![1.0f32; (bytes / 4).max(LANES)];
    let chunk = v.len().div_ceil(crate::threads());
    let best = (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            let s: f32 = v.par_chunks(chunk).map(sum).sum();
            black_box(s);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (v.len() * 4) as f64 / best / 1e9
}

/// Streaming copy bandwidth in GB/s, counting bytes read plus bytes written (2 · `bytes` per
/// copy), split over the threads.
pub fn copy_gbps(bytes: usize, trials: usize) -> f64 {
    let src = vec![1.0f32; (bytes / 4).max(1)];
    let mut dst = vec![0.0f32; src.len()];
    let chunk = src.len().div_ceil(crate::threads());
    let best = (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&mut dst);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (2 * src.len() * 4) as f64 / best / 1e9
}

/// Sum of a slice at the best level (vectorized).
fn sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.available() {
        // SAFETY: AVX-512 F/BW/VL are available (checked).
        return unsafe { x86::sum512(v) };
    }
    sum_body(v)
}

/// Sum of `v` read as four streams side by side (its quarters), as the GEMV kernels read four
/// rows: one stream per core leaves read bandwidth unused.
#[inline(always)]
fn sum_body(v: &[f32]) -> f32 {
    let q = v.len() / 4 / LANES * LANES;
    let (p0, rest) = v.split_at(q);
    let (p1, rest) = rest.split_at(q);
    let (p2, rest) = rest.split_at(q);
    let (p3, tail) = rest.split_at(q);
    let mut acc = [[0.0f32; LANES]; 4];
    for j in (0..q).step_by(LANES) {
        for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
            let c = &p[j..j + LANES];
            for l in 0..LANES {
                a[l] += c[l];
            }
        }
    }
    acc.iter().map(hsum).sum::<f32>() + tail.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn sum512(v: &[f32]) -> f32 {
        super::sum_body(v)
    }

    /// `iters` rounds of `CHAINS` independent 512-bit FMAs.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn fma512(iters: usize) {
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); super::CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_fmadd_ps(*c, a, b);
            }
        }
        black_box(acc);
    }

    /// `iters` rounds of `CHAINS` independent 256-bit FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma256(iters: usize) {
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); super::CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_fmadd_ps(*c, a, b);
            }
        }
        black_box(acc);
    }

    /// `iters` rounds of `CHAINS` independent `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) fn dpbf16(iters: usize) {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(black_box(0.5)), _mm512_set1_ps(0.25));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(black_box(1e-3)), _mm512_set1_ps(1e-3));
        let mut acc = [_mm512_setzero_ps(); super::CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_dpbf16_ps(*c, a, b);
            }
        }
        black_box(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_measure_positive_rates() {
        assert!(read_gbps(1 << 20, 1) > 0.0);
        assert!(copy_gbps(1 << 20, 1) > 0.0);
        assert!(sum_body(&[1.0; 1000]) == 1000.0);
        if Isa::Avx2.available() {
            assert!(fma_f32_gflops(1).is_some_and(|r| r > 0.0));
        }
        assert_eq!(dot_bf16_gflops(1).is_some(), Isa::Avx512Bf16.available());
    }
}

//! Fused elementwise kernels over f32 slices, split over [`crate::threads`] threads when large.
//! The loops are plain Rust compiled for AVX-512, AVX2 + FMA and portably, picked at run time.

use crate::simd::{exp, vector_level, Isa};
use crate::KernelError;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `y = silu(a) · b = a / (1 + exp(-a)) · b` elementwise (the gated MLP's activation), at the
/// best [`Isa`]. Within a few ulp of the exact value (exp as in [`crate::rowwise::softmax`]).
pub fn silu_mul(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    silu_mul_with(Isa::best(), a, b, y)
}

/// As [`silu_mul`] at instruction-set level `isa`.
pub fn silu_mul_with(isa: Isa, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    if a.len() != y.len() || b.len() != y.len() {
        return Err(KernelError::Layout(format!(
            "silu_mul: a has {}, b {}, y {} elements",
            a.len(),
            b.len(),
            y.len()
        )));
    }
    let level = vector_level(isa);
    let f = |a: &[f32], b: &[f32], y: &mut [f32]| match level {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => {
            // SAFETY: `level` is available, so AVX-512 F/BW/VL, AVX2 and FMA are present.
            unsafe { x86::silu_mul_avx512(a, b, y) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `level` is available, so AVX2 and FMA are present.
            unsafe { x86::silu_mul_avx2(a, b, y) }
        }
        _ => silu_mul_body::<false>(a, b, y),
    };
    if crate::threads() > 1 && y.len() >= 2 * CHUNK {
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(y, (a, b))| f(a, b, y));
    } else {
        f(a, b, y);
    }
    Ok(())
}

#[inline(always)]
fn silu_mul_body<const FMA: bool>(a: &[f32], b: &[f32], y: &mut [f32]) {
    for ((o, &x), &g) in y.iter_mut().zip(a).zip(b) {
        *o = x / (1.0 + exp::<FMA>(-x)) * g;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::silu_mul_body;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn silu_mul_avx512(a: &[f32], b: &[f32], y: &mut [f32]) {
        silu_mul_body::<true>(a, b, y)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul_avx2(a: &[f32], b: &[f32], y: &mut [f32]) {
        silu_mul_body::<true>(a, b, y)
    }
}

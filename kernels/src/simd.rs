//! Run-time CPU feature detection, cached.

use std::sync::OnceLock;

/// The SIMD extensions the kernels can use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2 and FMA.
    pub avx2_fma: bool,
    /// AVX-512 F, BW and VL.
    pub avx512: bool,
    /// AVX-512 BF16 (`vdpbf16ps`) together with [`Features::avx512`].
    pub avx512_bf16: bool,
}

/// The features of this CPU, detected once. `KILN_KERNELS_PORTABLE=1` in the environment turns
/// them all off (to exercise the portable paths).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        if std::env::var_os("KILN_KERNELS_PORTABLE").is_some_and(|v| v == "1") {
            return Features::default();
        }
        detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = avx2_fma
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    let avx512_bf16 = avx512 && is_x86_feature_detected!("avx512bf16");
    Features {
        avx2_fma,
        avx512,
        avx512_bf16,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// An instruction-set level a kernel can be run at; [`Isa::best`] is what the kernels pick.
/// Kernels without a path of their own for a level use the next lower one they have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW/VL (+ AVX2, FMA).
    Avx512,
    /// [`Isa::Avx512`] plus AVX-512 BF16.
    Avx512Bf16,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

    /// True when this CPU (as [`features`] reports it) can run this level.
    pub fn available(self) -> bool {
        let f = features();
        match self {
            Isa::Portable => true,
            Isa::Avx2 => f.avx2_fma,
            Isa::Avx512 => f.avx512,
            Isa::Avx512Bf16 => f.avx512_bf16,
        }
    }

    /// The highest available level.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.available())
            .unwrap_or(Isa::Portable)
    }

    /// A short name ("portable", "avx2", "avx512", "avx512bf16").
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The highest level at or below `isa` among those the plain-Rust kernels are compiled for
/// (AVX-512, AVX2 + FMA, portable) that this CPU has.
pub(crate) fn vector_level(isa: Isa) -> Isa {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .find(|i| *i <= isa && i.available())
        .unwrap_or(Isa::Portable)
}

/// `a · b + c`, fused when `FMA` (only instantiate `FMA = true` inside functions compiled with
/// the `fma` target feature, where it is one instruction; elsewhere it would be a libm call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes of the portable accumulation loops: wide enough for one AVX-512 register, so LLVM's
/// auto-vectorizer maps each `[f32; LANES]` step to one vector instruction.
pub(crate) const LANES: usize = 16;

/// Dot product of two equal-length slices, accumulated in `2 · LANES` f32 lanes (the pairwise
/// order differs from a left-to-right sum; the error bound is that of a blocked sum).
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc0 = [0.0f32; LANES];
    let mut acc1 = [0.0f32; LANES];
    let mut ca = a.chunks_exact(2 * LANES);
    let mut cb = b.chunks_exact(2 * LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc0[l] = madd::<FMA>(x[l], y[l], acc0[l]);
            acc1[l] = madd::<FMA>(x[LANES + l], y[LANES + l], acc1[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    hsum(&acc0) + hsum(&acc1) + tail
}

/// Sum of the lanes, pairwise.
#[inline(always)]
pub(crate) fn hsum(v: &[f32; LANES]) -> f32 {
    let mut h = [0.0f32; LANES / 2];
    for l in 0..LANES / 2 {
        h[l] = v[l] + v[l + LANES / 2];
    }
    let mut q = [0.0f32; LANES / 4];
    for l in 0..LANES / 4 {
        q[l] = h[l] + h[l + LANES / 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `exp(x)` in f32 for vectorized loops: Cephes' range reduction `x = n·ln 2 + r` and degree-6
/// polynomial, with `2^n` built from the exponent bits; within 2 ulp of the exact value for
/// `x` in [-87.33, 88.37]. Below that it returns 0 (results under `f32::MIN_POSITIVE` are
/// flushed), above it +inf; NaN stays NaN. Only plain arithmetic, comparisons and bit casts, so
/// loops calling it auto-vectorize.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.376_26;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer.
    let xc = x.clamp(LO, HI);
    let t = madd::<FMA>(xc, std::f32::consts::LOG2_E, MAGIC);
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let n = t - MAGIC;
    let r = madd::<FMA>(n, -0.693_359_4, xc);
    let r = madd::<FMA>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 0.166_666_65);
    p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p * r, r, r) + 1.0;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = p * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            for fma in [false, true] {
                let got = if fma { exp::<true>(x) } else { exp::<false>(x) };
                let want = f64::from(x).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                worst = worst.max((f64::from(got) - want).abs() / ulp);
            }
            x += 0.013;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp::<false>(-100.0), 0.0);
        assert_eq!(exp::<false>(100.0), f32::INFINITY);
        assert_eq!(exp::<false>(f32::NEG_INFINITY), 0.0);
        assert!(exp::<false>(f32::NAN).is_nan());
        assert_eq!(exp::<false>(0.0), 1.0);
    }

    #[test]
    fn dot_and_hsum_handle_every_length() {
        for n in [0usize, 1, 7, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            let got = f64::from(dot::<false>(&a, &b));
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{n}: {got} vs {want}"
            );
        }
    }
}

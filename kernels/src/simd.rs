//! Run-time CPU feature detection, cached.

use std::sync::OnceLock;

/// The SIMD extensions the kernels can use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2, FMA and F16C.
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
    // Every CPU with AVX2 and FMA has F16C too; the fp8 GEMV's widening uses it.
    let avx2_fma = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
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
    /// AVX2 + FMA (+ F16C).
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

/// `tanh(x)` in f32 with a rational minimax approximation on `[-7.905, 7.905]` (its value at
/// ±7.905 up to |x| = 9, exactly ±1 beyond, `x` itself below 4e-4), within a few ulp; NaN
/// stays NaN. Vectorizable like [`exp`].
#[inline(always)]
pub(crate) fn tanh<const FMA: bool>(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let xc = x.clamp(-CLAMP, CLAMP);
    let x2 = xc * xc;
    let mut p = -2.760_768_5e-16f32;
    p = madd::<FMA>(x2, p, 2.000_188e-13);
    p = madd::<FMA>(x2, p, -8.604_672e-11);
    p = madd::<FMA>(x2, p, 5.122_297e-8);
    p = madd::<FMA>(x2, p, 1.485_722_4e-5);
    p = madd::<FMA>(x2, p, 6.372_619_3e-4);
    p = madd::<FMA>(x2, p, 4.893_524_6e-3);
    let p = p * xc;
    let mut q = 1.198_258_4e-6f32;
    q = madd::<FMA>(x2, q, 1.185_347_1e-4);
    q = madd::<FMA>(x2, q, 2.268_434_6e-3);
    q = madd::<FMA>(x2, q, 4.893_525e-3);
    if x.abs() < 4e-4 {
        x
    } else if x.abs() >= 9.0 {
        // tanh's nearest f32 is ±1 here (the approximation stops a few ulp short of it).
        1.0f32.copysign(x)
    } else {
        p / q
    }
}

/// `erf(x)` in f32 with a rational minimax approximation on `(-3.92, 3.92)` and ±1 beyond
/// (where ±1 is erf's nearest f32), within a few ulp; NaN stays NaN. Vectorizable like [`exp`].
#[inline(always)]
pub(crate) fn erf<const FMA: bool>(x: f32) -> f32 {
    let xc = x.clamp(-4.0, 4.0);
    let x2 = xc * xc;
    let mut p = -2.726_142_3e-10f32;
    p = madd::<FMA>(x2, p, 2.770_681_4e-8);
    p = madd::<FMA>(x2, p, -2.101_024e-6);
    p = madd::<FMA>(x2, p, -5.692_506_4e-5);
    p = madd::<FMA>(x2, p, -7.349_906_3e-4);
    p = madd::<FMA>(x2, p, -2.954_6e-3);
    p = madd::<FMA>(x2, p, -1.609_603_3e-2);
    let p = p * xc;
    let mut q = -1.456_607_2e-5f32;
    q = madd::<FMA>(x2, q, -2.133_740_6e-4);
    q = madd::<FMA>(x2, q, -1.682_827e-3);
    q = madd::<FMA>(x2, q, -7.373_329_2e-3);
    q = madd::<FMA>(x2, q, -1.426_473_9e-2);
    if x.abs() >= 3.92 {
        1.0f32.copysign(x)
    } else {
        p / q
    }
}

/// `gelu(x) = x/2 · (1 + erf(x/√2))` in f32 from [`erf`], as PyTorch's CPU kernel computes it.
#[inline(always)]
pub(crate) fn gelu<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` in f32 from [`tanh`].
#[inline(always)]
pub(crate) fn gelu_tanh<const FMA: bool>(x: f32) -> f32 {
    let inner = 0.797_884_6 * madd::<FMA>(0.044_715 * x * x, x, x);
    0.5 * x * (1.0 + tanh::<FMA>(inner))
}

/// Asks the CPU to bring the cache line at `p` into L1 ahead of use; no effect on results. `p`
/// need not point into any allocation (a prefetch never faults), so callers may run past the
/// end of their data.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` only hints the cache; it does not access memory architecturally and
    // never faults, whatever the address. SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays a quiet NaN) and widened back, as
/// `half::bf16::from_f32(x).to_f32()`, with only integer arithmetic so loops vectorize.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = if x.is_nan() {
        b | 0x0040_0000
    } else {
        b.wrapping_add(0x7fff + ((b >> 16) & 1))
    };
    f32::from_bits(r & 0xffff_0000)
}

/// The bf16 bits of `x` rounded as [`round_bf16`].
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    (round_bf16(x).to_bits() >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        let probes = [
            0.0f32,
            -0.0,
            1.0,
            1.003_906_3, // a tie
            1.011_718_8, // a tie rounding up
            3.4e38,      // rounds to infinity
            f32::INFINITY,
            f32::MIN_POSITIVE / 3.0,
            f32::NAN,
        ];
        for x in probes
            .into_iter()
            .chain((0..1000).map(|i| i as f32 * 0.37 - 100.0))
        {
            let want = half::bf16::from_f32(x).to_f32();
            let got = round_bf16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn tanh_and_erf_are_within_a_few_ulp() {
        let (mut worst_tanh, mut worst_erf) = (0.0f64, 0.0f64);
        let mut x = -9.0f32;
        while x < 9.0 {
            for fma in [false, true] {
                let (t, e) = if fma {
                    (tanh::<true>(x), erf::<true>(x))
                } else {
                    (tanh::<false>(x), erf::<false>(x))
                };
                let ulps = |got: f32, want: f64| {
                    (f64::from(got) - want).abs()
                        / (f64::from(f32::EPSILON) * want.abs().max(1e-30))
                };
                worst_tanh = worst_tanh.max(ulps(t, f64::from(x).tanh()));
                worst_erf = worst_erf.max(ulps(e, kiln_ir::UnaryOp::Erf.eval(f64::from(x))));
            }
            x += 0.0007;
        }
        assert!(worst_tanh <= 4.0, "tanh: worst error {worst_tanh} ulp");
        assert!(worst_erf <= 4.0, "erf: worst error {worst_erf} ulp");
        assert!(tanh::<false>(f32::NAN).is_nan() && erf::<false>(f32::NAN).is_nan());
        assert_eq!(tanh::<false>(f32::INFINITY), 1.0);
        assert_eq!(erf::<false>(f32::NEG_INFINITY), -1.0);
    }

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

//! fp8 e4m3 weights for decode: `y = (bf16(x) · dequant(W)ᵀ) · scale`, the graph the fp8
//! precision builds (`compiler/src/precision.rs`: `matmul(cast(cast(x, bf16), f32),
//! cast(W_e4m3, f32)ᵀ) * scale`), reading one byte per weight.
//!
//! Every e4m3 value is exact in bf16, so on every path the sum is `Σ_j e4m3(W[i,j]) ·
//! bf16(x[j])` accumulated in f32 (products of two bf16 are exact in f32), then multiplied by
//! `scale`. With AVX512-BF16 and VBMI, 64 weight bytes at a time are widened to bf16 in
//! registers by two `vpermi2b` lookups (high and low byte of each bf16, indexed by the 7-bit
//! magnitude), the sign bit or-ed in and the bytes interleaved into words; the interleave
//! orders the weights lane-wise, so x is permuted the same way once per call; `vdpbf16ps`
//! multiplies. With AVX512-BF16 only, 32 bytes at a time go through two `vpermi2w` lookups in a
//! 128-entry table of magnitudes and a blend on bit 6. With AVX2, FMA and F16C, 16 bytes at a
//! time are widened in registers (shifted into f16s, converted by `vcvtph2ps`) for f32
//! multiply-adds; other CPUs look the weights up in a 256-entry f32 table. Only the order of
//! the f32 additions differs.
//! [`gemv_f8e4m3_batch`] multiplies up to a few rows of x at once (decode with batch > 1),
//! widening each weight block once for all rows.

use super::split_rows;
use crate::scratch::Scratch;
use crate::simd::{madd, Isa};
use crate::KernelError;
use std::sync::OnceLock;

/// The f32 value of every e4m3 byte.
pub(super) fn table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|b| kiln_ir::f8::f8e4m3_to_f32(b as u8)))
}

/// `y = (W · bf16(x)) · scale` with e4m3 weights `w` (`n × k` bytes, row-major) and a
/// per-tensor `scale`, at the best [`Isa`].
pub fn gemv_f8e4m3(
    n: usize,
    k: usize,
    w: &[u8],
    scale: f32,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_f8e4m3_batch_with(Isa::best(), 1, n, k, w, scale, x, y)
}

/// As [`gemv_f8e4m3`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn gemv_f8e4m3_with(
    isa: Isa,
    n: usize,
    k: usize,
    w: &[u8],
    scale: f32,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_f8e4m3_batch_with(isa, 1, n, k, w, scale, x, y)
}

/// Rows of x multiplied together per pass over the weights by the batched form.
pub const MAX_BATCH: usize = 8;

/// `y[r] = (W · bf16(x[r])) · scale` for the `m` rows of `x` (`m × k`) into `y` (`m × n`), both
/// row-major, at the best [`Isa`]. Every weight is read once per [`MAX_BATCH`] rows.
#[allow(clippy::too_many_arguments)]
pub fn gemv_f8e4m3_batch(
    m: usize,
    n: usize,
    k: usize,
    w: &[u8],
    scale: f32,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_f8e4m3_batch_with(Isa::best(), m, n, k, w, scale, x, y)
}

/// As [`gemv_f8e4m3_batch`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn gemv_f8e4m3_batch_with(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    w: &[u8],
    scale: f32,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    let need = |a: usize, b: usize| a.checked_mul(b);
    if need(n, k) != Some(w.len()) || need(m, k) != Some(x.len()) || need(m, n) != Some(y.len()) {
        return Err(KernelError::Layout(format!(
            "gemv_f8e4m3 {m}x{n}x{k}: W has {} bytes, x {} and y {} elements",
            w.len(),
            x.len(),
            y.len()
        )));
    }
    if n == 0 || m == 0 {
        return Ok(());
    }
    for (xs, ys) in x
        .chunks(MAX_BATCH * k.max(1))
        .zip(y.chunks_mut(MAX_BATCH * n))
    {
        let mb = ys.len() / n;
        batch(isa, mb, n, k, w, scale, xs, ys);
    }
    Ok(())
}

/// At most [`MAX_BATCH`] rows: computes `yt[i·mb + r]` (weight row i, x row r) in parallel
/// over weight rows, scales it, then writes `y[r·n + i]`.
#[allow(clippy::too_many_arguments)]
fn batch(isa: Isa, mb: usize, n: usize, k: usize, w: &[u8], scale: f32, x: &[f32], y: &mut [f32]) {
    let xp = PreparedX::new(isa, x, mb, k);
    let compute = |yt: &mut [f32]| {
        split_rows(n, k, mb, yt, |i0, yb| {
            xp.rows(&w[i0 * k..(i0 + yb.len() / mb) * k], yb)
        });
        for v in yt.iter_mut() {
            *v *= scale;
        }
    };
    if mb == 1 {
        compute(y);
    } else {
        let mut yt = vec![0.0; n * mb];
        compute(&mut yt);
        for (i, row) in yt.chunks_exact(mb).enumerate() {
            for (r, v) in row.iter().enumerate() {
                y[r * n + i] = *v;
            }
        }
    }
}

/// `y[i] = Σ_j W[rows[i], j] · bf16(x[j])` (unscaled) for the listed rows of the e4m3 weights
/// `w` (`k` bytes per row, every listed row inside `w`): one row of x prepared once, the rows
/// picked in any order (`refine_logits`' candidates, [`crate::refine`]).
pub(crate) fn dot_rows(isa: Isa, k: usize, w: &[u8], x: &[f32], rows: &[u32], y: &mut [f32]) {
    debug_assert!(x.len() == k && y.len() == rows.len());
    let xp = PreparedX::new(isa, x, 1, k);
    for (&j, out) in rows.iter().zip(y.chunks_exact_mut(1)) {
        let at = j as usize * k;
        xp.rows(&w[at..at + k], out);
    }
}

/// Up to [`MAX_BATCH`] rows of x prepared once for the path this CPU runs at a level: bf16
/// bits permuted for the VBMI widening, plain bf16 bits for the word lookup, or bf16-rounded
/// f32 values for the table path.
pub(crate) struct PreparedX {
    mb: usize,
    k: usize,
    path: Path,
}

enum Path {
    #[cfg(target_arch = "x86_64")]
    Vbmi(Scratch<u16>),
    #[cfg(target_arch = "x86_64")]
    Avx512(Scratch<u16>),
    Table(Isa, Scratch<f32>),
}

impl PreparedX {
    /// `x` (`mb × k`, `mb ≤ MAX_BATCH`) for the best path at or below `isa`.
    pub(crate) fn new(isa: Isa, x: &[f32], mb: usize, k: usize) -> PreparedX {
        debug_assert!(mb <= MAX_BATCH && x.len() == mb * k);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Bf16 && Isa::Avx512Bf16.available() {
            let xb = Scratch::collected(x.iter().map(|&v| crate::simd::bf16_bits(v)));
            let path = if x86::has_vbmi() {
                Path::Vbmi(x86::permute_x(&xb, mb, k))
            } else {
                Path::Avx512(xb)
            };
            return PreparedX { mb, k, path };
        }
        let xr = Scratch::collected(x.iter().map(|&v| crate::simd::round_bf16(v)));
        PreparedX {
            mb,
            k,
            path: Path::Table(crate::simd::vector_level(isa), xr),
        }
    }

    /// `yb[i·mb + r] = Σ_j W[i,j] · bf16(x[r, j])` (unscaled) for the `yb.len() / mb` weight
    /// rows of `w` (`k` bytes each).
    pub(crate) fn rows(&self, w: &[u8], yb: &mut [f32]) {
        let (mb, k) = (self.mb, self.k);
        assert_eq!(w.len() * mb, yb.len() * k, "gemv_f8e4m3 rows");
        match &self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW/VL, BF16 and VBMI (checked when the path was
            // chosen); `w` holds yb.len() / mb rows of k weights (asserted), `xp` mb permuted
            // rows of x.
            Path::Vbmi(xp) => unsafe { x86::rows_vbmi(w, k, xp, mb, yb) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW/VL and BF16 (checked when the path was
            // chosen); `w` holds yb.len() / mb rows of k weights, `xb` mb rows of k values.
            Path::Avx512(xb) => unsafe { x86::rows_avx512(w, k, xb, mb, yb) },
            Path::Table(level, xr) => match level {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 => {
                    // SAFETY: `vector_level` returned an available level, so AVX2, FMA and
                    // F16C are present.
                    unsafe { x86::rows_table_avx2(w, k, xr, mb, yb) }
                }
                _ => rows_table(w, k, xr, mb, yb),
            },
        }
    }
}

/// `yb[i·mb + r] = Σ_j table[W[i,j]] · xr[r·k + j]`, 16 columns at a time.
#[inline(always)]
fn rows_table(w: &[u8], k: usize, xr: &[f32], mb: usize, yb: &mut [f32]) {
    const L: usize = 16;
    let t = table();
    let mut wf = Scratch::filled(k, 0.0f32);
    for (row, out) in w.chunks_exact(k.max(1)).zip(yb.chunks_exact_mut(mb)) {
        for (d, &b) in wf.iter_mut().zip(row) {
            *d = t[usize::from(b)];
        }
        for (r, o) in out.iter_mut().enumerate() {
            let xs = &xr[r * k..(r + 1) * k];
            let mut acc = [0.0f32; L];
            let mut cw = wf.chunks_exact(L);
            let mut cx = xs.chunks_exact(L);
            for (a, b) in (&mut cw).zip(&mut cx) {
                for l in 0..L {
                    acc[l] = madd::<false>(a[l], b[l], acc[l]);
                }
            }
            let mut tail = 0.0f32;
            for (a, b) in cw.remainder().iter().zip(cx.remainder()) {
                tail = madd::<false>(*a, *b, tail);
            }
            *o = crate::simd::hsum(&acc) + tail;
        }
    }
    if k == 0 {
        yb.fill(0.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{table, Scratch, MAX_BATCH};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// Sixteen e4m3 bytes at `p` as f32, each `2^-8` times its value: widened to 16-bit
    /// words, shifted so that the magnitude lands in an f16's exponent and mantissa
    /// (`b << 7`, the sign at bit 14), the sign moved to bit 15 (`t + (t & 0x4000)`), NaN
    /// (`0x7f`) made all ones, then `vcvtph2ps` (exact, subnormals included: e4m3's bias 7 is
    /// f16's 15 less 8, hence the factor the caller takes back once per sum).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `p .. p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen16(p: *const u8) -> (__m256, __m256) {
        // SAFETY: 16 readable bytes at `p` (the caller's contract).
        let b = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.cast()) });
        let t = _mm256_slli_epi16(b, 7);
        let h = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
        let mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7f));
        let h = _mm256_or_si256(h, _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)));
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
        )
    }

    /// [`super::rows_table`] with AVX2, FMA and F16C: 16 weights at a time widened in
    /// registers ([`widen16`]) and multiplied with every row of `xr` (bf16-rounded f32), the
    /// accumulators in registers (one row of x: four of them, 32 weights per step), the last
    /// `k % 16` columns through the table.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rows_table_avx2(w: &[u8], k: usize, xr: &[f32], mb: usize, yb: &mut [f32]) {
        assert!(mb <= MAX_BATCH && xr.len() == mb * k && w.len() * mb == yb.len() * k);
        if k == 0 {
            yb.fill(0.0);
            return;
        }
        for (row, out) in w.chunks_exact(k).zip(yb.chunks_exact_mut(mb)) {
            // SAFETY (every arm): `row` holds k bytes and `xr` mb rows of k values (asserted),
            // `out` mb values.
            unsafe {
                match mb {
                    1 => dots1(row, xr, out),
                    2 => dots::<2>(row, xr, out),
                    3 => dots::<3>(row, xr, out),
                    4 => dots::<4>(row, xr, out),
                    5 => dots::<5>(row, xr, out),
                    6 => dots::<6>(row, xr, out),
                    7 => dots::<7>(row, xr, out),
                    _ => dots::<8>(row, xr, out),
                }
            }
        }
    }

    /// The sum of the eight lanes of `v` (products of [`widen16`]'s values, 2^-8 of the
    /// weights: times 2^8, exact) and the table-widened tail `row[from..]` times `x[from..]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn finish(v: __m256, row: &[u8], x: &[f32], from: usize) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        let t = table();
        let tail: f32 = (from..row.len())
            .map(|j| t[usize::from(row[j])] * x[j])
            .sum();
        lanes.iter().sum::<f32>() * 256.0 + tail
    }

    /// One weight row times one row of x, four accumulators.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `x.len() == row.len()`, `out.len() == 1`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots1(row: &[u8], x: &[f32], out: &mut [f32]) {
        let (k, (w, xp)) = (row.len(), (row.as_ptr(), x.as_ptr()));
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c + 32 <= k {
            // SAFETY: c + 32 ≤ k, inside the row and x.
            unsafe {
                let (w0, w1) = widen16(w.add(c));
                let (w2, w3) = widen16(w.add(c + 16));
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(c)), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(c + 8)), a[1]);
                a[2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(c + 16)), a[2]);
                a[3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(c + 24)), a[3]);
            }
            c += 32;
        }
        while c + 16 <= k {
            // SAFETY: c + 16 ≤ k.
            unsafe {
                let (w0, w1) = widen16(w.add(c));
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(c)), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(c + 8)), a[1]);
            }
            c += 16;
        }
        let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        out[0] = finish(v, row, x, c);
    }

    /// One weight row times `M` rows of x (row-major, `row.len()` each), each block of 16
    /// weights widened once.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `x.len() == M · row.len()`, `out.len() == M`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots<const M: usize>(row: &[u8], x: &[f32], out: &mut [f32]) {
        let (k, (w, xp)) = (row.len(), (row.as_ptr(), x.as_ptr()));
        let mut a = [[_mm256_setzero_ps(); 2]; M];
        let mut c = 0;
        while c + 16 <= k {
            // SAFETY: c + 16 ≤ k: inside the row and each of the M rows of x.
            unsafe {
                let (w0, w1) = widen16(w.add(c));
                for (r, a) in a.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(r * k + c)), a[0]);
                    a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(r * k + c + 8)), a[1]);
                }
            }
            c += 16;
        }
        for (r, o) in out.iter_mut().enumerate() {
            let v = _mm256_add_ps(a[r][0], a[r][1]);
            *o = finish(v, row, &x[r * k..(r + 1) * k], c);
        }
    }

    /// The bf16 bits of the e4m3 magnitudes 0..128, as four vectors of 32.
    fn magnitude_tables() -> [[u16; 32]; 4] {
        let t = table();
        std::array::from_fn(|q| std::array::from_fn(|l| (t[q * 32 + l].to_bits() >> 16) as u16))
    }

    /// `yb[i·mb + r] = Σ_j W[i,j] · xb[r·k + j]` with `vdpbf16ps`: `w` holds `yb.len() / mb`
    /// rows of k e4m3 bytes, `xb` mb ≤ [`MAX_BATCH`] rows of k bf16 values. Each block of 32
    /// weights is widened to bf16 once and multiplied with every row of x; a single row of x
    /// is run against four weight rows at a time (four independent accumulators); the last
    /// `k % 32` columns use zero-masked loads (zero weights and zero x add nothing).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) fn rows_avx512(w: &[u8], k: usize, xb: &[u16], mb: usize, yb: &mut [f32]) {
        assert!(mb <= MAX_BATCH && xb.len() == mb * k && w.len() * mb == yb.len() * k);
        let t = Tables::new();
        match mb {
            1 => {
                let quads = yb.len() / 4 * 4;
                let (y4, y1) = yb.split_at_mut(quads);
                // SAFETY (both calls): the row counts and lengths satisfy `tile`'s contract by
                // the assert above (the second call starts at row `quads`).
                unsafe {
                    tile::<4, 1>(&t, w, k, xb, y4);
                    tile::<1, 1>(&t, &w[quads * k..], k, xb, y1);
                }
            }
            // SAFETY (every arm): as above, with mb = M rows of x.
            2 => unsafe { tile::<1, 2>(&t, w, k, xb, yb) },
            3 => unsafe { tile::<1, 3>(&t, w, k, xb, yb) },
            4 => unsafe { tile::<1, 4>(&t, w, k, xb, yb) },
            5 => unsafe { tile::<1, 5>(&t, w, k, xb, yb) },
            6 => unsafe { tile::<1, 6>(&t, w, k, xb, yb) },
            7 => unsafe { tile::<1, 7>(&t, w, k, xb, yb) },
            _ => unsafe { tile::<1, 8>(&t, w, k, xb, yb) },
        }
    }

    /// The magnitude tables in registers.
    struct Tables([__m512i; 4]);

    impl Tables {
        #[target_feature(enable = "avx512f")]
        fn new() -> Tables {
            let tabs = magnitude_tables();
            // SAFETY: each table is 32 u16 = 64 bytes; unaligned loads.
            Tables(tabs.map(|t| unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }))
        }

        /// 32 e4m3 bytes widened to bf16: magnitude looked up (bit 6 picks the table pair),
        /// sign bit moved to bit 15.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn widen(&self, bytes: __m256i) -> __m512bh {
            let [t0, t1, t2, t3] = self.0;
            let idx = _mm512_cvtepu8_epi16(bytes);
            let lo = _mm512_permutex2var_epi16(t0, idx, t1);
            let hi = _mm512_permutex2var_epi16(t2, idx, t3);
            let big = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x40));
            let mag = _mm512_mask_blend_epi16(big, lo, hi);
            let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(idx, _mm512_set1_epi16(0x80)));
            // SAFETY: both are 512-bit plain-data vectors; any bit pattern is valid.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_or_si512(mag, sign)) }
        }
    }

    /// [`rows_avx512`] for `R` weight rows at a time against `M` rows of x.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16; `yb.len()` is a multiple of `R · M`, `w` holds at
    /// least `yb.len() / M` rows of k bytes and `xb` `M` rows of k values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile<const R: usize, const M: usize>(
        t: &Tables,
        w: &[u8],
        k: usize,
        xb: &[u16],
        yb: &mut [f32],
    ) {
        let full = k / 32;
        let rem = k % 32;
        let tail_mask: __mmask32 = ((1u64 << rem) - 1) as u32;
        let xp = xb.as_ptr();
        for (i, out) in yb.chunks_exact_mut(R * M).enumerate() {
            let wp = w[i * R * k..].as_ptr();
            let mut acc = [[_mm512_setzero_ps(); M]; R];
            for c in 0..=full {
                let off = c * 32;
                let m = if c < full { u32::MAX } else { tail_mask };
                if m == 0 {
                    break;
                }
                let mut xv = [_mm512_setzero_ps(); M].map(|_| {
                    // SAFETY: plain-data reinterpretation of 512 zero bits.
                    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()) }
                });
                for (r, x) in xv.iter_mut().enumerate() {
                    // SAFETY: x row r < M holds k values at r·k (caller); full blocks read
                    // off..off+32 ≤ k, the masked tail only off..off+rem ≤ k.
                    let v = unsafe { _mm512_maskz_loadu_epi16(m, xp.add(r * k + off).cast()) };
                    // SAFETY: plain-data reinterpretation of 512 bits.
                    *x = unsafe { std::mem::transmute::<__m512i, __m512bh>(v) };
                }
                for (q, a) in acc.iter_mut().enumerate() {
                    // SAFETY: weight row i·R + q is inside `w` (caller); bytes as for x.
                    let wb = unsafe { _mm256_maskz_loadu_epi8(m, wp.add(q * k + off).cast()) };
                    let wv = t.widen(wb);
                    for (ar, x) in a.iter_mut().zip(&xv) {
                        *ar = _mm512_dpbf16_ps(*ar, wv, *x);
                    }
                }
            }
            for (q, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    out[q * M + r] = _mm512_reduce_add_ps(*v);
                }
            }
        }
    }

    /// True when the CPU has AVX-512 VBMI (`vpermi2b`), besides what the bf16 path needs.
    pub(super) fn has_vbmi() -> bool {
        crate::features().avx512_bf16 && is_x86_feature_detected!("avx512vbmi")
    }

    /// Position of weight `e` (0..64) of a block in the order [`widen64`] returns them: the two
    /// byte interleaves work per 128-bit lane, giving weights `16·L + j` (j < 8) of each lane L
    /// first, then weights `16·L + 8 + j`.
    fn widened_position(e: usize) -> usize {
        let (lane, pos) = (e / 16, e % 16);
        if pos < 8 {
            lane * 8 + pos
        } else {
            32 + lane * 8 + pos - 8
        }
    }

    /// The `mb` rows of x (bf16 bits, `k` each) padded with zeros to a multiple of 64 and
    /// permuted within each block of 64 as [`widen64`] orders the weights, so products pair up.
    pub(super) fn permute_x(xb: &[u16], mb: usize, k: usize) -> Scratch<u16> {
        let kp = k.next_multiple_of(64);
        let mut out = Scratch::filled(mb * kp, 0u16);
        for (src, dst) in xb
            .chunks_exact(k.max(1))
            .zip(out.chunks_exact_mut(kp.max(1)))
        {
            for (j, &v) in src.iter().enumerate() {
                dst[j / 64 * 64 + widened_position(j % 64)] = v;
            }
        }
        out
    }

    /// One byte of a bf16 bit pattern.
    type ByteOf = fn(u16) -> u8;

    /// The bf16 bits of the e4m3 magnitudes 0..128 split into high and low bytes, each as two
    /// 64-byte vectors (a `vpermi2b` table).
    struct ByteTables {
        hi: [__m512i; 2],
        lo: [__m512i; 2],
    }

    impl ByteTables {
        /// Loaded from byte arrays built once per process.
        #[target_feature(enable = "avx512f")]
        fn new() -> ByteTables {
            static BYTES: OnceLock<[[u8; 64]; 4]> = OnceLock::new();
            let b = BYTES.get_or_init(|| {
                let words = magnitude_tables().concat();
                let bytes = |f: ByteOf, half: usize| -> [u8; 64] {
                    std::array::from_fn(|i| f(words[half * 64 + i]))
                };
                let (hi, lo): (ByteOf, ByteOf) = (|w| (w >> 8) as u8, |w| w as u8);
                [bytes(hi, 0), bytes(hi, 1), bytes(lo, 0), bytes(lo, 1)]
            });
            // SAFETY: each array is 64 bytes; unaligned loads.
            let ld = |a: &[u8; 64]| unsafe { _mm512_loadu_si512(a.as_ptr().cast()) };
            ByteTables {
                hi: [ld(&b[0]), ld(&b[1])],
                lo: [ld(&b[2]), ld(&b[3])],
            }
        }
    }

    /// 64 e4m3 bytes widened to bf16 as two vectors of 32, in [`widened_position`] order: both
    /// bytes of each bf16 looked up by the 7-bit magnitude, the sign bit or-ed into the high
    /// byte, then bytes interleaved into words.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    fn widen64(t: &ByteTables, bytes: __m512i) -> (__m512bh, __m512bh) {
        let hi = _mm512_permutex2var_epi8(t.hi[0], bytes, t.hi[1]);
        let lo = _mm512_permutex2var_epi8(t.lo[0], bytes, t.lo[1]);
        let sign = _mm512_and_si512(bytes, _mm512_set1_epi8(0x80u8 as i8));
        let hi = _mm512_or_si512(hi, sign);
        let a = _mm512_unpacklo_epi8(lo, hi);
        let b = _mm512_unpackhi_epi8(lo, hi);
        // SAFETY: plain-data reinterpretations of 512 bits.
        unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(a),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        }
    }

    /// As [`rows_avx512`] with the weights widened 64 at a time by [`widen64`]; `xp` holds the
    /// mb rows of x as [`permute_x`] returns them.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
    pub(super) fn rows_vbmi(w: &[u8], k: usize, xp: &[u16], mb: usize, yb: &mut [f32]) {
        let kp = k.next_multiple_of(64);
        assert!(mb <= MAX_BATCH && xp.len() == mb * kp && w.len() * mb == yb.len() * k);
        let t = ByteTables::new();
        match mb {
            1 => {
                let quads = yb.len() / 4 * 4;
                let (y4, y1) = yb.split_at_mut(quads);
                // SAFETY (both calls): the lengths satisfy `tile_vbmi`'s contract by the assert
                // above (the second call starts at row `quads`).
                unsafe {
                    tile_vbmi::<4, 1>(&t, w, k, xp, y4);
                    tile_vbmi::<1, 1>(&t, &w[quads * k..], k, xp, y1);
                }
            }
            // SAFETY (every arm): as above, with mb = M rows of x.
            2 => unsafe { tile_vbmi::<1, 2>(&t, w, k, xp, yb) },
            3 => unsafe { tile_vbmi::<1, 3>(&t, w, k, xp, yb) },
            4 => unsafe { tile_vbmi::<1, 4>(&t, w, k, xp, yb) },
            5 => unsafe { tile_vbmi::<1, 5>(&t, w, k, xp, yb) },
            6 => unsafe { tile_vbmi::<1, 6>(&t, w, k, xp, yb) },
            7 => unsafe { tile_vbmi::<1, 7>(&t, w, k, xp, yb) },
            _ => unsafe { tile_vbmi::<1, 8>(&t, w, k, xp, yb) },
        }
    }

    /// [`rows_vbmi`] for `R` weight rows at a time against `M` rows of x.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL, BF16 and VBMI; `yb.len()` is a multiple of `R · M`, `w`
    /// holds at least `yb.len() / M` rows of k bytes and `xp` `M` rows of `k` rounded up to
    /// a multiple of 64 values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
    unsafe fn tile_vbmi<const R: usize, const M: usize>(
        t: &ByteTables,
        w: &[u8],
        k: usize,
        xp: &[u16],
        yb: &mut [f32],
    ) {
        let kp = k.next_multiple_of(64);
        let full = k / 64;
        let tail: __mmask64 = (1u64 << (k % 64)) - 1;
        let xptr = xp.as_ptr();
        let ld = |p: *const u16| {
            // SAFETY: callers pass offsets of whole blocks of 32 inside `xp` (padded rows).
            let v = unsafe { _mm512_loadu_si512(p.cast()) };
            // SAFETY: plain-data reinterpretation of 512 bits.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
        };
        for (i, out) in yb.chunks_exact_mut(R * M).enumerate() {
            let wp = w[i * R * k..].as_ptr();
            // Two accumulators per (weight row, x row), one per half of the 64-weight block,
            // so consecutive `vdpbf16ps` do not wait on each other.
            let mut acc = [[_mm512_setzero_ps(); M]; R];
            let mut acc2 = [[_mm512_setzero_ps(); M]; R];
            for c in 0..kp / 64 {
                let off = c * 64;
                let m = if c < full { u64::MAX } else { tail };
                // The next R rows (contiguous, R·k bytes) stream in while these are computed:
                // R lines per block of 64 columns covers them. Rows of a few hundred bytes are
                // too short for the hardware prefetcher to follow R interleaved streams.
                for q in 0..R {
                    crate::simd::prefetch(wp.wrapping_add(R * k + (c * R + q) * 64));
                }
                // SAFETY: row r < M of xp holds kp values; off + 64 <= kp.
                let xa: [__m512bh; M] =
                    std::array::from_fn(|r| ld(unsafe { xptr.add(r * kp + off) }));
                // SAFETY: as above, the second half of the block.
                let xb: [__m512bh; M] =
                    std::array::from_fn(|r| ld(unsafe { xptr.add(r * kp + off + 32) }));
                for (q, (a, a2)) in acc.iter_mut().zip(acc2.iter_mut()).enumerate() {
                    // SAFETY: weight row i·R + q is inside `w` (caller); full blocks read
                    // off..off+64 <= k, the masked tail only off..k.
                    let bytes = unsafe { _mm512_maskz_loadu_epi8(m, wp.add(q * k + off).cast()) };
                    let (wa, wb) = widen64(t, bytes);
                    for (r, (ar, ar2)) in a.iter_mut().zip(a2.iter_mut()).enumerate() {
                        *ar = _mm512_dpbf16_ps(*ar, wa, xa[r]);
                        *ar2 = _mm512_dpbf16_ps(*ar2, wb, xb[r]);
                    }
                }
            }
            for (q, (a, a2)) in acc.iter().zip(&acc2).enumerate() {
                for (r, (v, v2)) in a.iter().zip(a2).enumerate() {
                    out[q * M + r] = _mm512_reduce_add_ps(_mm512_add_ps(*v, *v2));
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn vbmi_and_word_lookup_paths_agree() {
            if !has_vbmi() {
                return; // nothing to compare on this CPU
            }
            for (mb, n, k) in [(1usize, 9usize, 200usize), (3, 5, 64), (8, 4, 7)] {
                let w: Vec<u8> = (0..n * k)
                    .map(|i| (i * 37 % 256) as u8 & !0x7f | (i % 127) as u8)
                    .collect();
                let xb: Vec<u16> = (0..mb * k)
                    .map(|i| half::bf16::from_f32((i % 13) as f32 * 0.25 - 1.5).to_bits())
                    .collect();
                let (mut y1, mut y2) = (vec![0.0; n * mb], vec![0.0; n * mb]);
                // SAFETY: this CPU has AVX-512 BF16 and VBMI (checked above); lengths as the
                // kernels require.
                unsafe {
                    rows_avx512(&w, k, &xb, mb, &mut y1);
                    rows_vbmi(&w, k, &permute_x(&xb, mb, k), mb, &mut y2);
                }
                for (a, b) in y1.iter().zip(&y2) {
                    assert!(
                        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                        "{mb}x{n}x{k}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

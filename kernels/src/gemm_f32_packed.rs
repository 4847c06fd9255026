//! f32 matrix products on weights packed once: `C[m×n] = A[m×k] · Wᵀ` with f32 weights
//! `W[n×k]` (the `nn.Linear` layout; or stored `[k×n]`, [`PackedF32::pack_transposed`])
//! packed at load into panels of [`NR`] columns, k-major: for each k index, the panel's 16
//! weights side by side (one 64-byte line, two 8-lane vectors). The `gemm` crate
//! ([`crate::gemm`]) packs its weight operand again on every call, on the calling thread
//! before its parallel region when W has few rows; here the packing is done once.
//!
//! The AVX2/FMA micro-kernel keeps an [`MR`] × [`NR`] tile of C in 12 registers and per k index
//! loads the panel's two vectors and broadcasts one element of A per row (the schedule of the
//! crate's own AVX2 f32 kernel). A is copied once per call into a reused buffer whose row stride
//! is an odd number of 64-byte lines (the [`MR`] rows read side by side then fall into
//! distinct L1 sets); C is computed in tasks of [`MC`] rows × [`NC`] panels over the threads
//! ([`crate::gemm_panels`], shared with the bf16 GEMM), each passing over k in blocks of [`KC`]
//! so that a panel's block stays in L1 while the task's tiles pass over it. Without AVX2 the
//! same tiles run in portable Rust. One row of A (decode) reads the same panels
//! ([`panel_row`]): the weights exist once, packed.

use crate::scratch::Scratch;
use crate::simd::Isa;
use crate::KernelError;
use rayon::prelude::*;

/// Columns per packed panel (two 8-lane vectors, one 64-byte line per k index).
pub const NR: usize = 16;
/// Rows of C per micro-kernel tile.
pub(crate) const MR: usize = 6;
/// k indices per cache block: a panel's block of weights (`KC · NR` floats, 16 KiB) stays in
/// L1 while every tile of a task's rows passes over it.
pub(crate) const KC: usize = 256;
/// Rows of C per task, a multiple of [`MR`]: a task's block of A (`MC · KC` floats, 96 KiB)
/// stays in L2 while the task's panels pass over it.
pub(crate) const MC: usize = 96;
/// Panels (of [`NR`] columns) per task.
pub(crate) const NC: usize = 8;
/// Elements of A below which it is copied on the calling thread only.
const COPY_PARALLEL_MIN: usize = 1 << 16;

/// f32 weights `W[n×k]` packed for [`matmul_f32_packed`].
#[derive(Debug, Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// `panels · k · NR` floats, zero in the padding columns.
    data: Vec<f32>,
}

impl PackedF32 {
    /// Packs row-major `w` (`n × k`, `W[j, kk]` at `j·k + kk`); columns past `n` are zeros.
    pub fn pack(n: usize, k: usize, w: &[f32]) -> Result<PackedF32, KernelError> {
        PackedF32::pack_strided(n, k, w, (k, 1))
    }

    /// Packs `w` stored transposed, row-major `k × n` (`W[j, kk]` at `kk·n + j`: the weight
    /// of `x · W`).
    pub fn pack_transposed(n: usize, k: usize, w: &[f32]) -> Result<PackedF32, KernelError> {
        PackedF32::pack_strided(n, k, w, (1, n))
    }

    /// Packs `W[j, kk]` at `w[j·strides.0 + kk·strides.1]`.
    fn pack_strided(
        n: usize,
        k: usize,
        w: &[f32],
        (js, ks): (usize, usize),
    ) -> Result<PackedF32, KernelError> {
        if n.checked_mul(k) != Some(w.len()) {
            return Err(KernelError::Layout(format!(
                "pack {n}x{k}: W has {} elements",
                w.len()
            )));
        }
        let mut data = vec![0.0f32; n.div_ceil(NR) * k * NR];
        if !data.is_empty() {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    let cols = NR.min(n - panel * NR);
                    for (kk, line) in out.chunks_exact_mut(NR).enumerate() {
                        for (c, v) in line[..cols].iter_mut().enumerate() {
                            *v = w[(panel * NR + c) * js + kk * ks];
                        }
                    }
                });
        }
        Ok(PackedF32 { n, k, data })
    }

    /// Output columns (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The packed floats (for placement advice: [`crate::pages`]).
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Bytes of the packed data.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// W back, row-major `n × k`, bit for bit.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.n * self.k];
        for (j, row) in w.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            let (panel, c) = (j / NR, j % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                *v = self.data[(panel * self.k + kk) * NR + c];
            }
        }
        w
    }
}

/// `C = A · Wᵀ` with `a` row-major `m × k` and `c` row-major `m × n` (overwritten), at the best
/// [`Isa`].
pub fn matmul_f32_packed(
    m: usize,
    a: &[f32],
    w: &PackedF32,
    c: &mut [f32],
) -> Result<(), KernelError> {
    matmul_f32_packed_with(Isa::best(), m, a, w, c)
}

/// As [`matmul_f32_packed`] at instruction-set level `isa` (AVX2/FMA, else portable).
pub fn matmul_f32_packed_with(
    isa: Isa,
    m: usize,
    a: &[f32],
    w: &PackedF32,
    c: &mut [f32],
) -> Result<(), KernelError> {
    use crate::gemm_panels::{matmul_packed_many_with, Packed};
    matmul_packed_many_with(isa, m, a, &mut [(Packed::F32(w), c)], None)
}

/// Whether the AVX2/FMA micro-kernel runs at level `isa` on this CPU.
fn simd(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2 && Isa::Avx2.available()
}

/// Calls `f(ap, lda)` with `a` (`m × k`) copied at row stride `lda` (an odd number of 64-byte
/// lines) and `m` rounded up to a multiple of [`MR`] rows (the rows past `m` hold stale values
/// whose products are never stored), in the calling thread's reused scratch.
pub(crate) fn with_copied_a<R>(
    m: usize,
    k: usize,
    a: &[f32],
    f: impl FnOnce(&[f32], usize) -> R,
) -> R {
    let lda = 16 * (k.div_ceil(16) | 1);
    let mut ap = Scratch::filled(m.div_ceil(MR) * MR * lda, 0.0f32);
    let row = |(o, x): (&mut [f32], &[f32])| o[..k].copy_from_slice(x);
    if m * k >= COPY_PARALLEL_MIN {
        ap[..m * lda]
            .par_chunks_exact_mut(lda)
            .zip(a.par_chunks_exact(k))
            .for_each(row);
    } else {
        ap[..m * lda]
            .chunks_exact_mut(lda)
            .zip(a.chunks_exact(k))
            .for_each(row);
    }
    f(&ap, lda)
}

/// C's tiles `tiles` (of [`MR`] rows) × panels `group` at level `isa`, with `ap` A's rows at
/// stride `lda` ([`with_copied_a`]): for each block of [`KC`] k indices, each panel's block of
/// weights is read by every tile in turn (the first block writes C, the later ones add to it).
///
/// # Safety
/// `tiles` and `group` must lie inside C (`m × w.n`, row stride `w.n`, at `c`), and no other
/// thread may access these elements of C during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block(
    isa: Isa,
    ap: &[f32],
    lda: usize,
    w: &PackedF32,
    m: usize,
    tiles: std::ops::Range<usize>,
    group: std::ops::Range<usize>,
    c: *mut f32,
) {
    let (n, k) = (w.n, w.k);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for panel in group.clone() {
            let b = &w.data[(panel * k + k0) * NR..][..kc * NR];
            let cols = NR.min(n - panel * NR);
            for t in tiles.clone() {
                let a = &ap[t * MR * lda + k0..][..(MR - 1) * lda + kc];
                let rows = MR.min(m - t * MR);
                // SAFETY: the caller guarantees exclusive access to this tile of C (rows
                // t·MR.., columns panel·NR.., inside m × n with row stride n).
                unsafe {
                    tile::<MR>(
                        isa,
                        a,
                        lda,
                        b,
                        c.add(t * MR * n + panel * NR),
                        n,
                        rows,
                        cols,
                        k0 > 0,
                    )
                }
            }
        }
    }
}

/// One row of C for the columns of one panel: `y[c] = Σ_kk x[kk] · W[panel·NR + c, kk]`, `y`
/// the panel's columns (at most [`NR`], fewer in the last panel) — decode's GEMV on the
/// packed weights.
pub(crate) fn panel_row(isa: Isa, x: &[f32], w: &PackedF32, panel: usize, y: &mut [f32]) {
    let k = w.k;
    assert!(x.len() == k && panel < w.n.div_ceil(NR) && y.len() == NR.min(w.n - panel * NR));
    let b = &w.data[panel * k * NR..(panel + 1) * k * NR];
    // SAFETY: `y` holds the `y.len()` columns of the one row written, borrowed mutably.
    unsafe { tile::<1>(isa, x, k, b, y.as_mut_ptr(), NR, 1, y.len(), false) }
}

/// One tile of at most `R` rows × [`NR`] columns over `kc = b.len() / NR` k indices:
/// `c[i·ldc + j] (+)= Σ_p a[i·lda + p] · b[p·NR + j]` for `i < rows`, `j < cols`, added to C when
/// `accumulate`, else written, by the AVX2/FMA kernel where `isa` allows, else portably.
///
/// # Safety
/// `c + i·ldc + j` for `i < rows`, `j < cols` must be valid for reads and writes.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    isa: Isa,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let kc = b.len() / NR;
    assert!(
        (1..=R).contains(&rows)
            && cols <= NR
            && b.len() == kc * NR
            && a.len() >= (R - 1) * lda + kc
    );
    #[cfg(target_arch = "x86_64")]
    if simd(isa) {
        // SAFETY: AVX2 and FMA are available (checked); the lengths are asserted above and
        // C's elements are the caller's to write.
        return unsafe { x86::tile::<R>(a, lda, b, c, ldc, rows, cols, accumulate) };
    }
    let _ = isa;
    let mut acc = [[0.0f32; NR]; R];
    for p in 0..kc {
        let bp = &b[p * NR..][..NR];
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = a[i * lda + p];
            for (s, &bv) in acc.iter_mut().zip(bp) {
                *s += av * bv;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(rows) {
        // SAFETY: row i < rows and columns < cols are valid (the caller guarantees it).
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        for (d, &s) in dst.iter_mut().zip(acc) {
            *d = if accumulate { *d + s } else { s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NR;
    use std::arch::x86_64::*;

    /// [`super::tile`] with AVX2/FMA: `R × 2` accumulators of 8 lanes, C's partial panels
    /// through masked loads and stores.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; the lengths as [`super::tile`] asserts them, and
    /// `c + i·ldc + j` for `i < rows`, `j < cols` valid for reads and writes.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const R: usize>(
        a: &[f32],
        lda: usize,
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let kc = b.len() / NR;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            // SAFETY: p < kc, so b[p·NR .. p·NR + 16] and a[i·lda + p] (i < R) lie inside the
            // slices (the caller asserted their lengths); loads are unaligned.
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(p * NR));
                let b1 = _mm256_loadu_ps(bp.add(p * NR + 8));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(i * lda + p));
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
            }
        }
        if cols == NR {
            for (i, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: row i < rows and its NR columns are valid (the caller guarantees it).
                unsafe {
                    let d = c.add(i * ldc);
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(d));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(d.add(8)));
                    }
                    _mm256_storeu_ps(d, v0);
                    _mm256_storeu_ps(d.add(8), v1);
                }
            }
            return;
        }
        // A partial panel (the last one of C): masked loads and stores.
        let lanes = |n: usize| {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n.min(8) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(8)));
        for (i, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: row i < rows, columns < cols under the masks (the caller guarantees them
            // valid); masked-off lanes are neither read nor written, so the second half's
            // address may lie past C when m1 is empty (hence `wrapping_add`).
            unsafe {
                let d0 = c.add(i * ldc);
                let d1 = d0.wrapping_add(8);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(d0, m0));
                    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(d1, m1));
                }
                _mm256_maskstore_ps(d0, m0, v0);
                _mm256_maskstore_ps(d1, m1, v1);
            }
        }
    }
}

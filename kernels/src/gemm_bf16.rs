//! bf16 matrix products for prefill: `C[m×n] = bf16(A)[m×k] · Wᵀ` with bf16 weights `W[n×k]`
//! (the `nn.Linear` layout, row-major), f32 activations A rounded to bf16 (to nearest even)
//! and f32 accumulation, the GEMM counterpart of [`crate::gemv::gemv_bf16`].
//!
//! The weights are packed once ([`PackedBf16::pack`]) into panels of [`NR`] columns holding,
//! for each pair of k indices, the 32 column pairs `(W[j,2p], W[j,2p+1])` side by side: one
//! 64-byte vector per k-pair, the operand layout of `vdpbf16ps` ([`LAYOUT`] names it). The
//! packed words may also be borrowed from memory that already holds them in this layout
//! ([`PackedBf16::from_words`]: an artifact's memory-mapped weights), checked when borrowed. The AVX512-BF16 micro-kernel
//! keeps an `MR × NR` tile of C in 16 registers, broadcasts one bf16 pair of A per row and
//! issues one `vdpbf16ps` per (row, 16 columns) per k-pair. A is rounded once per call into a
//! reused buffer of bf16 pairs; C is computed in tasks of `MC` rows × `NC` panels spread over
//! the threads, each passing over k in blocks of `KC` pairs so that a panel's block of weights
//! stays in L1 while the task's tiles pass over it, and the task's block of A stays in L2
//! (before this blocking, calls with thousands of rows, as an encoder batch has, re-read all of
//! A from L3 for every panel).
//! With AVX2 and FMA but no AVX512-BF16 the same packed tiles run with each word split into its
//! two bf16 halves by a shift and a mask (a bf16 is the top half of its f32), 16 columns by up
//! to 4 rows per pass, two f32 multiply-adds per pair (every product of two bf16 is exact in
//! f32, so only the order of the f32 additions differs). Without AVX2 the weights are widened
//! to f32 and [`crate::gemm::matmul_f32`] runs (same rounding of A).

use crate::gemm::{matmul_f32, Gemm};
use crate::scratch::Scratch;
use crate::simd::{bf16_bits, Isa};
use crate::KernelError;
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// Columns per packed panel (two 16-lane vectors).
pub const NR: usize = 32;
/// The name of the packed layout, stored with packed weights (artifacts) so that words packed
/// for another layout are refused: change it whenever [`PackedBf16::pack`]'s layout changes.
pub const LAYOUT: &str = "bf16-panels32-kpairs";
/// Rows of C per micro-kernel tile.
pub(crate) const MR: usize = 8;
/// k-pairs per cache block: a panel's block of weights (`KC · NR` pairs, 16 KiB) stays in L1
/// while every tile of a task's rows passes over it.
const KC: usize = 128;
/// Rows of C per task, a multiple of [`MR`]: a task's block of A (`MC · KC` pairs, 64 KiB)
/// stays in L2 while the task's panels pass over it.
const MC: usize = 128;
/// Panels (of [`NR`] columns) per task.
const NC: usize = 8;
/// Columns of C per task: the parts of rows a [`RowEpilogue`] gets start at multiples of it.
pub(crate) const TASK_COLS: usize = NC * NR;
/// Elements of A below which it is converted to bf16 on the calling thread only.
const PACK_PARALLEL_MIN: usize = 1 << 16;

/// bf16 weights `W[n×k]` packed for [`matmul_bf16`].
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// `panels · pairs · NR` bf16 pairs (low half: even k index), zero in the padding.
    data: Words,
}

/// Memory holding words packed in the [`LAYOUT`] that a [`PackedBf16`] borrows and keeps alive
/// (e.g. a weight of a memory-mapped artifact). `words` must return the same slice every time.
pub trait PackedWords: std::fmt::Debug + Send + Sync {
    /// The packed words.
    fn words(&self) -> &[u32];
}

/// The packed words: made by [`PackedBf16::pack`], or borrowed.
#[derive(Debug, Clone)]
enum Words {
    Owned(Vec<u32>),
    Borrowed(Arc<dyn PackedWords>),
}

impl PackedBf16 {
    /// Words of a packed `n × k` matrix (`None` on overflow).
    pub fn words_for(n: usize, k: usize) -> Option<usize> {
        n.div_ceil(NR)
            .checked_mul(k.div_ceil(2))
            .and_then(|w| w.checked_mul(NR))
    }

    /// Packs row-major `w` (`n × k`); columns past `n` and the odd k index past `k` are zeros.
    pub fn pack(n: usize, k: usize, w: &[bf16]) -> Result<PackedBf16, KernelError> {
        if n.checked_mul(k) != Some(w.len()) {
            return Err(KernelError::Layout(format!(
                "pack {n}x{k}: W has {} elements",
                w.len()
            )));
        }
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let at = |j: usize, kk: usize| -> u32 {
            if kk < k {
                u32::from(w[j * k + kk].to_bits())
            } else {
                0
            }
        };
        if !data.is_empty() {
            data.par_chunks_mut(pairs * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    for p in 0..pairs {
                        for c in 0..NR {
                            let j = panel * NR + c;
                            if j < n {
                                out[p * NR + c] = at(j, 2 * p) | (at(j, 2 * p + 1) << 16);
                            }
                        }
                    }
                });
        }
        Ok(PackedBf16 {
            n,
            k,
            data: Words::Owned(data),
        })
    }

    /// An `n × k` matrix whose words [`PackedBf16::pack`] made earlier (an artifact's), borrowed
    /// in place: refused unless they are exactly [`PackedBf16::words_for`] words with zeros in
    /// the padding (columns past `n`, the odd k index past `k`), as packing leaves them.
    pub fn from_words(
        n: usize,
        k: usize,
        words: Arc<dyn PackedWords>,
    ) -> Result<PackedBf16, KernelError> {
        let w = words.words();
        let want = PackedBf16::words_for(n, k);
        if want != Some(w.len()) {
            return Err(KernelError::Layout(format!(
                "a packed {n}x{k} bf16 matrix needs {} words, not {}",
                want.map_or("too many".to_string(), |x| x.to_string()),
                w.len()
            )));
        }
        let pairs = k.div_ceil(2);
        let tail = n % NR;
        let last_panel = w.len().saturating_sub(pairs * NR);
        let padding_column = tail != 0
            && w[last_panel..]
                .chunks_exact(NR)
                .any(|row| row[tail..].iter().any(|&x| x != 0));
        let padding_k = k % 2 == 1
            && w.chunks_exact(pairs * NR)
                .any(|panel| panel[(pairs - 1) * NR..].iter().any(|&x| x >> 16 != 0));
        if padding_column || padding_k {
            return Err(KernelError::Layout(format!(
                "a packed {n}x{k} bf16 matrix has non-zero padding"
            )));
        }
        Ok(PackedBf16 {
            n,
            k,
            data: Words::Borrowed(words),
        })
    }

    /// The packed words ([`LAYOUT`]; also for placement advice: [`crate::pages`]).
    pub fn words(&self) -> &[u32] {
        match &self.data {
            Words::Owned(w) => w,
            Words::Borrowed(w) => w.words(),
        }
    }

    /// True when the words are borrowed ([`PackedBf16::from_words`]) rather than packed here.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, Words::Borrowed(_))
    }

    /// Output columns (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of the packed data.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.words())
    }

    /// W back as bf16, row-major `n × k`, bit for bit.
    pub fn unpack(&self) -> Vec<bf16> {
        let pairs = self.k.div_ceil(2);
        let data = self.words();
        let mut w = vec![bf16::ZERO; self.n * self.k];
        for (j, row) in w.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            let (panel, c) = (j / NR, j % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                let pair = data[(panel * pairs + kk / 2) * NR + c];
                let bits = if kk % 2 == 0 { pair } else { pair >> 16 };
                *v = bf16::from_bits(bits as u16);
            }
        }
        w
    }

    /// W back as f32 (exact), row-major `n × k`.
    fn unpack_f32(&self) -> Vec<f32> {
        self.unpack().into_iter().map(bf16::to_f32).collect()
    }
}

/// `C = bf16(A) · Wᵀ` with `a` row-major `m × k` (f32, rounded to bf16) and `c` row-major
/// `m × n` (overwritten), at the best [`Isa`].
pub fn matmul_bf16(m: usize, a: &[f32], w: &PackedBf16, c: &mut [f32]) -> Result<(), KernelError> {
    matmul_bf16_with(Isa::best(), m, a, w, c)
}

/// As [`matmul_bf16`] at instruction-set level `isa` (AVX512-BF16, else the f32 GEMM).
pub fn matmul_bf16_with(
    isa: Isa,
    m: usize,
    a: &[f32],
    w: &PackedBf16,
    c: &mut [f32],
) -> Result<(), KernelError> {
    matmul_bf16_many_with(isa, m, a, &mut [(w, c)], None)
}

/// A function finishing computed parts of C: `f(i, r, c0, y)` with `y` columns `c0..c0 +
/// y.len()` of row `r` of `C_i`, called once for every element of every product, while the
/// task that computed them still has them in cache (an epilogue: bias, activation, residual).
pub type RowEpilogue<'e> = dyn Fn(usize, usize, usize, &mut [f32]) + Sync + 'e;

/// `C_i = bf16(A) · W_iᵀ` for every `(W_i, C_i)` of `products` (each `C_i` row-major
/// `m × n_i`, overwritten) over the same `a` (`m × k`): A is rounded once and the tiles of
/// every product share one parallel region (a transformer's Q/K/V or gate/up projections).
/// `epilogue`, if any, then finishes each task's block of C (parts of rows of at most
/// `TASK_COLS` = 256 columns, each starting at a multiple of 256) before the task ends.
pub fn matmul_bf16_many_with(
    isa: Isa,
    m: usize,
    a: &[f32],
    products: &mut [(&PackedBf16, &mut [f32])],
    epilogue: Option<&RowEpilogue<'_>>,
) -> Result<(), KernelError> {
    let Some(k) = products.first().map(|(w, _)| w.k) else {
        return Ok(());
    };
    for (w, c) in products.iter() {
        let n = w.n;
        if w.k != k || a.len() != m * k || c.len() != m * n {
            return Err(KernelError::Layout(format!(
                "matmul_bf16 {m}x{n}x{}: A has {} elements (want {}), C {} (want {})",
                w.k,
                a.len(),
                m * w.k,
                c.len(),
                m * n
            )));
        }
    }
    if m == 0 {
        return Ok(());
    }
    // Every row of every product, after the product (the paths that do not run in tasks).
    let finish_all = |products: &mut [(&PackedBf16, &mut [f32])]| {
        if let Some(f) = epilogue {
            for (i, (w, c)) in products.iter_mut().enumerate() {
                for (r, y) in c.chunks_mut(w.n.max(1)).enumerate() {
                    f(i, r, 0, y);
                }
            }
        }
    };
    if k == 0 {
        products.iter_mut().for_each(|(_, c)| c.fill(0.0));
        finish_all(products);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if has_tile(isa) {
        // Tasks (product, row block, panel group); C_i through a pointer each.
        let row_blocks = m.div_ceil(MC);
        let mut tasks = Vec::new();
        let mut outs = Vec::with_capacity(products.len());
        for (i, (w, c)) in products.iter_mut().enumerate() {
            let panels = w.n.div_ceil(NR);
            for rb in 0..row_blocks {
                for g in 0..panels.div_ceil(NC) {
                    let tiles = rb * MC / MR..((rb + 1) * MC).min(m).div_ceil(MR);
                    tasks.push((i, tiles, g * NC..((g + 1) * NC).min(panels)));
                }
            }
            outs.push((*w, SyncPtr(c.as_mut_ptr())));
        }
        with_packed_a(m, k, a, |ap, lda| {
            tasks.into_par_iter().for_each(|(i, tiles, group)| {
                let (w, c) = &outs[i];
                // SAFETY: a packed tile runs at `isa` (checked); tasks own disjoint (row
                // block, panel group) rectangles of their product's C, and every C stays
                // mutably borrowed (through `products`) for the whole parallel loop.
                unsafe { block(isa, ap, lda, w, m, tiles.clone(), group.clone(), c) };
                if let Some(f) = epilogue {
                    let cols = group.start * NR..(group.end * NR).min(w.n);
                    for r in tiles.start * MR..(tiles.end * MR).min(m) {
                        // SAFETY: as above, this task owns row r's columns `cols` of C_i
                        // (inside its m × n, row stride n), which no one else accesses now.
                        let y = unsafe {
                            std::slice::from_raw_parts_mut(
                                c.0.add(r * w.n + cols.start),
                                cols.len(),
                            )
                        };
                        f(i, r, cols.start, y);
                    }
                }
            })
        });
        return Ok(());
    }
    let _ = isa;
    let ar: Vec<f32> = a.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    for (w, c) in products.iter_mut() {
        let wf = w.unpack_f32();
        matmul_f32(&Gemm::dense(m, w.n, k, false, true), &ar, &wf, c)?;
    }
    finish_all(products);
    Ok(())
}

/// C's tiles `tiles` (of [`MR`] rows) × panels `group`, with `ap` A's pairs at row stride
/// `lda` ([`with_packed_a`]): for each block of [`KC`] k-pairs, each panel's block of weights
/// is read by every tile in turn (the first block writes C, the later ones add to it).
///
/// # Safety
/// [`has_tile`] must hold at `isa`, `tiles` and `group` inside C (`m × w.n`, at `c`), and no
/// other thread may access these elements of C during the call.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    ap: &[u32],
    lda: usize,
    w: &PackedBf16,
    m: usize,
    tiles: std::ops::Range<usize>,
    group: std::ops::Range<usize>,
    c: &SyncPtr,
) {
    let (n, pairs) = (w.n, w.k.div_ceil(2));
    for p0 in (0..pairs).step_by(KC) {
        let kc = KC.min(pairs - p0);
        for panel in group.clone() {
            let b = &w.words()[(panel * pairs + p0) * NR..][..kc * NR];
            let cols = NR.min(n - panel * NR);
            for t in tiles.clone() {
                let a = &ap[t * MR * lda + p0..][..(MR - 1) * lda + kc];
                let rows = MR.min(m - t * MR);
                // SAFETY: the caller guarantees a packed tile at `isa` and exclusive access to
                // this tile of C (rows t·MR.., columns panel·NR.., inside m × n, row stride n).
                unsafe {
                    let dst = c.0.add(t * MR * n + panel * NR);
                    tile_at::<MR>(isa, a, lda, b, dst, n, rows, cols, p0 > 0)
                }
            }
        }
    }
}

/// Calls `f(ap, lda)` with `a` (`m × k`, f32) rounded to bf16 as pairs, row `i` at
/// `ap[i·lda ..]` (an odd k padded with a zero), and `m` rounded up to a multiple of [`MR`]
/// rows (the rows past `m` hold stale values whose products are never stored). The row stride
/// is an odd number of 64-byte lines, so the [`MR`] rows a micro-kernel reads side by side
/// fall into distinct L1 sets (a stride of 4 KiB put them all in one). The buffer is the
/// calling thread's, reused between calls (zeroed only when it grows, and kept at the largest
/// size seen); rows are converted over the threads when large.
fn with_packed_a<R>(m: usize, k: usize, a: &[f32], f: impl FnOnce(&[u32], usize) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let pairs = k.div_ceil(2);
    let lines = pairs.div_ceil(16);
    let lda = 16 * (lines | 1);
    let len = m.div_ceil(MR) * MR * lda;
    let fill = |ap: &mut [u32]| {
        let row = |(o, x): (&mut [u32], &[f32])| round_pairs(x, &mut o[..pairs]);
        if m * k >= PACK_PARALLEL_MIN {
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
    };
    BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut ap) => {
            if ap.len() < len {
                ap.resize(len, 0);
            }
            fill(&mut ap[..len]);
            f(&ap[..len], lda)
        }
        // Re-entered on this thread (a task of an outer call): a buffer of its own.
        Err(_) => {
            let mut ap = vec![0u32; len];
            fill(&mut ap);
            f(&ap, lda)
        }
    })
}

/// `out[p] = bf16(x[2p]) | bf16(x[2p+1]) << 16` (`x` of `2·out.len()` elements, or one fewer:
/// the last high half is then zero), vectorized at the best level.
fn round_pairs(x: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.available() {
        // SAFETY: AVX-512 F/BW/VL are available (checked).
        return unsafe { x86::round_pairs(x, out) };
    }
    round_pairs_body(x, out)
}

#[inline(always)]
fn round_pairs_body(x: &[f32], out: &mut [u32]) {
    for (o, pair) in out.iter_mut().zip(x.chunks_exact(2)) {
        *o = u32::from(bf16_bits(pair[0])) | (u32::from(bf16_bits(pair[1])) << 16);
    }
    if x.len() % 2 == 1 {
        out[x.len() / 2] = u32::from(bf16_bits(x[x.len() - 1]));
    }
}

/// The `m` rows of `a` (`m × k`, f32) rounded to bf16 as pairs, row-major `m × ⌈k/2⌉` (an odd
/// k padded with a zero), rows over the threads when large.
pub(crate) fn pack_a(m: usize, k: usize, a: &[f32]) -> Scratch<u32> {
    let pairs = k.div_ceil(2);
    let mut ap = Scratch::filled(m * pairs, 0u32);
    if k > 0 && m * k >= PACK_PARALLEL_MIN {
        a.par_chunks_exact(k)
            .zip(ap.par_chunks_exact_mut(pairs))
            .for_each(|(x, o)| round_pairs(x, o));
    } else if k > 0 {
        a.chunks_exact(k)
            .zip(ap.chunks_exact_mut(pairs))
            .for_each(|(x, o)| round_pairs(x, o));
    }
    ap
}

/// Whether AVX512-BF16 runs at level `isa` on this CPU (the packed tiles with `vdpbf16ps`).
pub(crate) fn has_panel_row(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx512Bf16 && Isa::Avx512Bf16.available()
}

/// Whether the packed tiles ([`panel_row`], [`tile_into`], the GEMM's tasks) run at level
/// `isa` on this CPU: with AVX512-BF16, or with AVX2 and FMA.
pub(crate) fn has_tile(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64")
        && (has_panel_row(isa) || (isa >= Isa::Avx2 && Isa::Avx2.available()))
}

/// [`x86::tile`] where AVX512-BF16 runs at `isa`, else [`x86::tile_avx2`].
///
/// # Safety
/// [`has_tile`] must hold at `isa`; otherwise as [`x86::tile`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_at<const R: usize>(
    isa: Isa,
    a: &[u32],
    lda: usize,
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's guarantees, and the level checked here.
    unsafe {
        if has_panel_row(isa) {
            x86::tile::<R>(a, lda, b, c, ldc, rows, cols, accumulate)
        } else {
            x86::tile_avx2::<R>(a, lda, b, c, ldc, rows, cols, accumulate)
        }
    }
}

/// One row of C for the columns of one panel: `y[c] = Σ_p dot(ap[p], W[panel·NR + c, 2p..2p+2])`
/// with `ap` one row of A as [`pack_a`] gives it and `y` the panel's columns (at most [`NR`],
/// fewer in the last panel), at level `isa`. Only where [`has_tile`] holds.
pub(crate) fn panel_row(isa: Isa, ap: &[u32], w: &PackedBf16, panel: usize, y: &mut [f32]) {
    let pairs = w.k.div_ceil(2);
    assert!(
        has_tile(isa)
            && ap.len() == pairs
            && panel < w.n.div_ceil(NR)
            && y.len() == NR.min(w.n - panel * NR)
    );
    #[cfg(target_arch = "x86_64")]
    {
        let b = &w.words()[panel * pairs * NR..(panel + 1) * pairs * NR];
        // SAFETY: a packed tile runs at `isa` (asserted); `ap` is one row (a tile of one row)
        // of `pairs` pairs, `b` one panel of `pairs · NR` pairs, and `y` the `y.len()`
        // columns written.
        unsafe { tile_at::<1>(isa, ap, pairs, b, y.as_mut_ptr(), NR, 1, y.len(), false) };
    }
}

/// One tile of at most [`MR`] rows × [`NR`] columns: `c[i·ldc + j] = Σ_p dot(a[i·lda + p],
/// b[p·NR + j])` for `i < rows`, `j < cols`, with `b` one panel's `kc` k-pairs in the packed
/// layout and `a` [`MR`] rows of `kc` pairs at stride `lda` (rows past `rows` are read, not
/// stored), at level `isa`. Only where [`has_tile`] holds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_into(
    isa: Isa,
    a: &[u32],
    lda: usize,
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    let kc = b.len() / NR;
    assert!(
        has_tile(isa)
            && (1..=MR).contains(&rows)
            && cols <= NR
            && lda >= kc
            && a.len() >= (MR - 1) * lda + kc
            && c.len() >= (rows - 1) * ldc + cols
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a packed tile runs at `isa` and every element of C written lies in `c`
    // (asserted); `c` is borrowed mutably for the call.
    unsafe {
        tile_at::<MR>(isa, a, lda, b, c.as_mut_ptr(), ldc, rows, cols, false)
    };
}

/// A pointer shared by the tasks, each writing its own elements.
struct SyncPtr(*mut f32);
// SAFETY: the tasks write disjoint elements through it (see `matmul_bf16_many_with`).
unsafe impl Sync for SyncPtr {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NR;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn round_pairs(x: &[f32], out: &mut [u32]) {
        super::round_pairs_body(x, out)
    }

    /// One `R × NR` tile of C over `kc = b.len() / NR` k-pairs: `C[i][c] (+)= Σ_p
    /// dot(a[i·lda + p], b[p·NR + c])` for the first `rows` rows and `cols` columns (masked
    /// stores), added to C when `accumulate`, else written. `a` holds the tile's `R` rows of
    /// pairs at stride `lda`, `b` a panel's block of `NR` pairs per k-pair.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 must be available; `rows ≤ R`, `cols ≤ NR`, and
    /// `c + i·ldc + j` for `i < rows`, `j < cols` must be valid for reads and writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const R: usize>(
        a: &[u32],
        lda: usize,
        b: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let kc = b.len() / NR;
        assert!(rows <= R && cols <= NR && b.len() == kc * NR && a.len() >= (R - 1) * lda + kc);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            // SAFETY: p < kc, so b[p·NR .. p·NR + 32] and a[i·lda + p] (i < R) are inside the
            // slices (asserted); loads are unaligned.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16).cast()));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*ap.add(i * lda + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
        }
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        for (i, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: row i < rows, columns < cols under the masks (the caller guarantees them
            // valid); masked-off lanes are neither read nor written, so the second half's
            // address may lie past C when m1 is empty (hence `wrapping_add`).
            unsafe {
                let d0 = c.add(i * ldc);
                let d1 = d0.wrapping_add(16);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, d0));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, d1));
                }
                _mm512_mask_storeu_ps(d0, m0, v0);
                _mm512_mask_storeu_ps(d1, m1, v1);
            }
        }
    }

    /// [`tile`] with AVX2 and FMA: each k-pair's packed word split into its two bf16 halves as
    /// f32 (`word << 16` and `word & 0xffff0000`), for A's pair as for W's, and two f32
    /// multiply-adds per pair; 16 columns per pass (two halves of the panel), 4 rows per pass
    /// (1 for the rows left over), so accumulators and operands fit the 16 registers.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; otherwise as [`tile`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_avx2<const R: usize>(
        a: &[u32],
        lda: usize,
        b: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let kc = b.len() / NR;
        assert!(rows <= R && cols <= NR && b.len() == kc * NR && a.len() >= (R - 1) * lda + kc);
        if rows == 1 {
            // SAFETY: row 0 of A and the tile's columns of C, as the caller guarantees.
            unsafe { row_avx2(a.as_ptr(), b.as_ptr(), kc, c, cols, accumulate) };
            return;
        }
        for half in 0..cols.div_ceil(16) {
            let hc = (cols - half * 16).min(16);
            let mut i = 0;
            while i < rows {
                // SAFETY: rows i.. of A (i + 4 ≤ R when four are taken) and this half's
                // columns of C are inside what the caller guarantees.
                unsafe {
                    let (ai, bi, ci) = (
                        a.as_ptr().add(i * lda),
                        b.as_ptr().add(half * 16),
                        c.add(i * ldc + half * 16),
                    );
                    if R - i >= 4 && rows - i >= 2 {
                        rows_avx2::<4>(ai, lda, bi, kc, ci, ldc, (rows - i).min(4), hc, accumulate);
                        i += 4;
                    } else {
                        rows_avx2::<1>(ai, lda, bi, kc, ci, ldc, 1, hc, accumulate);
                        i += 1;
                    }
                }
            }
        }
    }

    /// One row of A times a whole panel (32 columns, every k-pair's 128 bytes read in one
    /// pass: decode's GEMV), the first `cols` columns stored (added when `accumulate`).
    ///
    /// # Safety
    /// AVX2 and FMA; `a + p` and `b + p·NR + j` (p < kc, j < NR) readable; `c + j` (j <
    /// cols) valid for reads and writes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(
        a: *const u32,
        b: *const u32,
        kc: usize,
        c: *mut f32,
        cols: usize,
        accumulate: bool,
    ) {
        let mask = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut acc = [_mm256_setzero_ps(); 4];
        for p in 0..kc {
            // SAFETY: inside the slices the caller guarantees (unaligned loads).
            unsafe {
                let av = _mm256_set1_epi32(*a.add(p) as i32);
                let ae = _mm256_castsi256_ps(_mm256_slli_epi32(av, 16));
                let ao = _mm256_castsi256_ps(_mm256_and_si256(av, mask));
                for (q, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_loadu_si256(b.add(p * NR + 8 * q).cast());
                    let e = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                    let o = _mm256_castsi256_ps(_mm256_and_si256(w, mask));
                    *acc = _mm256_fmadd_ps(ae, e, *acc);
                    *acc = _mm256_fmadd_ps(ao, o, *acc);
                }
            }
        }
        // SAFETY: columns < cols of C are valid (the caller's contract).
        unsafe { store(&acc, c, cols, accumulate) };
    }

    /// Stores the first `cols` lanes of `acc` (eight per vector, in order) at `c .. c + cols`,
    /// added to what is there when `accumulate`.
    ///
    /// # Safety
    /// AVX; `cols ≤ 8 · N`; `c + j` (j < cols) valid for reads and writes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store<const N: usize>(acc: &[__m256; N], c: *mut f32, cols: usize, accumulate: bool) {
        let mut v = [[0.0f32; 8]; N];
        for (v, acc) in v.iter_mut().zip(acc) {
            // SAFETY: `v` holds 8 floats.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *acc) };
        }
        for (j, x) in v.iter().flatten().enumerate().take(cols) {
            // SAFETY: j < cols, valid (the caller's contract).
            unsafe {
                let out = c.add(j);
                *out = if accumulate { *out + x } else { *x };
            }
        }
    }

    /// `G` rows of A (stride `lda`) times 16 columns of a panel (`b`, at the half's first
    /// column, stride [`NR`] words per k-pair) over `kc` k-pairs, the first `rows` rows and
    /// `cols` columns stored (added when `accumulate`).
    ///
    /// # Safety
    /// AVX2 and FMA; `a + g·lda + p` (g < G, p < kc), `b + p·NR + j` (j < 16) readable;
    /// `c + g·ldc + j` (g < rows, j < cols) valid for reads and writes.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_avx2<const G: usize>(
        a: *const u32,
        lda: usize,
        b: *const u32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mask = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        for p in 0..kc {
            // SAFETY: inside the slices the caller guarantees (unaligned loads).
            unsafe {
                let w0 = _mm256_loadu_si256(b.add(p * NR).cast());
                let w1 = _mm256_loadu_si256(b.add(p * NR + 8).cast());
                let (e0, o0) = (
                    _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
                    _mm256_castsi256_ps(_mm256_and_si256(w0, mask)),
                );
                let (e1, o1) = (
                    _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
                    _mm256_castsi256_ps(_mm256_and_si256(w1, mask)),
                );
                for (g, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(*a.add(g * lda + p) as i32);
                    let ae = _mm256_castsi256_ps(_mm256_slli_epi32(av, 16));
                    let ao = _mm256_castsi256_ps(_mm256_and_si256(av, mask));
                    acc[0] = _mm256_fmadd_ps(ae, e0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(ae, e1, acc[1]);
                    acc[0] = _mm256_fmadd_ps(ao, o0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(ao, o1, acc[1]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: row g < rows, columns < cols (≤ 16) of C are valid.
            unsafe { store(acc, c.add(g * ldc), cols, accumulate) };
        }
    }
}

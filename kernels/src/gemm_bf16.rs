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
//! issues one `vdpbf16ps` per (row, 16 columns) per k-pair; panels are spread over the threads.
//! Without AVX512-BF16 the weights are widened to f32 and [`crate::gemm::matmul_f32`] runs
//! (same rounding of A, different accumulation order).

use crate::gemm::{matmul_f32, Gemm};
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
const MR: usize = 8;
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
    let (n, k) = (w.n, w.k);
    if a.len() != m * k || c.len() != m * n {
        return Err(KernelError::Layout(format!(
            "matmul_bf16 {m}x{n}x{k}: A has {} elements (want {}), C {} (want {})",
            a.len(),
            m * k,
            c.len(),
            m * n
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let pairs = k.div_ceil(2);
    let ap = pack_a(m, k, a);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Bf16 && Isa::Avx512Bf16.available() {
        let panels = n.div_ceil(NR);
        // Each task owns the columns of one panel in every row of C: hand out C by column
        // panel through a raw pointer, since the column blocks are not contiguous.
        let cp = SyncPtr(c.as_mut_ptr());
        (0..panels).into_par_iter().for_each(|panel| {
            let b = &w.words()[panel * pairs * NR..(panel + 1) * pairs * NR];
            let cols = NR.min(n - panel * NR);
            let cp = &cp;
            let mut r = 0;
            while r < m {
                let rows = MR.min(m - r);
                let mut tile = [[0.0f32; NR]; MR];
                // SAFETY: AVX-512 F/BW/VL and BF16 are available (checked above); `ap` holds
                // rows r..r+rows of `pairs` pairs and `b` one panel of `pairs · NR` pairs.
                unsafe {
                    x86::tile(
                        &ap[r * pairs..(r + rows) * pairs],
                        pairs,
                        rows,
                        b,
                        &mut tile,
                    )
                };
                for (i, t) in tile.iter().enumerate().take(rows) {
                    // SAFETY: element (r+i, panel·NR .. panel·NR+cols) lies inside `c` (m × n);
                    // panels are disjoint column ranges, so no two tasks write the same element,
                    // and `c` stays mutably borrowed for the whole parallel loop.
                    unsafe {
                        let dst = cp.0.add((r + i) * n + panel * NR);
                        std::ptr::copy_nonoverlapping(t.as_ptr(), dst, cols);
                    }
                }
                r += rows;
            }
        });
        return Ok(());
    }
    let _ = isa;
    let ar: Vec<f32> = a.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let wf = w.unpack_f32();
    matmul_f32(&Gemm::dense(m, n, k, false, true), &ar, &wf, c)
}

/// The `m` rows of `a` (`m × k`, f32) rounded to bf16 as pairs, row-major `m × ⌈k/2⌉` (an odd
/// k padded with a zero), rows over the threads when large.
pub(crate) fn pack_a(m: usize, k: usize, a: &[f32]) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut ap = vec![0u32; m * pairs];
    let pack_row = |(row, out): (&[f32], &mut [u32])| {
        for (o, pair) in out.iter_mut().zip(row.chunks_exact(2)) {
            *o = u32::from(bf16_bits(pair[0])) | (u32::from(bf16_bits(pair[1])) << 16);
        }
        if k % 2 == 1 {
            out[pairs - 1] = u32::from(bf16_bits(row[k - 1]));
        }
    };
    if k > 0 && m * k >= PACK_PARALLEL_MIN {
        a.par_chunks_exact(k)
            .zip(ap.par_chunks_exact_mut(pairs))
            .for_each(pack_row);
    } else if k > 0 {
        a.chunks_exact(k)
            .zip(ap.chunks_exact_mut(pairs))
            .for_each(pack_row);
    }
    ap
}

/// Whether [`panel_row`] can run at level `isa` on this CPU.
pub(crate) fn has_panel_row(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx512Bf16 && Isa::Avx512Bf16.available()
}

/// One row of C for the columns of one panel: `y[c] = Σ_p dot(ap[p], W[panel·NR + c, 2p..2p+2])`
/// with `ap` one row of A as [`pack_a`] gives it and `y` the panel's columns (at most [`NR`],
/// fewer in the last panel). Only where [`has_panel_row`] holds.
pub(crate) fn panel_row(ap: &[u32], w: &PackedBf16, panel: usize, y: &mut [f32]) {
    let pairs = w.k.div_ceil(2);
    assert!(
        has_panel_row(Isa::Avx512Bf16)
            && ap.len() == pairs
            && panel < w.n.div_ceil(NR)
            && y.len() == NR.min(w.n - panel * NR)
    );
    #[cfg(target_arch = "x86_64")]
    {
        let b = &w.words()[panel * pairs * NR..(panel + 1) * pairs * NR];
        let mut tile = [[0.0f32; NR]; MR];
        // SAFETY: AVX-512 F/BW/VL and BF16 are available (asserted); `ap` holds one row of
        // `pairs` pairs and `b` one panel of `pairs · NR` pairs.
        unsafe { x86::tile(ap, pairs, 1, b, &mut tile) };
        let cols = y.len();
        y.copy_from_slice(&tile[0][..cols]);
    }
}

/// A pointer shared by the panel tasks, each writing its own columns.
struct SyncPtr(*mut f32);
// SAFETY: the tasks write disjoint elements through it (see the use in `matmul_bf16_with`).
unsafe impl Sync for SyncPtr {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `tile[i][c] = Σ_p dot(a[i, p], b[p, c])` for `rows ≤ MR` rows: `a` holds `rows · pairs`
    /// bf16 pairs (row-major), `b` one packed panel of `pairs · NR` pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) fn tile(
        a: &[u32],
        pairs: usize,
        rows: usize,
        b: &[u32],
        tile: &mut [[f32; NR]; MR],
    ) {
        assert!(rows <= MR && a.len() == rows * pairs && b.len() == pairs * NR);
        match rows {
            8 => tile_n::<8>(a, pairs, b, tile),
            7 => tile_n::<7>(a, pairs, b, tile),
            6 => tile_n::<6>(a, pairs, b, tile),
            5 => tile_n::<5>(a, pairs, b, tile),
            4 => tile_n::<4>(a, pairs, b, tile),
            3 => tile_n::<3>(a, pairs, b, tile),
            2 => tile_n::<2>(a, pairs, b, tile),
            _ => tile_n::<1>(a, pairs, b, tile),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    fn tile_n<const R: usize>(a: &[u32], pairs: usize, b: &[u32], tile: &mut [[f32; NR]; MR]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..pairs {
            // SAFETY: p < pairs, so b[p·NR .. p·NR + 32] and a[i·pairs + p] (i < R = rows) are
            // inside the slices (asserted by `tile`); loads are unaligned.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16).cast()));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*ap.add(i * pairs + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: tile[i] holds NR = 32 f32, written as two 16-lane stores.
            unsafe {
                _mm512_storeu_ps(tile[i].as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(tile[i].as_mut_ptr().add(16), acc[1]);
            }
        }
    }
}

//! Flash attention in f32: the IR's `attention` op ([`kiln_ir::Op::Attention`]) without
//! materializing the score matrix or repeated key/value heads.
//!
//! Each query row walks its visible keys in blocks of `KEY_BLOCK` (64) with an online softmax
//! (running maximum `m`, running sum `l`, accumulator `acc[dv]` rescaled by `exp(m_old - m_new)`
//! when the maximum grows, as FlashAttention-2). Prefill works on blocks of `QUERY_BLOCK` (16)
//! queries of every query head sharing one kv head (GQA), spread over [`crate::threads`]
//! threads: each block of keys is transposed once into a scratch buffer and every query row of
//! the block scores it with FMAs along the keys (no horizontal sums). With fewer than 8 queries
//! per head (decode), `decode` reads each key/value row once for all the query rows of its
//! GQA group, the key range split over the threads when there are few kv heads
//! (flash-decoding).
//! Prefill with many queries per head and a score matrix of at most `GEMM_MAX_SCORES` elements
//! per head instead runs as two single-threaded GEMMs per block of `GEMM_QUERY_BLOCK` (64)
//! queries of one (batch, query head), blocks spread over the threads: `S = scale · Q·Kᵀ` over
//! the keys any query of the block sees (blocks of keys fully hidden by the causal mask or
//! the window are skipped) with the `gemm` crate's micro-kernels, a masked softmax of each
//! row over its visible keys, then `O = P·V` — a CPU's best use of its FMA units at these
//! sizes, where the flash loop's scalar key transposes cost more than the score matrix's
//! memory.
//! Operands are strided views so the caller can pass permuted layouts (e.g. write the output
//! as `[b, s, h, d]`); the loops are plain Rust compiled for AVX-512, AVX2 + FMA and portably
//! and picked at run time.
//!
//! Semantics as the op: query head `h` reads key/value head `h / (q_heads / kv_heads)`; query
//! `i` sits at position `kv_len - q_len + i`; with `causal` it sees keys `j <= pos`, with
//! `window = w > 0` only keys `j > pos - w`; a query with no visible key gives zeros, one whose
//! visible scores are all `-inf` gives NaN (0/0, as softmax), and a NaN score makes the row NaN.
//! One difference from the reference in a degenerate case: a NaN in a value row whose key has
//! probability 0 and lies in a block where every score so far is `-inf` does not reach the
//! output (the reference multiplies it by 0 and gets NaN).

use crate::gemm::{self, Gemm, MatLayout};
use crate::simd::{exp, hsum, madd, vector_level, Isa, LANES};
use crate::KernelError;
use rayon::prelude::*;

mod decode;
mod scores_bf16;

/// Keys scored per step of the online softmax.
const KEY_BLOCK: usize = 64;
/// Value columns accumulated in registers at a time (four AVX-512 vectors).
const VALUE_GROUP: usize = 64;
/// Queries per head that share each transposed block of keys.
const QUERY_BLOCK: usize = 16;
/// Work (query rows × visible keys × head dims) below which everything runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Largest score matrix (`q_len × kv_len` elements) per head for the GEMM path.
const GEMM_MAX_SCORES: usize = 1 << 20;
/// Queries per task of the GEMM path: blocks of keys no query of a block sees are skipped.
const GEMM_QUERY_BLOCK: usize = 64;

/// Element strides of a 4-D operand `[batch, heads, seq, dim]`; the last axis is contiguous
/// (stride 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides4 {
    /// Between batches.
    pub batch: usize,
    /// Between heads.
    pub head: usize,
    /// Between positions.
    pub seq: usize,
}

impl Strides4 {
    /// The strides of a dense row-major `[batch, heads, seq, dim]` tensor.
    pub fn dense(heads: usize, seq: usize, dim: usize) -> Strides4 {
        Strides4 {
            batch: heads * seq * dim,
            head: seq * dim,
            seq: dim,
        }
    }

    fn offset(&self, b: usize, h: usize, s: usize) -> usize {
        b * self.batch + h * self.head + s * self.seq
    }
}

/// The sizes of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Batch size.
    pub batch: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Queries per head.
    pub q_len: usize,
    /// Keys per head.
    pub kv_len: usize,
    /// Query/key head dimension.
    pub head_dim: usize,
    /// Value head dimension.
    pub v_dim: usize,
}

/// The op's attributes.
#[derive(Debug, Clone, Copy)]
pub struct AttnOptions {
    /// Multiplies `q·k`.
    pub scale: f32,
    /// Hide keys after the query's position.
    pub causal: bool,
    /// Sliding window: with `w > 0`, hide keys at or before `pos - w`.
    pub window: usize,
}

/// An operand: its elements and its strides (element offsets; `data` starts at element
/// `[0,0,0,0]`).
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Strides of the batch, head and sequence axes.
    pub strides: Strides4,
}

/// An f32 operand.
pub type View<'a> = Strided<'a, f32>;

/// A key or value operand stored as bf16 (a KV cache kept narrow).
pub type Bf16View<'a> = Strided<'a, half::bf16>;

/// Additive mask broadcastable to `[batch, q_heads, q_len, kv_len]`: strides for batch, head,
/// query (0 = broadcast); key axis contiguous.
pub struct MaskView<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Strides of the batch, head and query axes.
    pub strides: Strides4,
}

/// `out[b, h, i, :] = softmax(scale · q·kᵀ + mask over visible keys) · v` (see the module
/// docs), at the best [`Isa`].
#[allow(clippy::too_many_arguments)]
pub fn attention_f32(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: View,
    k: View,
    v: View,
    mask: Option<MaskView>,
    out: &mut [f32],
    out_strides: Strides4,
) -> Result<(), KernelError> {
    attention_f32_with(Isa::best(), shape, opts, q, k, v, mask, out, out_strides)
}

/// As [`attention_f32`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn attention_f32_with(
    isa: Isa,
    shape: &AttnShape,
    opts: &AttnOptions,
    q: View,
    k: View,
    v: View,
    mask: Option<MaskView>,
    out: &mut [f32],
    out_strides: Strides4,
) -> Result<(), KernelError> {
    let Some(ctx) = context(isa, shape, opts, q, k, v, mask, out, out_strides)? else {
        return Ok(());
    };
    let s = ctx.s;
    let group = ctx.group;
    let rows = s.batch * s.q_heads * s.q_len;
    let out_ptr = OutPtr(out.as_mut_ptr());
    let threads = crate::threads();
    let work = rows * s.kv_len.max(1) * (s.head_dim + s.v_dim).max(1);
    let blocks = s.batch * s.kv_heads * s.q_len.div_ceil(QUERY_BLOCK);
    if s.q_len < QUERY_BLOCK / 2 {
        // Few queries per head (decode): a transposed key block would serve too few rows.
        decode::run(&ctx, &out_ptr);
    } else if s.q_len >= 2 * QUERY_BLOCK
        && s.head_dim >= 8
        && s.q_len.saturating_mul(s.kv_len) <= GEMM_MAX_SCORES
    {
        let keys = scores_bf16::pack_keys(isa, &ctx);
        let per_head = s.q_len.div_ceil(GEMM_QUERY_BLOCK);
        let tasks = s.batch * s.q_heads * per_head;
        let per_task = if threads > 1 && work >= PARALLEL_MIN_WORK {
            1
        } else {
            tasks
        };
        (0..tasks)
            .into_par_iter()
            .with_min_len(per_task)
            .for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(scores, acc, qp), t| {
                    let (bh, qb) = (t / per_head, t % per_head);
                    let i0 = qb * GEMM_QUERY_BLOCK;
                    let rows = i0..(i0 + GEMM_QUERY_BLOCK).min(s.q_len);
                    let bf16 = keys.as_ref().map(|k| (k, &mut *qp));
                    let (b, h) = (bh / s.q_heads, bh % s.q_heads);
                    ctx.rows_gemm(b, h, rows, bf16, scores, acc, &out_ptr)
                },
            );
    } else if threads > 1 && work >= PARALLEL_MIN_WORK {
        (0..blocks).into_par_iter().for_each_init(
            || Scratch::new(&s, group),
            |sc, blk| ctx.block(blk, sc, &out_ptr),
        );
    } else {
        let mut sc = Scratch::new(&s, group);
        for blk in 0..blocks {
            ctx.block(blk, &mut sc, &out_ptr);
        }
    }
    Ok(())
}

/// [`attention_f32`] with keys and values stored as bf16 (a KV cache kept narrow): the same
/// results as widening them to f32 first. Decode-shaped calls (few queries per head) widen
/// each block of keys and values in L1 as they read it; others widen `k` and `v` whole, then
/// run the f32 kernel.
#[allow(clippy::too_many_arguments)]
pub fn attention_bf16_kv(
    shape: &AttnShape,
    opts: &AttnOptions,
    q: View,
    k: Bf16View,
    v: Bf16View,
    mask: Option<MaskView>,
    out: &mut [f32],
    out_strides: Strides4,
) -> Result<(), KernelError> {
    attention_bf16_kv_with(Isa::best(), shape, opts, q, k, v, mask, out, out_strides)
}

/// As [`attention_bf16_kv`] at instruction-set level `isa`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bf16_kv_with(
    isa: Isa,
    shape: &AttnShape,
    opts: &AttnOptions,
    q: View,
    k: Bf16View,
    v: Bf16View,
    mask: Option<MaskView>,
    out: &mut [f32],
    out_strides: Strides4,
) -> Result<(), KernelError> {
    let Some(ctx) = context(isa, shape, opts, q, k, v, mask, out, out_strides)? else {
        return Ok(());
    };
    if ctx.s.q_len < QUERY_BLOCK / 2 {
        decode::run(&ctx, &OutPtr(out.as_mut_ptr()));
        return Ok(());
    }
    let s = ctx.s;
    let (kw, vw) = (
        ctx.k.widened(s.batch, s.kv_heads, s.kv_len, s.head_dim),
        ctx.v.widened(s.batch, s.kv_heads, s.kv_len, s.v_dim),
    );
    let dense = |data, dim| View {
        data,
        strides: Strides4::dense(s.kv_heads, s.kv_len, dim),
    };
    attention_f32_with(
        isa,
        shape,
        opts,
        ctx.q,
        dense(&kw, s.head_dim),
        dense(&vw, s.v_dim),
        ctx.mask,
        out,
        out_strides,
    )
}

/// Checks the operands' extents against the shape and builds the call's context; `None` when
/// there is nothing to compute.
#[allow(clippy::too_many_arguments)]
fn context<'a, T>(
    isa: Isa,
    shape: &AttnShape,
    opts: &AttnOptions,
    q: View<'a>,
    k: Strided<'a, T>,
    v: Strided<'a, T>,
    mask: Option<MaskView<'a>>,
    out: &[f32],
    out_strides: Strides4,
) -> Result<Option<Ctx<'a, T>>, KernelError> {
    let s = *shape;
    let group = if s.kv_heads == 0 {
        (s.q_heads == 0).then_some(1)
    } else {
        s.q_heads
            .is_multiple_of(s.kv_heads)
            .then_some(s.q_heads / s.kv_heads)
    };
    let group = group.ok_or_else(|| {
        KernelError::Layout(format!(
            "attention: {} query heads is not a multiple of {} kv heads",
            s.q_heads, s.kv_heads
        ))
    })?;
    let fits = |what: &str, len: usize, st: Strides4, dims: [usize; 4]| {
        check_extent(len, st, dims).ok_or_else(|| {
            KernelError::Layout(format!(
                "attention {what}: {len} elements do not hold {dims:?} at strides {st:?}"
            ))
        })
    };
    fits(
        "q",
        q.data.len(),
        q.strides,
        [s.batch, s.q_heads, s.q_len, s.head_dim],
    )?;
    fits(
        "k",
        k.data.len(),
        k.strides,
        [s.batch, s.kv_heads, s.kv_len, s.head_dim],
    )?;
    fits(
        "v",
        v.data.len(),
        v.strides,
        [s.batch, s.kv_heads, s.kv_len, s.v_dim],
    )?;
    if let Some(m) = &mask {
        fits(
            "mask",
            m.data.len(),
            m.strides,
            [s.batch, s.q_heads, s.q_len, s.kv_len],
        )?;
    }
    let out_dims = [s.batch, s.q_heads, s.q_len, s.v_dim];
    fits("out", out.len(), out_strides, out_dims)?;
    if !injective(out_strides, out_dims) {
        return Err(KernelError::Layout(format!(
            "attention out: strides {out_strides:?} make rows of {out_dims:?} overlap"
        )));
    }
    let rows = s.batch.saturating_mul(s.q_heads).saturating_mul(s.q_len);
    if rows == 0 || s.v_dim == 0 {
        return Ok(None);
    }
    Ok(Some(Ctx {
        s,
        group,
        opts: *opts,
        q,
        k,
        v,
        mask,
        out_strides,
        // AVX512-BF16 kept (not only the vector width): decode scores bf16 keys with it.
        level: if crate::gemm_bf16::has_panel_row(isa) {
            Isa::Avx512Bf16
        } else {
            vector_level(isa)
        },
    }))
}

/// `Some(())` when `len` elements hold every index of `dims` at `st` (last axis stride 1).
fn check_extent(len: usize, st: Strides4, dims: [usize; 4]) -> Option<()> {
    if dims[..3].contains(&0) {
        return Some(());
    }
    let last = (dims[0] - 1)
        .checked_mul(st.batch)?
        .checked_add((dims[1] - 1).checked_mul(st.head)?)?
        .checked_add((dims[2] - 1).checked_mul(st.seq)?)?
        .checked_add(dims[3])?;
    (last <= len).then_some(())
}

/// True when distinct indices of `dims` at `st` (last axis stride 1) have distinct offsets:
/// sorted by stride, each axis's stride exceeds the largest offset the smaller ones reach.
/// (Sufficient, not necessary; dense and permuted layouts pass.)
fn injective(st: Strides4, dims: [usize; 4]) -> bool {
    if dims.contains(&0) {
        return true;
    }
    let mut axes = [
        (st.batch, dims[0]),
        (st.head, dims[1]),
        (st.seq, dims[2]),
        (1, dims[3]),
    ];
    axes.sort_unstable();
    let mut reach = 0usize; // largest offset of the axes so far
    for (stride, n) in axes {
        if n == 1 {
            continue;
        }
        if stride <= reach {
            return false;
        }
        reach = match (n - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(reach))
        {
            Some(r) => r,
            None => return false,
        };
    }
    true
}

/// The output's base pointer, shared by the threads that write disjoint rows of it.
struct OutPtr(*mut f32);
// SAFETY: the pointer is only written through at offsets of distinct output rows (checked
// disjoint by `injective`) from different threads, never read, and outlives the parallel loop.
unsafe impl Sync for OutPtr {}

// Decode's per-task states are per-thread scratch.
crate::scratch::pooled!(Stats);

/// Running softmax state of one query row over part of its keys.
#[derive(Debug, Clone, Copy)]
struct Stats {
    /// Largest score seen (`-inf` when none is finite or larger).
    m: f32,
    /// `Σ exp(score - m)`.
    l: f32,
    /// A score was NaN.
    nan: bool,
}

/// One call's operands and attributes; keys and values are f32, or (decode only) bf16.
struct Ctx<'a, T = f32> {
    s: AttnShape,
    group: usize,
    opts: AttnOptions,
    q: View<'a>,
    k: Strided<'a, T>,
    v: Strided<'a, T>,
    mask: Option<MaskView<'a>>,
    out_strides: Strides4,
    level: Isa,
}

/// One thread's buffers for [`Ctx::block`].
struct Scratch {
    /// A block of keys transposed: `kt[t · KEY_BLOCK + j]` is key `j`'s element `t`.
    kt: Vec<f32>,
    /// Per query row of the block: its accumulator (`v_dim` each).
    acc: Vec<f32>,
    /// Per query row of the block: its running softmax state.
    stats: Vec<Stats>,
}

impl Scratch {
    fn new(s: &AttnShape, group: usize) -> Scratch {
        Scratch {
            kt: vec![0.0; s.head_dim * KEY_BLOCK],
            acc: vec![0.0; group * QUERY_BLOCK * s.v_dim],
            stats: vec![EMPTY; group * QUERY_BLOCK],
        }
    }
}

impl<T> Ctx<'_, T> {
    /// Keys `lo..hi` visible to query `i`.
    fn visible(&self, i: usize) -> (usize, usize) {
        let s = &self.s;
        let pos = s.kv_len as i64 - s.q_len as i64 + i as i64;
        let hi = if self.opts.causal {
            (pos + 1).clamp(0, s.kv_len as i64) as usize
        } else {
            s.kv_len
        };
        let lo = if self.opts.window > 0 {
            let w = i64::try_from(self.opts.window).unwrap_or(i64::MAX);
            pos.saturating_sub(w)
                .saturating_add(1)
                .clamp(0, s.kv_len as i64) as usize
        } else {
            0
        };
        (lo, hi)
    }

    /// Writes row `(b, h, i)` of the output: zeros without visible keys (`st` None), NaN after
    /// a NaN score, else `acc / l`.
    fn write(&self, out: &OutPtr, b: usize, h: usize, i: usize, st: Option<Stats>, acc: &[f32]) {
        let o = self.out_strides.offset(b, h, i);
        // SAFETY: `check_extent` showed o + v_dim <= out.len() for every (b, h, i), and
        // `injective` that the rows of distinct (b, h, i) do not overlap, so this row is written
        // by this call only.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(o), self.s.v_dim) };
        match st {
            None => dst.fill(0.0),
            Some(st) if st.nan => dst.fill(f32::NAN),
            Some(st) => {
                let inv = 1.0 / st.l;
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d = a * inv;
                }
            }
        }
    }
}

impl Ctx<'_> {
    /// Queries `rows` of head `(b, h)` with two GEMMs over the keys `lo..hi` any of them sees
    /// (fully masked causal/window blocks skipped): scores `S = scale · Q·Kᵀ` (with the packed
    /// bf16 keys and the thread's query scratch of `bf16` when given), each row's softmax over
    /// its visible keys (mask added, others zero), `O = P·V`, rows written as [`Ctx::write`]
    /// does. `scores` and `acc` are the thread's scratch.
    #[allow(clippy::too_many_arguments)]
    fn rows_gemm(
        &self,
        b: usize,
        h: usize,
        rows: std::ops::Range<usize>,
        bf16: Option<(&scores_bf16::Keys, &mut Vec<u32>)>,
        scores: &mut Vec<f32>,
        acc: &mut Vec<f32>,
        out: &OutPtr,
    ) {
        let s = &self.s;
        let (d, dv) = (s.head_dim, s.v_dim);
        let sq = rows.len();
        // Query positions only grow with i: the first row starts, the last ends the key range
        // (with bf16 keys, from the start of its panel).
        let (mut klo, khi) = (self.visible(rows.start).0, self.visible(rows.end - 1).1);
        if bf16.is_some() {
            klo -= klo % crate::gemm_bf16::NR;
        }
        let sk = khi.saturating_sub(klo);
        if sk == 0 {
            for i in rows {
                self.write(out, b, h, i, None, &[]);
            }
            return;
        }
        let kh = h / self.group;
        let q = &self.q.data[self.q.strides.offset(b, h, rows.start)..];
        let k = &self.k.data[self.k.strides.offset(b, kh, klo)..];
        let v = &self.v.data[self.v.strides.offset(b, kh, klo)..];
        scores.resize(sq * sk, 0.0);
        acc.resize(sq * dv, 0.0);
        if let Some((keys, qp)) = bf16 {
            keys.scores(self, b, h, rows.clone(), klo, sk, scores, qp);
            for x in scores.iter_mut() {
                *x *= self.opts.scale;
            }
        } else {
            let qk = Gemm {
                m: sq,
                n: sk,
                k: d,
                a: MatLayout {
                    ld: self.q.strides.seq,
                    trans: false,
                },
                b: MatLayout {
                    ld: self.k.strides.seq,
                    trans: true,
                },
                ldc: sk,
                alpha: self.opts.scale,
                beta: 0.0,
            };
            gemm::run(&qk, q, k, scores, 1);
        }
        let mut stats: Vec<Option<Stats>> = Vec::with_capacity(sq);
        for (i, row) in rows.clone().zip(scores.chunks_exact_mut(sk.max(1))) {
            let (lo, hi) = self.visible(i);
            if lo >= hi {
                row.fill(0.0);
                stats.push(None);
                continue;
            }
            let (lo, hi) = (lo - klo, hi - klo);
            let mask = self
                .mask
                .as_ref()
                .map(|m| &m.data[m.strides.offset(b, h, i) + klo..][lo..hi]);
            let st = self.softmax(&mut row[lo..hi], mask);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            stats.push(Some(st));
        }
        let pv = Gemm {
            m: sq,
            n: dv,
            k: sk,
            a: MatLayout {
                ld: sk,
                trans: false,
            },
            b: MatLayout {
                ld: self.v.strides.seq,
                trans: false,
            },
            ldc: dv,
            alpha: 1.0,
            beta: 0.0,
        };
        gemm::run(&pv, scores, v, acc, 1);
        for (r, (i, st)) in rows.zip(stats).enumerate() {
            self.write(out, b, h, i, st, &acc[r * dv..(r + 1) * dv]);
        }
    }

    /// Replaces the scores `x` (plus `mask`) by `exp(x - m)` with `m` their maximum; returns
    /// `(m, Σ exp(x - m))` and whether a score was NaN (or all are `-inf`).
    fn softmax(&self, x: &mut [f32], mask: Option<&[f32]>) -> Stats {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => {
                // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL, AVX2
                // and FMA are present.
                unsafe { x86::softmax_avx512(x, mask) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: `vector_level` returned an available level, so AVX2 and FMA are
                // present.
                unsafe { x86::softmax_avx2(x, mask) }
            }
            _ => softmax_body::<false>(x, mask),
        }
    }

    /// Computes and writes query block `blk`: queries `QUERY_BLOCK·q..` of every query head
    /// reading kv head `hk` of batch `b`, blocks in row-major order of `(b, hk, q)`.
    fn block(&self, blk: usize, sc: &mut Scratch, out: &OutPtr) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => {
                // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL, AVX2
                // and FMA are present.
                unsafe { x86::block_avx512(self, blk, sc, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: `vector_level` returned an available level, so AVX2 and FMA are
                // present.
                unsafe { x86::block_avx2(self, blk, sc, out) }
            }
            _ => block_body::<false>(self, blk, sc, out),
        }
    }
}

/// Merges partial results `(stats, acc)` over disjoint key ranges into `acc` (zeroed by the
/// caller).
fn merge<'a>(partials: impl Iterator<Item = (Stats, &'a [f32])> + Clone, acc: &mut [f32]) -> Stats {
    let m = partials
        .clone()
        .fold(f32::NEG_INFINITY, |m, (st, _)| m.max(st.m));
    let mut total = Stats {
        m,
        l: 0.0,
        nan: partials.clone().any(|(st, _)| st.nan),
    };
    if m == f32::NEG_INFINITY {
        return total;
    }
    for (st, a) in partials {
        let c = exp::<false>(st.m - m);
        total.l += st.l * c;
        for (x, y) in acc.iter_mut().zip(a) {
            *x += c * y;
        }
    }
    total
}

/// The state before any key.
const EMPTY: Stats = Stats {
    m: f32::NEG_INFINITY,
    l: 0.0,
    nan: false,
};

/// See [`Ctx::softmax`]; lane-wise maxima and sums so the loops vectorize.
#[inline(always)]
fn softmax_body<const FMA: bool>(x: &mut [f32], mask: Option<&[f32]>) -> Stats {
    if let Some(m) = mask {
        for (a, &b) in x.iter_mut().zip(m) {
            *a += b;
        }
    }
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
            nan[l] |= c[l].is_nan();
        }
    }
    let mut m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut any_nan = nan.contains(&true);
    for &r in chunks.remainder() {
        m = m.max(r);
        any_nan |= r.is_nan();
    }
    let mut sum = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp::<FMA>(c[l] - m);
            sum[l] += c[l];
        }
    }
    let mut l = hsum(&sum);
    for r in chunks.into_remainder() {
        *r = exp::<FMA>(*r - m);
        l += *r;
    }
    Stats {
        m,
        l,
        nan: any_nan || m == f32::NEG_INFINITY,
    }
}

/// Folds the scores `sc` of keys `j0..j0 + sc.len()` into `st` and `acc`; value row `j` is
/// `v[j · vs..][..acc.len()]`.
#[inline(always)]
fn update<const FMA: bool>(
    st: &mut Stats,
    sc: &[f32],
    acc: &mut [f32],
    v: &[f32],
    vs: usize,
    j0: usize,
) {
    let mut bm = f32::NEG_INFINITY;
    let mut nan = false;
    for &x in sc {
        bm = bm.max(x);
        nan |= x.is_nan();
    }
    st.nan |= nan;
    let m_new = st.m.max(bm);
    if m_new == f32::NEG_INFINITY {
        return;
    }
    if m_new != st.m {
        let alpha = exp::<FMA>(st.m - m_new);
        st.l *= alpha;
        for a in acc.iter_mut() {
            *a *= alpha;
        }
        st.m = m_new;
    }
    let mut p = [0.0f32; KEY_BLOCK];
    let p = &mut p[..sc.len()];
    for (o, &x) in p.iter_mut().zip(sc) {
        *o = exp::<FMA>(x - m_new);
    }
    let mut lanes = [0.0f32; LANES];
    let mut chunks = p.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    st.l += hsum(&lanes) + chunks.remainder().iter().sum::<f32>();
    // acc += Σ_t p_t · v_{j0+t}, in groups of VALUE_GROUP columns kept in registers over the
    // keys, then the remaining columns.
    let dv = acc.len();
    let full = dv / VALUE_GROUP * VALUE_GROUP;
    for c0 in (0..full).step_by(VALUE_GROUP) {
        let mut a = [0.0f32; VALUE_GROUP];
        a.copy_from_slice(&acc[c0..c0 + VALUE_GROUP]);
        for (t, &pt) in p.iter().enumerate() {
            let vr = &v[(j0 + t) * vs + c0..][..VALUE_GROUP];
            for l in 0..VALUE_GROUP {
                a[l] = madd::<FMA>(pt, vr[l], a[l]);
            }
        }
        acc[c0..c0 + VALUE_GROUP].copy_from_slice(&a);
    }
    if full < dv {
        for (t, &pt) in p.iter().enumerate() {
            let vr = &v[(j0 + t) * vs + full..][..dv - full];
            for (a, &y) in acc[full..].iter_mut().zip(vr) {
                *a = madd::<FMA>(pt, y, *a);
            }
        }
    }
}

/// Query block `blk` (see [`Ctx::block`]): each block of keys is transposed once into
/// `sc.kt`, then every query row of the block scores it with FMAs along the keys (no
/// horizontal sums) and folds it into its own online softmax.
#[inline(always)]
fn block_body<const FMA: bool>(c: &Ctx, blk: usize, sc: &mut Scratch, out: &OutPtr) {
    let s = &c.s;
    let per_head = s.q_len.div_ceil(QUERY_BLOCK);
    let (qb, hk, b) = (
        blk % per_head,
        (blk / per_head) % s.kv_heads,
        blk / (per_head * s.kv_heads),
    );
    let (i0, i1) = (
        qb * QUERY_BLOCK,
        (qb * QUERY_BLOCK + QUERY_BLOCK).min(s.q_len),
    );
    let nq = i1 - i0;
    let k = &c.k.data[c.k.strides.offset(b, hk, 0)..];
    let v = &c.v.data[c.v.strides.offset(b, hk, 0)..];
    let (ks, vs, d, dv) = (c.k.strides.seq, c.v.strides.seq, s.head_dim, s.v_dim);
    let mut ranges = [(0usize, 0usize); QUERY_BLOCK];
    for (r, i) in ranges.iter_mut().zip(i0..i1) {
        *r = c.visible(i);
    }
    let ranges = &ranges[..nq];
    let klo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let khi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    // Row r of the block is query i0 + r % nq of head hk·group + r / nq.
    let rows = c.group * nq;
    let head = |r: usize| hk * c.group + r / nq;
    sc.stats[..rows].fill(EMPTY);
    sc.acc[..rows * dv].fill(0.0);
    let mut j0 = klo;
    while j0 < khi {
        let n = KEY_BLOCK.min(khi - j0);
        // kt[t][j] = k[j0 + j][t]; columns past n stay as they were (their scores are unused).
        for j in 0..n {
            let kr = &k[(j0 + j) * ks..][..d];
            for (t, &x) in kr.iter().enumerate() {
                sc.kt[t * KEY_BLOCK + j] = x;
            }
        }
        for r in 0..rows {
            let (lo, hi) = ranges[r % nq];
            if hi <= j0 || lo >= j0 + n || lo >= hi {
                continue;
            }
            let (h, i) = (head(r), i0 + r % nq);
            let q = &c.q.data[c.q.strides.offset(b, h, i)..][..d];
            let mut scores = [0.0f32; KEY_BLOCK];
            for (t, &qt) in q.iter().enumerate() {
                let kt = &sc.kt[t * KEY_BLOCK..][..KEY_BLOCK];
                for l in 0..KEY_BLOCK {
                    scores[l] = madd::<FMA>(qt, kt[l], scores[l]);
                }
            }
            // Only keys lo..hi of this block take part.
            let (a, e) = (lo.max(j0), hi.min(j0 + n));
            let sc_row = &mut scores[a - j0..e - j0];
            for o in sc_row.iter_mut() {
                *o *= c.opts.scale;
            }
            if let Some(m) = &c.mask {
                let mr = &m.data[m.strides.offset(b, h, i)..][a..e];
                for (o, x) in sc_row.iter_mut().zip(mr) {
                    *o += x;
                }
            }
            let acc = &mut sc.acc[r * dv..(r + 1) * dv];
            update::<FMA>(&mut sc.stats[r], sc_row, acc, v, vs, a);
        }
        j0 += n;
    }
    for r in 0..rows {
        let (lo, hi) = ranges[r % nq];
        let st = (lo < hi).then_some(sc.stats[r]);
        c.write(
            out,
            b,
            head(r),
            i0 + r % nq,
            st,
            &sc.acc[r * dv..(r + 1) * dv],
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_body, softmax_body, Ctx, OutPtr, Scratch, Stats};

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn softmax_avx512(x: &mut [f32], mask: Option<&[f32]>) -> Stats {
        softmax_body::<true>(x, mask)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_avx2(x: &mut [f32], mask: Option<&[f32]>) -> Stats {
        softmax_body::<true>(x, mask)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn block_avx512(c: &Ctx, blk: usize, sc: &mut Scratch, out: &OutPtr) {
        block_body::<true>(c, blk, sc, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_avx2(c: &Ctx, blk: usize, sc: &mut Scratch, out: &OutPtr) {
        block_body::<true>(c, blk, sc, out)
    }
}

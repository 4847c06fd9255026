//! Attention with few queries per head (decode, and short prefills after a long cache): each
//! key and value row is read from memory once for every query row of its GQA group.
//!
//! Work is cut into tasks `(batch, kv head, key part)`: a task walks its part of the key range
//! in blocks of [`KEY_BLOCK`] keys and, for each block (in L1 after the first row touches it),
//! runs the online softmax of every query row of the group (`group × q_len` rows: the query
//! heads sharing the kv head, each at every query position). With fewer `(batch, kv head)`
//! pairs than the threads can use, the key range is split into parts (flash-decoding), whose
//! partial `(m, l, acc)` are merged per row afterwards. The tasks run on the [`crate::pool`]
//! team (decode's regions are short). Keys are read through the operands' strides, so a cache
//! view with spare capacity (head stride = capacity · d) costs nothing. Keys and values are
//! f32 rows read in place or bf16 rows (a narrow KV cache) widened a block at a time into the
//! task's L1-sized scratch, once for every query row of the group ([`KvElement`]); bf16 keys
//! are scored as stored with `vdpbf16ps` where the CPU has it and the queries are bf16 values.

use super::{merge, update, Ctx, OutPtr, Stats, Strided, EMPTY, KEY_BLOCK, PARALLEL_MIN_WORK};
use crate::layout::Convert;
use crate::scratch::Scratch;
use crate::simd::{dot, prefetch, Isa};
use half::bf16;
use smallvec::SmallVec;

/// The element types decode reads keys and values in: f32 rows in place, bf16 rows widened.
pub(super) trait KvElement: Copy + Sync {
    /// Rows `j0..j0 + n` (each `dim` elements) of `(b, h)` of `v` as f32, and the stride
    /// between them: in place, or widened into `buf`.
    fn rows<'s>(
        v: &'s Strided<'_, Self>,
        b: usize,
        h: usize,
        j0: usize,
        n: usize,
        dim: usize,
        buf: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize);
    /// Rows `j0..` of `(b, h)` of `v` as stored bf16, and the stride between them; `None` when
    /// they are not bf16.
    fn raw_bf16<'s>(
        _v: &'s Strided<'_, Self>,
        _b: usize,
        _h: usize,
        _j0: usize,
    ) -> Option<(&'s [bf16], usize)> {
        None
    }
}

impl KvElement for f32 {
    #[inline(always)]
    fn rows<'s>(
        v: &'s Strided<'_, f32>,
        b: usize,
        h: usize,
        j0: usize,
        _n: usize,
        _dim: usize,
        _buf: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        (&v.data[v.strides.offset(b, h, j0)..], v.strides.seq)
    }
}

impl KvElement for bf16 {
    #[inline(always)]
    fn rows<'s>(
        v: &'s Strided<'_, bf16>,
        b: usize,
        h: usize,
        j0: usize,
        n: usize,
        dim: usize,
        buf: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        buf.resize(n * dim, 0.0);
        let src = &v.data[v.strides.offset(b, h, j0)..];
        for (t, row) in buf.chunks_exact_mut(dim).enumerate() {
            widen(&src[t * v.strides.seq..][..dim], row);
        }
        (buf, dim)
    }

    #[inline(always)]
    fn raw_bf16<'s>(
        v: &'s Strided<'_, bf16>,
        b: usize,
        h: usize,
        j0: usize,
    ) -> Option<(&'s [bf16], usize)> {
        Some((&v.data[v.strides.offset(b, h, j0)..], v.strides.seq))
    }
}

impl Strided<'_, bf16> {
    /// The elements of `[batch, heads, seq, dim]` widened to dense row-major f32.
    pub(super) fn widened(&self, batch: usize, heads: usize, seq: usize, dim: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; batch * heads * seq * dim];
        for (r, row) in out.chunks_exact_mut(dim.max(1)).enumerate() {
            let (bh, j) = (r / seq, r % seq);
            let o = self.strides.offset(bh / heads, bh % heads, j);
            widen(&self.data[o..][..dim], row);
        }
        out
    }
}

/// Hints the cache to fetch the first line of row `j` of `(b, h)` of `v`.
#[inline(always)]
fn prefetch_row<T>(v: &Strided<'_, T>, b: usize, h: usize, j: usize) {
    if let Some(x) = v.data.get(v.strides.offset(b, h, j)) {
        prefetch(x);
    }
}

/// bf16 to f32 (exact).
#[inline(always)]
fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x.convert();
    }
}

/// Keys per part at least, when the key range is split.
const MIN_PART_KEYS: usize = 128;
/// Tasks per thread aimed at (load balance on a shared machine).
const TASKS_PER_THREAD: usize = 4;

/// Computes and writes every output row (see the module docs).
pub(super) fn run<T: KvElement>(c: &Ctx<'_, T>, out: &OutPtr) {
    let s = &c.s;
    let rows = c.group * s.q_len;
    let dv = s.v_dim;
    // Query positions only grow with i, so row 0 starts and the last row ends the key range.
    let (klo, khi) = (c.visible(0).0, c.visible(s.q_len - 1).1);
    let span = khi.saturating_sub(klo);
    let units = s.batch * s.kv_heads;
    let threads = crate::threads();
    let work = units * rows * span.max(1) * (s.head_dim + dv).max(1);
    let parallel = threads > 1 && work >= PARALLEL_MIN_WORK;
    let parts = if parallel {
        (TASKS_PER_THREAD * threads)
            .div_ceil(units)
            .min(span / MIN_PART_KEYS)
            .max(1)
    } else {
        1
    };
    let per = span.div_ceil(parts).max(1).next_multiple_of(KEY_BLOCK);
    let parts = span.div_ceil(per).max(1);
    let tasks = units * parts;
    let mut stats = Scratch::filled(tasks * rows, EMPTY);
    let mut acc = Scratch::filled(tasks * rows * dv, 0.0f32);
    let mut items: SmallVec<[(&mut [Stats], &mut [f32]); 64]> = stats
        .chunks_mut(rows)
        .zip(acc.chunks_mut(rows * dv))
        .collect();
    let run = |t: usize, (st, a): &mut (&mut [Stats], &mut [f32])| {
        let (unit, part) = (t / parts, t % parts);
        let p0 = klo + part * per;
        let p1 = (p0 + per).min(khi);
        task(c, unit / s.kv_heads, unit % s.kv_heads, p0, p1, st, a);
    };
    if parallel {
        crate::pool::for_each(&mut items, run);
    } else {
        items.iter_mut().enumerate().for_each(|(t, it)| run(t, it));
    }
    drop(items);
    // Merge each row's parts and write it.
    let mut row_acc = Scratch::filled(dv, 0.0f32);
    for unit in 0..units {
        let (b, hk) = (unit / s.kv_heads, unit % s.kv_heads);
        for r in 0..rows {
            let (g, i) = (r / s.q_len, r % s.q_len);
            let (lo, hi) = c.visible(i);
            let st = (lo < hi).then(|| {
                let partial = |p: usize| {
                    let at = (unit * parts + p) * rows + r;
                    (stats[at], &acc[at * dv..(at + 1) * dv])
                };
                row_acc.fill(0.0);
                merge((0..parts).map(partial), &mut row_acc)
            });
            c.write(out, b, hk * c.group + g, i, st, &row_acc);
        }
    }
}

/// The online softmax of every query row of kv head `hk` of batch `b` over keys `p0..p1`:
/// row `r` (query head `hk · group + r / q_len`, query `r % q_len`) into `st[r]` and
/// `acc[r · v_dim..]`.
fn task<T: KvElement>(
    c: &Ctx<'_, T>,
    b: usize,
    hk: usize,
    p0: usize,
    p1: usize,
    st: &mut [Stats],
    acc: &mut [f32],
) {
    match c.level {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => {
            // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL/BF16,
            // AVX2 and FMA are present.
            unsafe { x86::task_avx512bf16(c, b, hk, p0, p1, st, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL, AVX2
            // and FMA are present.
            unsafe { x86::task_avx512(c, b, hk, p0, p1, st, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `vector_level` returned an available level, so AVX2 and FMA are present.
            unsafe { x86::task_avx2(c, b, hk, p0, p1, st, acc) }
        }
        _ => task_body::<T, false, false, false>(c, b, hk, p0, p1, st, acc),
    }
}

/// See [`task`]; `WIDE` scores keys with the AVX-512 kernel [`x86::scores_avx512`] (only
/// instantiated with `FMA` inside functions compiled for AVX-512); `DP` scores bf16 keys as
/// stored with `vdpbf16ps` ([`x86::scores_dpbf16`], only instantiated inside functions compiled
/// for AVX512-BF16) when every query element of the task is a bf16 value (a bf16 graph rounds
/// its attention operands): the products of bf16 values are exact in f32, so the scores are
/// those of the f32 path up to the order of the additions, without widening the keys.
#[inline(always)]
fn task_body<T: KvElement, const FMA: bool, const WIDE: bool, const DP: bool>(
    c: &Ctx<'_, T>,
    b: usize,
    hk: usize,
    p0: usize,
    p1: usize,
    st: &mut [Stats],
    acc: &mut [f32],
) {
    let s = &c.s;
    let (d, dv, nq) = (s.head_dim, s.v_dim, s.q_len);
    st.fill(EMPTY);
    acc.fill(0.0);
    // Query row r at qb[r · dp..], zero-padded to whole 32-element vectors.
    let dp = d.next_multiple_of(32);
    let qb = if DP && T::raw_bf16(&c.k, b, hk, p0).is_some() {
        let mut qb = Scratch::filled(st.len() * dp, bf16::ZERO);
        let exact = qb.chunks_exact_mut(dp).enumerate().all(|(r, o)| {
            let (h, i) = (hk * c.group + r / nq, r % nq);
            let q = &c.q.data[c.q.strides.offset(b, h, i)..][..d];
            for (o, x) in o.iter_mut().zip(q) {
                *o = bf16::from_bits((x.to_bits() >> 16) as u16);
            }
            q.iter().all(|x| x.to_bits() & 0xffff == 0)
        });
        exact.then_some(qb)
    } else {
        None
    };
    let (mut kbuf, mut vbuf) = (Scratch::empty(), Scratch::empty());
    let mut j0 = p0;
    while j0 < p1 {
        let n = KEY_BLOCK.min(p1 - j0);
        // The next block's rows, while this one is computed.
        for j in j0 + n..(j0 + 2 * n).min(p1) {
            prefetch_row(&c.k, b, hk, j);
            prefetch_row(&c.v, b, hk, j);
        }
        // This block's rows from j0 on, in place or widened once for every row of the group
        // (the keys as stored when `vdpbf16ps` scores them).
        let raw = qb.as_ref().and_then(|_| T::raw_bf16(&c.k, b, hk, j0));
        let (k, ks) = match raw {
            Some(_) => (&[][..], 0),
            None => T::rows(&c.k, b, hk, j0, n, d, kbuf.as_vec()),
        };
        let (v, vs) = T::rows(&c.v, b, hk, j0, n, dv, vbuf.as_vec());
        for (r, (st, acc)) in st.iter_mut().zip(acc.chunks_exact_mut(dv)).enumerate() {
            let (h, i) = (hk * c.group + r / nq, r % nq);
            let (lo, hi) = c.visible(i);
            let (a, e) = (lo.max(j0), hi.min(j0 + n));
            if a >= e {
                continue;
            }
            let q = &c.q.data[c.q.strides.offset(b, h, i)..][..d];
            let mut scores = [0.0f32; KEY_BLOCK];
            let sc = &mut scores[..e - a];
            if let (true, Some(qb), Some((kr, krs))) = (DP, &qb, raw) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `DP` is only instantiated by `x86::task_avx512bf16`, compiled with
                // the features `scores_dpbf16` needs.
                unsafe {
                    x86::scores_dpbf16(&qb[r * dp..][..dp], &kr[(a - j0) * krs..], krs, d, sc)
                };
            } else if WIDE {
                let keys = &k[(a - j0) * ks..(e - 1 - j0) * ks + d];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `WIDE` is only instantiated by `x86::task_avx512` and
                // `x86::task_avx512bf16`, compiled with the features `scores_avx512` needs.
                unsafe {
                    x86::scores_avx512(q, keys, ks, sc)
                };
            } else {
                let keys = &k[(a - j0) * ks..(e - 1 - j0) * ks + d];
                for (t, o) in sc.iter_mut().enumerate() {
                    *o = dot::<FMA>(q, &keys[t * ks..][..d]);
                }
            }
            for o in sc.iter_mut() {
                *o *= c.opts.scale;
            }
            if let Some(m) = &c.mask {
                let mr = &m.data[m.strides.offset(b, h, i)..][a..e];
                for (o, x) in sc.iter_mut().zip(mr) {
                    *o += x;
                }
            }
            update::<FMA>(st, sc, acc, v, vs, a - j0);
        }
        j0 += n;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{task_body, Ctx, KvElement, Stats};
    use half::bf16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub(super) fn task_avx512bf16<T: KvElement>(
        c: &Ctx<'_, T>,
        b: usize,
        hk: usize,
        p0: usize,
        p1: usize,
        st: &mut [Stats],
        acc: &mut [f32],
    ) {
        task_body::<T, true, true, true>(c, b, hk, p0, p1, st, acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn task_avx512<T: KvElement>(
        c: &Ctx<'_, T>,
        b: usize,
        hk: usize,
        p0: usize,
        p1: usize,
        st: &mut [Stats],
        acc: &mut [f32],
    ) {
        task_body::<T, true, true, false>(c, b, hk, p0, p1, st, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn task_avx2<T: KvElement>(
        c: &Ctx<'_, T>,
        b: usize,
        hk: usize,
        p0: usize,
        p1: usize,
        st: &mut [Stats],
        acc: &mut [f32],
    ) {
        task_body::<T, true, false, false>(c, b, hk, p0, p1, st, acc)
    }

    /// The lane sums of four vectors, `[Σ a0, Σ a1, Σ a2, Σ a3]`: per 128-bit quarter pair
    /// sums `[a0 a1 a0 a1]`, then `[a0 a1 a2 a3]`, then the quarters added.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    fn sum4(a: [__m512; 4]) -> __m128 {
        let t0 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[0], a[1]),
            _mm512_unpackhi_ps(a[0], a[1]),
        );
        let t1 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[2], a[3]),
            _mm512_unpackhi_ps(a[2], a[3]),
        );
        let s = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(t0, t1),
            _mm512_shuffle_ps::<0xEE>(t0, t1),
        );
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
        let s = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// `out[t] = Σ_c mac(0, q(c), c, t)` folded over the vectors `c < vectors` of key `t`:
    /// four keys at a time (one accumulator each, `q(c)` loaded once for the four, the sums
    /// reduced together by [`sum4`]), then the rest one by one.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    fn per_key<Q: Copy>(
        vectors: usize,
        q: impl Fn(usize) -> Q,
        mac: impl Fn(__m512, Q, usize, usize) -> __m512,
        out: &mut [f32],
    ) {
        let n = out.len();
        let mut j = 0;
        while j + 4 <= n {
            let mut a = [_mm512_setzero_ps(); 4];
            for c in 0..vectors {
                let qc = q(c);
                for (u, acc) in a.iter_mut().enumerate() {
                    *acc = mac(*acc, qc, c, j + u);
                }
            }
            // SAFETY: j + 4 <= n = out.len().
            unsafe { _mm_storeu_ps(out.as_mut_ptr().add(j), sum4(a)) };
            j += 4;
        }
        for (t, o) in out.iter_mut().enumerate().skip(j) {
            let acc = (0..vectors).fold(_mm512_setzero_ps(), |acc, c| mac(acc, q(c), c, t));
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    /// `out[t] = q · keys[t · ks..][..d]` with bf16 keys and queries, `vdpbf16ps` summing
    /// products of element pairs in f32: `q` holds the query zero-padded to a multiple of 32
    /// elements, each key's last vector is loaded masked to its `d` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    #[inline]
    pub(super) fn scores_dpbf16(q: &[bf16], keys: &[bf16], ks: usize, d: usize, out: &mut [f32]) {
        let n = out.len();
        let (full, rem) = (d / 32, d % 32);
        assert!(q.len() >= d.next_multiple_of(32) && (n == 0 || (n - 1) * ks + d <= keys.len()));
        let tail: __mmask32 = ((1u64 << rem) - 1) as u32;
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        // SAFETY (every load below): vector `c` of q covers elements 32c .. 32c + 32 within
        // q.len() (asserted); of key `t < n`, elements t·ks + 32c .. + 32 with 32c + 32 <= d
        // (full vectors) or only the first `rem` lanes, t·ks + d <= keys.len() by the
        // assertion. `__m512i` and `__m512bh` are the same 64 bytes.
        let bh = |v: __m512i| -> __m512bh { unsafe { std::mem::transmute(v) } };
        let qv = |c: usize| bh(unsafe { _mm512_loadu_si512(qp.add(32 * c).cast()) });
        let kv = |t: usize, c: usize| {
            let row = kp.wrapping_add(t * ks + 32 * c);
            bh(if c < full {
                unsafe { _mm512_loadu_si512(row.cast()) }
            } else {
                unsafe { _mm512_maskz_loadu_epi16(tail, row.cast()) }
            })
        };
        let vectors = full + usize::from(rem > 0);
        per_key(
            vectors,
            qv,
            |acc, q, c, t| _mm512_dpbf16_ps(acc, q, kv(t, c)),
            out,
        );
    }

    /// `out[t] = q · keys[t · ks..][..d]` (`d = q.len()`): one vector accumulator per key over
    /// the head dims (the last vector masked).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    pub(super) fn scores_avx512(q: &[f32], keys: &[f32], ks: usize, out: &mut [f32]) {
        let (d, n) = (q.len(), out.len());
        assert!(n == 0 || (n - 1) * ks + d <= keys.len());
        let (full, rem) = (d / 16, d % 16);
        let tail: __mmask16 = ((1u32 << rem) - 1) as u16;
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        // SAFETY (every load below): vector `c` of key `t < n` covers elements t·ks + 16c ..
        // + 16 with 16c + 16 <= d (full vectors) or only the first `rem` lanes, t·ks + d <=
        // keys.len() by the assertion, and q's vectors lie within q.len() = d likewise.
        let load = |p: *const f32, c: usize| {
            if c < full {
                unsafe { _mm512_loadu_ps(p.add(16 * c)) }
            } else {
                unsafe { _mm512_maskz_loadu_ps(tail, p.add(16 * c)) }
            }
        };
        let vectors = full + usize::from(rem > 0);
        let kv = |t: usize, c: usize| load(kp.wrapping_add(t * ks), c);
        per_key(
            vectors,
            |c| load(qp, c),
            |acc, q, c, t| _mm512_fmadd_ps(q, kv(t, c), acc),
            out,
        );
    }
}

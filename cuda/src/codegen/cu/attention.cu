// FlashAttention-2-style prefill for bf16, head dim D (64 or 128), as kiln's `attention` op:
// q[B, Hq, Sq, D], k/v[B, Hkv, Sk, D] contiguous, optional additive mask (bf16) read through
// four element strides over [B, Hq, Sq, Sk] (0 for broadcast axes), out[B, Hq, Sq, D].
// Query i sits at position Sk - Sq + i; causal hides keys j > pos, a window w > 0 also hides
// j <= pos - w. A query with no visible key gives zeros; visible keys all -inf give NaN.
//
// Two entry points, one template: each of the 4 warps owns MT m16 tiles of query rows, so a
// block covers BR = 64 * MT queries, grid (ceil(Sq / BR), Hq, B), 128 threads, dynamic shared
// memory (the launcher sets its size).
// * `attention_prefill` (MT = 1): 16 rows per warp, Q fragments held in registers.
// * `attention_prefill_wide` (MT = 2): 32 rows per warp, Q in shared memory, read with
//   ldmatrix per tile: every K and V fragment read from shared memory feeds two MMAs (half the
//   shared-memory traffic per flop), at the cost of more registers and shared memory; key
//   tiles of 32 instead of 64 keep it within 255 registers.
// Query blocks run last-first (under a causal mask the last ones have the most keys, so the
// long blocks start first). Keys go through shared memory in tiles, loaded with cp.async
// in the FlashAttention-2 order: V(j) is in flight during S = Q K(j)^T and the softmax, K(j+1)
// during O += P V(j). S and P V use the bf16 tensor cores through mma.sync.m16n8k16 (f32
// accumulation), their K and V operands read with ldmatrix (.trans for V). The softmax is
// online, in registers, in the log2 domain (ex2.approx); masks are evaluated only on tiles a
// mask, the causal diagonal, the window's edge or the end of the keys cuts.

#define KPAD (D + 8)

// Starts copying `rows` rows of D elements from row `r0` of `src` (zeros from row `end` on)
// into a padded shared tile.
template <int ROWS>
__device__ __forceinline__ void kiln_load_rows(__nv_bfloat16* tile, const __nv_bfloat16* src, int r0, int end) {
#pragma unroll
    for (int i = 0; i < ROWS * D / 8 / 128; ++i) {
        const int e = threadIdx.x + i * 128, row = e / (D / 8), col = (e % (D / 8)) * 8;
        const bool in = r0 + row < end;
        kiln_cp_async16(kiln_smem(tile + row * KPAD + col), src + (in ? (i64)(r0 + row) * D + col : 0), in ? 16 : 0);
    }
    kiln_cp_async_commit();
}

template <int MT>
__device__ __forceinline__ void kiln_prefill(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                             const __nv_bfloat16* __restrict__ v,
                                             const __nv_bfloat16* __restrict__ mask, i64 ms0, i64 ms1, i64 ms2,
                                             i64 ms3, __nv_bfloat16* __restrict__ out, int hq, int hkv, int sq,
                                             int sk, float scale, int causal, int window) {
    // Queries per block; keys per tile (32 at MT = 2 keeps S in 32 registers).
    constexpr int BR = 64 * MT, BC = 64 / MT;
    extern __shared__ __align__(16) unsigned char kiln_dyn_smem[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(kiln_dyn_smem);
    __nv_bfloat16* vs = ks + BC * KPAD;
    __nv_bfloat16* qs = vs + BC * KPAD;  // MT = 2 only: BR rows
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int hk = h / (hq / hkv);
    const __nv_bfloat16* qh = q + ((i64)b * hq + h) * sq * D;
    const __nv_bfloat16* kh = k + ((i64)b * hkv + hk) * sk * D;
    const __nv_bfloat16* vh = v + ((i64)b * hkv + hk) * sk * D;
    const int w0 = q0 + warp * 16 * MT;  // the warp's first query row
    const float sl2 = scale * LOG2E;

    // Key range any row of this block can see.
    const int last_pos = sk - sq + min(q0 + BR, sq) - 1;
    const int kv_end = causal ? min(sk, last_pos + 1) : sk;
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, (sk - sq + q0 - window + 1) / BC * BC);
    if constexpr (MT > 1) kiln_load_rows<BR>(qs, qh, q0, sq);
    if (kv_begin < kv_end) kiln_load_rows<BC>(ks, kh, kv_begin, sk);

    // MT = 1: this thread's fragments of its warp's 16 query rows (A operand, row-major).
    unsigned qa[MT == 1 ? D / 16 : 1][4];
    if constexpr (MT == 1) {
        const int r0 = w0 + g, r1 = r0 + 8;
#pragma unroll
        for (int kk = 0; kk < (MT == 1 ? D / 16 : 0); ++kk) {
            const int c = kk * 16 + t * 2;
            qa[kk][0] = r0 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r0 * D + c) : 0u;
            qa[kk][1] = r1 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r1 * D + c) : 0u;
            qa[kk][2] = r0 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r0 * D + c + 8) : 0u;
            qa[kk][3] = r1 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r1 * D + c + 8) : 0u;
        }
    }
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    // Per row (mt, rr: rows w0 + mt * 16 + g + rr * 8): maxima in the log2 domain, and this
    // thread's share of the sums.
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
    // Positions of the warp's first and last rows: which tiles need the mask evaluated.
    const int wpos_lo = sk - sq + w0, wpos_hi = wpos_lo + 16 * MT - 1;

    // ldmatrix lane addresses: lane l reads row l % 8 of matrix l / 8.
    const int mi = lane >> 3, mr = lane & 7;
    // K (non-transposed): matrix mi = (keys n*8 + 0..7, dims kk*16 + mi*8 + 0..7): b0, b1 of
    // kk and of kk + 1.
    const unsigned k_addr = kiln_smem(ks + mr * KPAD + mi * 8);
    // V (transposed): matrix mi = (keys kk*16 + (mi & 1)*8 + 0..7, dims n*8 + (mi >> 1)*8 + 0..7):
    // b0, b1 of n-tile n and of n + 1.
    const unsigned v_addr = kiln_smem(vs + ((mi & 1) * 8 + mr) * KPAD + (mi >> 1) * 8);
    // Q (MT = 2): matrix mi = (rows (mi & 1)*8 + 0..7, dims kk*16 + (mi >> 1)*8 + 0..7): a0..a3.
    const unsigned q_addr = kiln_smem(qs + (warp * 16 * MT + (mi & 1) * 8 + mr) * KPAD + (mi >> 1) * 8);

    for (int j0 = kv_begin; j0 < kv_end; j0 += BC) {
        kiln_cp_async_wait_all();
        __syncthreads();  // K(j) (and Q) are in; every warp is done with V(j - 1)
        kiln_load_rows<BC>(vs, vh, j0, sk);

        float s[MT][BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            unsigned qf[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    if constexpr (MT == 1) {
#pragma unroll
                        for (int r = 0; r < 4; ++r) qf[mt][u][r] = qa[MT == 1 ? kk + u : 0][r];
                    } else {
                        kiln_ldmatrix4(qf[mt][u], q_addr + (unsigned)((mt * 16 * KPAD + (kk + u) * 16) * 2));
                    }
                }
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                unsigned kb[4];
                kiln_ldmatrix4(kb, k_addr + (unsigned)((n * 8 * KPAD + kk * 16) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    kiln_mma(s[mt][n], qf[mt][0], kb[0], kb[1]);
                    kiln_mma(s[mt][n], qf[mt][1], kb[2], kb[3]);
                }
            }
        }
        // Scores to the log2 domain: exp2(s * mul - base). Masked tiles hide invisible keys,
        // add the mask and scale in place (mul = 1); plain tiles keep raw scores, whose
        // maximum times a positive scale is the scaled maximum, and fold the scale into the
        // exponent's FFMA.
        const bool masked = mask != nullptr || j0 + BC > sk || (causal && j0 + BC - 1 > wpos_lo) ||
                            (window > 0 && j0 <= wpos_hi - window) || !(sl2 > 0.0f);
        float tmax[MT][2], mul = 1.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) tmax[mt][0] = tmax[mt][1] = -INFINITY;
        if (masked) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BC / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int rr = e >> 1, row = w0 + mt * 16 + g + rr * 8, pos = sk - sq + row;
                        const int j = j0 + n * 8 + t * 2 + (e & 1);
                        const bool vis = row < sq && j < sk && (!causal || j <= pos) &&
                                         (window == 0 || j > pos - window);
                        float x = -INFINITY;
                        if (vis) {
                            x = s[mt][n][e] * sl2;
                            if (mask) x += LOG2E * __bfloat162float(mask[b * ms0 + h * ms1 + row * ms2 + j * ms3]);
                        }
                        s[mt][n][e] = x;
                        tmax[mt][rr] = fmaxf(tmax[mt][rr], x);
                    }
        } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int n = 0; n < BC / 8; ++n) {
                    tmax[mt][0] = fmaxf(tmax[mt][0], fmaxf(s[mt][n][0], s[mt][n][1]));
                    tmax[mt][1] = fmaxf(tmax[mt][1], fmaxf(s[mt][n][2], s[mt][n][3]));
                }
                tmax[mt][0] *= sl2;
                tmax[mt][1] *= sl2;
            }
            mul = sl2;
        }
        float alpha[MT][2], base[MT][2];
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float tm = tmax[mt][rr];
                tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
                tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
                const float mn = fmaxf(m[mt][rr], tm);
                // With every score so far -inf, subtract 0: the probabilities are exp2(-inf) = 0.
                base[mt][rr] = mn == -INFINITY ? 0.0f : mn;
                alpha[mt][rr] = kiln_ex2(m[mt][rr] - base[mt][rr]);
                moved |= alpha[mt][rr] != 1.0f;
                m[mt][rr] = mn;
                l[mt][rr] *= alpha[mt][rr];
            }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BC / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = kiln_ex2(fmaf(s[mt][n][e], mul, -base[mt][e >> 1]));
                    s[mt][n][e] = p;
                    l[mt][e >> 1] += p;
                }
        // Rescale O unless no row maximum of the warp moved (most tiles once they settle).
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    o[mt][n][0] *= alpha[mt][0]; o[mt][n][1] *= alpha[mt][0];
                    o[mt][n][2] *= alpha[mt][1]; o[mt][n][3] *= alpha[mt][1];
                }
        }

        kiln_cp_async_wait_all();
        __syncthreads();  // V(j) is in; every warp is done with K(j)
        if (j0 + BC < kv_end) kiln_load_rows<BC>(ks, kh, j0 + BC, sk);

        // O += P V: P from registers (bf16 A fragments), V through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = kiln_pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = kiln_pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = kiln_pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = kiln_pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                unsigned vb[4];
                kiln_ldmatrix4_trans(vb, v_addr + (unsigned)((kk * 16 * KPAD + n * 8) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    kiln_mma(o[mt][n], pa[mt], vb[0], vb[1]);
                    kiln_mma(o[mt][n + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    // Row sums over the quad, then normalize and store. A row sees some key when its window
    // of visible keys is not empty (a mask of -inf over all of them gives 0 / 0 = NaN).
    __nv_bfloat16* oh = out + ((i64)b * hq + h) * sq * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float sum = l[mt][rr];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int row = w0 + mt * 16 + g + rr * 8, pos = sk - sq + row;
            const int hi = causal ? min(sk - 1, pos) : sk - 1;
            const int lo = window > 0 ? max(0, pos - window + 1) : 0;
            const bool seen = lo <= hi;
            const float inv = 1.0f / sum;
            if (row < sq) {
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    *reinterpret_cast<unsigned*>(oh + (i64)row * D + n * 8 + t * 2) =
                        seen ? kiln_pack_bf16(o[mt][n][2 * rr] * inv, o[mt][n][2 * rr + 1] * inv) : 0u;
            }
        }
}

// Blocks per SM the register budget is fitted to (ptxas sm_90 reports in NOTES.md).
#define MIN_BLOCKS (D == 128 ? 2 : 3)

extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)
KILN_NAME(attention_prefill)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                             i64 ms0, i64 ms1, i64 ms2, i64 ms3, __nv_bfloat16* __restrict__ out,
                             int hq, int hkv, int sq, int sk, float scale, int causal, int window) {
    kiln_prefill<1>(q, k, v, mask, ms0, ms1, ms2, ms3, out, hq, hkv, sq, sk, scale, causal, window);
}

extern "C" __global__ void __launch_bounds__(128, 2)
KILN_NAME(attention_prefill_wide)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                  const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                                  i64 ms0, i64 ms1, i64 ms2, i64 ms3, __nv_bfloat16* __restrict__ out,
                                  int hq, int hkv, int sq, int sk, float scale, int causal, int window) {
    kiln_prefill<2>(q, k, v, mask, ms0, ms1, ms2, ms3, out, hq, hkv, sq, sk, scale, causal, window);
}

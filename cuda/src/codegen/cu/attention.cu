// FlashAttention-2-style prefill for bf16, head dim D (64 or 128), as kiln's `attention` op:
// q[B, Hq, Sq, D], k/v[B, Hkv, Sk, D] contiguous, optional additive mask (bf16) read through
// four element strides over [B, Hq, Sq, Sk] (0 for broadcast axes), out[B, Hq, Sq, D].
// Query i sits at position Sk - Sq + i; causal hides keys j > pos, a window w > 0 also hides
// j <= pos - w. A query with no visible key gives zeros; visible keys all -inf give NaN.
//
// Grid (ceil(Sq / 64), Hq, B), 128 threads: each warp owns 16 query rows, whose Q fragments
// stay in registers. Query blocks run last-first (under a causal mask the last ones have the
// most keys, so the long blocks start first). Keys go through shared memory in tiles of 64,
// loaded with cp.async in the FlashAttention-2 order: V(j) is in flight during S = Q K(j)^T
// and the softmax, K(j+1) during O += P V(j). S and P V use the bf16 tensor cores through
// mma.sync.m16n8k16 (f32 accumulation), their K and V operands read with ldmatrix (.trans for
// V). The softmax is online, in registers, in the log2 domain (scores times scale·log2(e),
// ex2.approx); masks are evaluated only on tiles a mask, the causal diagonal, the window's
// edge or the end of the keys cuts.

#define BR 64
#define BC 64
#define KPAD (D + 8)
#define LOG2E 1.4426950408889634f
// Blocks per SM the register budget is fitted to (ptxas sm_90: d128 ≈ 240 registers, d64 ≈ 164).
#define MIN_BLOCKS (D == 128 ? 2 : 3)

__device__ __forceinline__ void kiln_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned kiln_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned kiln_smem(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void kiln_ldmatrix4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void kiln_ldmatrix4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16 bytes global to shared, bypassing L1; `bytes` = 0 writes zeros and reads nothing.
__device__ __forceinline__ void kiln_cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void kiln_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void kiln_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ float kiln_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Starts copying keys [j0, j0 + BC) of one head (zeros past sk) into a tile.
__device__ __forceinline__ void kiln_load_tile(__nv_bfloat16 (*tile)[KPAD], const __nv_bfloat16* src,
                                               int j0, int sk) {
#pragma unroll
    for (int i = 0; i < BC * D / 8 / 128; ++i) {
        const int e = threadIdx.x + i * 128, row = e / (D / 8), col = (e % (D / 8)) * 8;
        const bool in = j0 + row < sk;
        kiln_cp_async16(kiln_smem(&tile[row][col]), src + (in ? (i64)(j0 + row) * D + col : 0), in ? 16 : 0);
    }
    kiln_cp_async_commit();
}

extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)
KILN_NAME(attention_prefill)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                             i64 ms0, i64 ms1, i64 ms2, i64 ms3, __nv_bfloat16* __restrict__ out,
                             int hq, int hkv, int sq, int sk, float scale, int causal, int window) {
    __shared__ __align__(16) __nv_bfloat16 ks[BC][KPAD];
    __shared__ __align__(16) __nv_bfloat16 vs[BC][KPAD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int hk = h / (hq / hkv);
    const __nv_bfloat16* qh = q + ((i64)b * hq + h) * sq * D;
    const __nv_bfloat16* kh = k + ((i64)b * hkv + hk) * sk * D;
    const __nv_bfloat16* vh = v + ((i64)b * hkv + hk) * sk * D;
    const int w0 = q0 + warp * 16, r0 = w0 + g, r1 = r0 + 8;
    const float sl2 = scale * LOG2E;

    // Key range any row of this block can see.
    const int last_pos = sk - sq + min(q0 + BR, sq) - 1;
    const int kv_end = causal ? min(sk, last_pos + 1) : sk;
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, (sk - sq + q0 - window + 1) / BC * BC);
    if (kv_begin < kv_end) kiln_load_tile(ks, kh, kv_begin, sk);

    // This thread's fragments of its warp's 16 query rows (A operand, row-major).
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + t * 2;
        qa[kk][0] = r0 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r0 * D + c) : 0u;
        qa[kk][1] = r1 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r1 * D + c) : 0u;
        qa[kk][2] = r0 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r0 * D + c + 8) : 0u;
        qa[kk][3] = r1 < sq ? *reinterpret_cast<const unsigned*>(qh + (i64)r1 * D + c + 8) : 0u;
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Row maxima in the log2 domain, and this thread's share of the row sums.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int pos[2] = {sk - sq + r0, sk - sq + r1};
    // Positions of the warp's first and last rows: which tiles need the mask evaluated.
    const int wpos_lo = sk - sq + w0, wpos_hi = wpos_lo + 15;

    // ldmatrix lane addresses: lane l reads row l % 8 of matrix l / 8.
    const int mi = lane >> 3, mr = lane & 7;
    // K (non-transposed): matrix mi = (keys n*8 + 0..7, dims kk*16 + mi*8 + 0..7): b0, b1 of
    // kk and of kk + 1.
    const unsigned k_addr = kiln_smem(&ks[mr][mi * 8]);
    // V (transposed): matrix mi = (keys kk*16 + (mi & 1)*8 + 0..7, dims n*8 + (mi >> 1)*8 + 0..7):
    // b0, b1 of n-tile n and of n + 1.
    const unsigned v_addr = kiln_smem(&vs[(mi & 1) * 8 + mr][(mi >> 1) * 8]);

    for (int j0 = kv_begin; j0 < kv_end; j0 += BC) {
        kiln_cp_async_wait_all();
        __syncthreads();  // K(j) is in; every warp is done with V(j - 1)
        kiln_load_tile(vs, vh, j0, sk);

        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned kb[4];
                kiln_ldmatrix4(kb, k_addr + (unsigned)((n * 8 * KPAD + kk * 16) * 2));
                kiln_mma(s[n], qa[kk], kb[0], kb[1]);
                kiln_mma(s[n], qa[kk + 1], kb[2], kb[3]);
            }
        }
        // Scores to the log2 domain: exp2(s * mul - base). Masked tiles hide invisible keys,
        // add the mask and scale in place (mul = 1); plain tiles keep raw scores, whose
        // maximum times a positive scale is the scaled maximum, and fold the scale into the
        // exponent's FFMA.
        const bool masked = mask != nullptr || j0 + BC > sk || (causal && j0 + BC - 1 > wpos_lo) ||
                            (window > 0 && j0 <= wpos_hi - window) || !(sl2 > 0.0f);
        float tmax[2] = {-INFINITY, -INFINITY}, mul = 1.0f;
        if (masked) {
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int rr = e >> 1, row = rr ? r1 : r0, j = j0 + n * 8 + t * 2 + (e & 1);
                    const bool vis = row < sq && j < sk && (!causal || j <= pos[rr]) &&
                                     (window == 0 || j > pos[rr] - window);
                    float x = -INFINITY;
                    if (vis) {
                        x = s[n][e] * sl2;
                        if (mask) x += LOG2E * __bfloat162float(mask[b * ms0 + h * ms1 + row * ms2 + j * ms3]);
                    }
                    s[n][e] = x;
                    tmax[rr] = fmaxf(tmax[rr], x);
                }
            }
        } else {
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                tmax[0] = fmaxf(tmax[0], fmaxf(s[n][0], s[n][1]));
                tmax[1] = fmaxf(tmax[1], fmaxf(s[n][2], s[n][3]));
            }
            tmax[0] *= sl2;
            tmax[1] *= sl2;
            mul = sl2;
        }
        float alpha[2], base[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            tmax[rr] = fmaxf(tmax[rr], __shfl_xor_sync(0xffffffffu, tmax[rr], 1));
            tmax[rr] = fmaxf(tmax[rr], __shfl_xor_sync(0xffffffffu, tmax[rr], 2));
            const float mn = fmaxf(m[rr], tmax[rr]);
            // With every score so far -inf, subtract 0: the probabilities are exp2(-inf) = 0.
            base[rr] = mn == -INFINITY ? 0.0f : mn;
            alpha[rr] = kiln_ex2(m[rr] - base[rr]);
            m[rr] = mn;
            l[rr] *= alpha[rr];
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = kiln_ex2(fmaf(s[n][e], mul, -base[e >> 1]));
                s[n][e] = p;
                l[e >> 1] += p;
            }
        }
        // Rescale O unless no row's maximum moved (most tiles once the maxima settle).
        if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
                o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
            }
        }

        kiln_cp_async_wait_all();
        __syncthreads();  // V(j) is in; every warp is done with K(j)
        if (j0 + BC < kv_end) kiln_load_tile(ks, kh, j0 + BC, sk);

        // O += P V: P from registers (bf16 A fragments), V through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned pa[4];
            pa[0] = kiln_pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = kiln_pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = kiln_pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = kiln_pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                unsigned vb[4];
                kiln_ldmatrix4_trans(vb, v_addr + (unsigned)((kk * 16 * KPAD + n * 8) * 2));
                kiln_mma(o[n], pa, vb[0], vb[1]);
                kiln_mma(o[n + 1], pa, vb[2], vb[3]);
            }
        }
    }
    // Row sums over the quad, then normalize and store. A row sees some key when its window
    // of visible keys is not empty (a mask of -inf over all of them gives 0 / 0 = NaN).
    float inv[2];
    bool seen[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
        const int hi = causal ? min(sk - 1, pos[rr]) : sk - 1;
        const int lo = window > 0 ? max(0, pos[rr] - window + 1) : 0;
        seen[rr] = lo <= hi;
        inv[rr] = 1.0f / l[rr];
    }
    __nv_bfloat16* oh = out + ((i64)b * hq + h) * sq * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + t * 2;
        if (r0 < sq)
            *reinterpret_cast<unsigned*>(oh + (i64)r0 * D + c) =
                seen[0] ? kiln_pack_bf16(o[n][0] * inv[0], o[n][1] * inv[0]) : 0u;
        if (r1 < sq)
            *reinterpret_cast<unsigned*>(oh + (i64)r1 * D + c) =
                seen[1] ? kiln_pack_bf16(o[n][2] * inv[1], o[n][3] * inv[1]) : 0u;
    }
}

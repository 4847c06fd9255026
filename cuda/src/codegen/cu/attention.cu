// FlashAttention-2-style prefill for bf16, head dim D (64 or 128), as kiln's `attention` op:
// q[B, Hq, Sq, D], k/v[B, Hkv, Sk, D] contiguous, optional additive mask (bf16) read through
// four element strides over [B, Hq, Sq, Sk] (0 for broadcast axes), out[B, Hq, Sq, D].
// Query i sits at position Sk - Sq + i; causal hides keys j > pos, a window w > 0 also hides
// j <= pos - w. A query with no visible key gives zeros; visible keys all -inf give NaN.
//
// Grid (ceil(Sq / 64), Hq, B), 128 threads: each warp owns 16 query rows. Keys go through
// shared memory in tiles of 64; S = Q K^T and O += P V use the bf16 tensor cores through
// mma.sync.m16n8k16 (f32 accumulation); the softmax is online, in registers, per row.

#define BR 64
#define BC 64
#define KPAD (D + 8)

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

__device__ __forceinline__ unsigned kiln_pair(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}

extern "C" __global__ void __launch_bounds__(128)
KILN_NAME(attention_prefill)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                             i64 ms0, i64 ms1, i64 ms2, i64 ms3, __nv_bfloat16* __restrict__ out,
                             int hq, int hkv, int sq, int sk, float scale, int causal, int window) {
    __shared__ __align__(16) __nv_bfloat16 ks[BC][KPAD];
    __shared__ __align__(16) __nv_bfloat16 vs[BC][KPAD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BR;
    const int hk = h / (hq / hkv);
    const __nv_bfloat16* qh = q + ((i64)b * hq + h) * sq * D;
    const __nv_bfloat16* kh = k + ((i64)b * hkv + hk) * sk * D;
    const __nv_bfloat16* vh = v + ((i64)b * hkv + hk) * sk * D;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;

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
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    bool seen[2] = {false, false};
    const int pos[2] = {sk - sq + r0, sk - sq + r1};

    // Key range any row of this block can see.
    const int last_pos = sk - sq + min(q0 + BR, sq) - 1;
    const int kv_end = causal ? min(sk, last_pos + 1) : sk;
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, (sk - sq + q0 - window + 1) / BC * BC);

    for (int j0 = kv_begin; j0 < kv_end; j0 += BC) {
        __syncthreads();
        for (int e = threadIdx.x; e < BC * D / 8; e += blockDim.x) {
            const int row = e / (D / 8), col = (e % (D / 8)) * 8;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (j0 + row < sk) {
                kv4 = *reinterpret_cast<const uint4*>(kh + (i64)(j0 + row) * D + col);
                vv4 = *reinterpret_cast<const uint4*>(vh + (i64)(j0 + row) * D + col);
            }
            *reinterpret_cast<uint4*>(&ks[row][col]) = kv4;
            *reinterpret_cast<uint4*>(&vs[row][col]) = vv4;
        }
        __syncthreads();

        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned b0 = *reinterpret_cast<const unsigned*>(&ks[n * 8 + g][kk * 16 + t * 2]);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(&ks[n * 8 + g][kk * 16 + t * 2 + 8]);
                kiln_mma(s[n], qa[kk], b0, b1);
            }
        }
        // Scale, mask, and the tile's row maxima.
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = e >> 1, row = rr ? r1 : r0, j = j0 + n * 8 + t * 2 + (e & 1);
                const bool vis = row < sq && j < sk && (!causal || j <= pos[rr]) &&
                                 (window == 0 || j > pos[rr] - window);
                float x = -INFINITY;
                if (vis) {
                    seen[rr] = true;
                    x = s[n][e] * scale;
                    if (mask) x += __bfloat162float(mask[b * ms0 + h * ms1 + row * ms2 + j * ms3]);
                }
                s[n][e] = x;
                tmax[rr] = fmaxf(tmax[rr], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            tmax[rr] = fmaxf(tmax[rr], __shfl_xor_sync(0xffffffffu, tmax[rr], 1));
            tmax[rr] = fmaxf(tmax[rr], __shfl_xor_sync(0xffffffffu, tmax[rr], 2));
            const float mn = fmaxf(m[rr], tmax[rr]);
            alpha[rr] = mn == -INFINITY ? 1.0f : expf(m[rr] - mn);
            m[rr] = mn;
            l[rr] *= alpha[rr];
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = e >> 1;
                const float p = m[rr] == -INFINITY ? 0.0f : expf(s[n][e] - m[rr]);
                s[n][e] = p;
                l[rr] += p;
            }
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
            o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
        }
        // O += P V: P from registers (bf16 A fragments), V from shared memory.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned pa[4];
            pa[0] = kiln_pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = kiln_pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = kiln_pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = kiln_pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int kr = kk * 16 + t * 2;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int c = n * 8 + g;
                const unsigned b0 = kiln_pair(vs[kr][c], vs[kr + 1][c]);
                const unsigned b1 = kiln_pair(vs[kr + 8][c], vs[kr + 9][c]);
                kiln_mma(o[n], pa, b0, b1);
            }
        }
    }
    // Row sums over the quad, then normalize and store.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
        seen[rr] = __shfl_xor_sync(0xffffffffu, (int)seen[rr], 1) | seen[rr];
        seen[rr] = __shfl_xor_sync(0xffffffffu, (int)seen[rr], 2) | seen[rr];
    }
    __nv_bfloat16* oh = out + ((i64)b * hq + h) * sq * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + t * 2;
        if (r0 < sq) {
            const float inv = seen[0] ? 1.0f / l[0] : 0.0f;
            const float x0 = seen[0] ? o[n][0] * inv : 0.0f, x1 = seen[0] ? o[n][1] * inv : 0.0f;
            *reinterpret_cast<unsigned*>(oh + (i64)r0 * D + c) = kiln_pack_bf16(x0, x1);
        }
        if (r1 < sq) {
            const float inv = seen[1] ? 1.0f / l[1] : 0.0f;
            const float x0 = seen[1] ? o[n][2] * inv : 0.0f, x1 = seen[1] ? o[n][3] * inv : 0.0f;
            *reinterpret_cast<unsigned*>(oh + (i64)r1 * D + c) = kiln_pack_bf16(x0, x1);
        }
    }
}

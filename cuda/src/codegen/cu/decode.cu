// Split-KV flash decoding for bf16, head dim D (64 or 128): one query per head (Sq = 1, at
// position Sk - 1, so causal hides nothing), q[B, Hq, 1, D], k/v[B, Hkv, Sk, D] contiguous,
// optional additive bf16 mask read through strides (b, h, key) over [B, Hq, 1, Sk], a sliding
// window w > 0 hides keys j <= Sk - 1 - w; out[B, Hq, 1, D]. Same semantics as the prefill kernel.
//
// Pass 1, grid (splits, Hkv * ceil(G / HG), B) with G = Hq / Hkv query heads per KV head,
// 128 threads: a block takes up to HG query heads of one KV group (so K and V are read once
// for all of them) over one contiguous chunk of keys, in tiles of TK keys copied to shared
// memory with cp.async (16-byte pieces). Per tile: scores (one thread per key and head, 16-byte
// shared reads), an online softmax in the log2 domain (one warp per head), then O += P V with
// each thread owning 8 dims of every head over a strided subset of the keys. The block writes
// its unnormalized output (f32) and (max in log2 units, sum, seen) per head to the workspace.
// Pass 2, grid (Hq, B), D threads: merges the splits.

// HG (query heads per block, one warp each) and TK (keys per tile) come from the module's
// defines (codegen::DECODE_HEADS, DECODE_TILE): the layout below needs HG = 4 and TK = 64.
#define VPAD (D + 8)
__device__ __forceinline__ float kiln_bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float kiln_bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

extern "C" __global__ void __launch_bounds__(128)
KILN_NAME(attention_decode_split)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                  const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                                  i64 ms0, i64 ms1, i64 ms3, float* __restrict__ part_o,
                                  float* __restrict__ part_ml, int hq, int hkv, int sk, int chunk,
                                  float scale, int window) {
    __shared__ __align__(16) __nv_bfloat16 ks[TK][VPAD];
    __shared__ __align__(16) __nv_bfloat16 vs[TK][VPAD];
    __shared__ __align__(16) float qs[HG][D];
    __shared__ float ps[HG][TK];
    __shared__ float al[HG];
    __shared__ __align__(16) float red[4][HG][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, b = blockIdx.z, splits = gridDim.x;
    const int g = hq / hkv, groups = (g + HG - 1) / HG;
    const int hk = blockIdx.y / groups, h0 = hk * g + (blockIdx.y % groups) * HG;
    const int gh = min(HG, hk * g + g - h0);
    const __nv_bfloat16* kh = k + ((i64)b * hkv + hk) * sk * D;
    const __nv_bfloat16* vh = v + ((i64)b * hkv + hk) * sk * D;
    const int c0 = split * chunk, c1 = min(sk, c0 + chunk);
    const int lo = window > 0 ? max(0, sk - window) : 0;  // first visible key

    for (int p = threadIdx.x; p < HG * D; p += 128) {
        const int hh = p / D;
        qs[hh][p % D] = hh < gh ? __bfloat162float(q[((i64)b * hq + h0 + hh) * D + p % D]) * scale * LOG2E : 0.0f;
    }
    // The softmax state of head `warp` (uniform over the warp's lanes).
    float m = -INFINITY, l = 0.0f;
    // PV: this thread's 8 dims (c * 8 ...) of every head, over keys kl, kl + KL, ...
    const int c = threadIdx.x % (D / 8), kl = threadIdx.x / (D / 8);
    const int KL = 128 / (D / 8);
    float acc[HG][8];
#pragma unroll
    for (int hh = 0; hh < HG; ++hh)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[hh][e] = 0.0f;

    for (int t0 = c0; t0 < c1; t0 += TK) {
        __syncthreads();  // the previous tile is consumed
#pragma unroll
        for (int i = 0; i < TK * D / 8 / 128; ++i) {
            const int e = threadIdx.x + i * 128, row = e / (D / 8), col = (e % (D / 8)) * 8;
            const bool in = t0 + row < sk;
            const i64 off = in ? (i64)(t0 + row) * D + col : 0;
            kiln_cp_async16(kiln_smem(&ks[row][col]), kh + off, in ? 16 : 0);
            kiln_cp_async16(kiln_smem(&vs[row][col]), vh + off, in ? 16 : 0);
        }
        kiln_cp_async_commit();
        kiln_cp_async_wait_all();
        __syncthreads();
        // Scores (log2 units): thread p covers key p % TK of head p / TK.
#pragma unroll
        for (int i = 0; i < HG * TK / 128; ++i) {
            const int p = threadIdx.x + i * 128, hh = p / TK, key = p % TK, j = t0 + key;
            if (hh >= gh) continue;
            float x = -INFINITY;
            if (j < c1 && j >= lo) {
                x = 0.0f;
#pragma unroll
                for (int cc = 0; cc < D / 8; ++cc) {
                    const uint4 kv = *reinterpret_cast<const uint4*>(&ks[key][cc * 8]);
                    const float4 qa = *reinterpret_cast<const float4*>(&qs[hh][cc * 8]);
                    const float4 qb = *reinterpret_cast<const float4*>(&qs[hh][cc * 8 + 4]);
                    x += qa.x * kiln_bf16_lo(kv.x) + qa.y * kiln_bf16_hi(kv.x) + qa.z * kiln_bf16_lo(kv.y) +
                         qa.w * kiln_bf16_hi(kv.y) + qb.x * kiln_bf16_lo(kv.z) + qb.y * kiln_bf16_hi(kv.z) +
                         qb.z * kiln_bf16_lo(kv.w) + qb.w * kiln_bf16_hi(kv.w);
                }
                if (mask) x += LOG2E * __bfloat162float(mask[b * ms0 + (h0 + hh) * ms1 + j * ms3]);
            }
            ps[hh][key] = x;
        }
        __syncthreads();
        // Online softmax of head `warp` over the tile: probabilities in place, rescale factor.
        if (warp < gh) {
            const float x0 = ps[warp][lane], x1 = ps[warp][lane + 32];
            float tmax = fmaxf(x0, x1);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
            const float mn = fmaxf(m, tmax), base = mn == -INFINITY ? 0.0f : mn;
            const float p0 = kiln_ex2(x0 - base), p1 = kiln_ex2(x1 - base);
            ps[warp][lane] = p0;
            ps[warp][lane + 32] = p1;
            float sum = p0 + p1;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            const float alpha = kiln_ex2(m - base);
            l = l * alpha + sum;
            m = mn;
            if (lane == 0) al[warp] = alpha;
        }
        __syncthreads();
#pragma unroll
        for (int hh = 0; hh < HG; ++hh) {
            const float a = hh < gh ? al[hh] : 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[hh][e] *= a;
        }
        for (int key = kl; key < TK; key += KL) {
            const uint4 vv = *reinterpret_cast<const uint4*>(&vs[key][c * 8]);
            const float vf[8] = {kiln_bf16_lo(vv.x), kiln_bf16_hi(vv.x), kiln_bf16_lo(vv.y), kiln_bf16_hi(vv.y),
                                 kiln_bf16_lo(vv.z), kiln_bf16_hi(vv.z), kiln_bf16_lo(vv.w), kiln_bf16_hi(vv.w)};
#pragma unroll
            for (int hh = 0; hh < HG; ++hh) {
                const float p = hh < gh ? ps[hh][key] : 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[hh][e] += p * vf[e];
            }
        }
    }
    // Sum the key lanes: within the warp by shuffles, across the 4 warps in shared memory.
#pragma unroll
    for (int o = D / 8; o < 32; o <<= 1)
#pragma unroll
        for (int hh = 0; hh < HG; ++hh)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], o);
    if (lane < D / 8) {
#pragma unroll
        for (int hh = 0; hh < HG; ++hh)
#pragma unroll
            for (int e = 0; e < 8; ++e) red[warp][hh][c * 8 + e] = acc[hh][e];
    }
    __syncthreads();
    for (int p = threadIdx.x; p < gh * D; p += 128) {
        const int hh = p / D, d = p % D;
        const i64 slot = ((i64)b * hq + h0 + hh) * splits + split;
        part_o[slot * D + d] = red[0][hh][d] + red[1][hh][d] + red[2][hh][d] + red[3][hh][d];
    }
    if (warp < gh && lane == 0) {
        const i64 slot = ((i64)b * hq + h0 + warp) * splits + split;
        part_ml[slot * 3] = m;
        part_ml[slot * 3 + 1] = l;
        part_ml[slot * 3 + 2] = max(c0, lo) < c1 ? 1.0f : 0.0f;  // some key of the chunk is visible
    }
}

extern "C" __global__ void KILN_NAME(attention_decode_combine)(const float* __restrict__ part_o,
                                                               const float* __restrict__ part_ml,
                                                               __nv_bfloat16* __restrict__ out, int hq,
                                                               int splits) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const i64 base = ((i64)b * hq + h) * splits;
    float mm = -INFINITY, seen = 0.0f;
    // Unrolled: the loads of 8 splits in flight at once.
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
        mm = fmaxf(mm, part_ml[(base + s) * 3]);
        seen = fmaxf(seen, part_ml[(base + s) * 3 + 2]);
    }
    float ls = 0.0f, od = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
        // Splits that saw no finite score add nothing (loads unconditional, to pipeline).
        const float ms = part_ml[(base + s) * 3], ps = part_ml[(base + s) * 3 + 1];
        const float os = part_o[(base + s) * D + d], w = exp2f(ms - mm);
        ls += ms == -INFINITY ? 0.0f : ps * w;
        od += ms == -INFINITY ? 0.0f : os * w;
    }
    out[((i64)b * hq + h) * D + d] = __float2bfloat16_rn(seen > 0.0f ? od / ls : 0.0f);
}

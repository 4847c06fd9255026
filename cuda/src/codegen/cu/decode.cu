// Split-KV flash decoding for bf16, head dim D (64 or 128): one query per head (Sq = 1, at
// position Sk - 1, so causal hides nothing), q[B, Hq, 1, D], k/v[B, Hkv, Sk, D] contiguous,
// optional additive bf16 mask read through strides (b, h, key) over [B, Hq, 1, Sk], a sliding
// window w > 0 hides keys j <= Sk - 1 - w; out[B, Hq, 1, D]. Same semantics as the prefill kernel.
//
// Pass 1, grid (splits, Hq, B), 128 threads: each split handles a contiguous chunk of keys,
// each warp every 4th key of it with the query spread over the lanes (D / 32 values each),
// keeping an online softmax; the 4 warps merge in shared memory and write the split's
// (max, sum, seen) and unnormalized output (f32) to the workspace.
// Pass 2, grid (Hq, B), D threads: merges the splits.

#define DL (D / 32)

extern "C" __global__ void __launch_bounds__(128)
KILN_NAME(attention_decode_split)(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                  const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ mask,
                                  i64 ms0, i64 ms1, i64 ms3, float* __restrict__ part_o,
                                  float* __restrict__ part_ml, int hq, int hkv, int sk, int chunk,
                                  float scale, int window) {
    __shared__ float wm[4], wl[4], wseen[4];
    __shared__ float wo[4][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int hk = h / (hq / hkv);
    const __nv_bfloat16* qh = q + ((i64)b * hq + h) * D;
    const __nv_bfloat16* kh = k + ((i64)b * hkv + hk) * sk * D;
    const __nv_bfloat16* vh = v + ((i64)b * hkv + hk) * sk * D;
    float qv[DL], acc[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) { qv[i] = __bfloat162float(qh[lane * DL + i]) * scale; acc[i] = 0.0f; }
    float m = -INFINITY, l = 0.0f;
    bool seen = false;
    const int pos = sk - 1;
    const int begin = split * chunk, end = min(sk, begin + chunk);
    for (int j = begin + warp; j < end; j += 4) {
        if (window > 0 && j <= pos - window) continue;
        seen = true;
        const __nv_bfloat16* kr = kh + (i64)j * D + lane * DL;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) dot += qv[i] * __bfloat162float(kr[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (mask) dot += __bfloat162float(mask[b * ms0 + h * ms1 + j * ms3]);
        const float mn = fmaxf(m, dot);
        if (mn == -INFINITY) continue;
        const float alpha = expf(m - mn), p = expf(dot - mn);
        const __nv_bfloat16* vr = vh + (i64)j * D + lane * DL;
        l = l * alpha + p;
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[i] = acc[i] * alpha + p * __bfloat162float(vr[i]);
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; wseen[warp] = seen ? 1.0f : 0.0f; }
#pragma unroll
    for (int i = 0; i < DL; ++i) wo[warp][lane * DL + i] = acc[i];
    __syncthreads();
    float mm = -INFINITY;
    for (int w = 0; w < 4; ++w) mm = fmaxf(mm, wm[w]);
    const i64 slot = (((i64)b * hq + h) * splits + split);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float od = 0.0f;
        for (int w = 0; w < 4; ++w) if (wm[w] != -INFINITY) od += wo[w][d] * expf(wm[w] - mm);
        part_o[slot * D + d] = od;
    }
    if (threadIdx.x == 0) {
        float ls = 0.0f, sn = 0.0f;
        for (int w = 0; w < 4; ++w) {
            if (wm[w] != -INFINITY) ls += wl[w] * expf(wm[w] - mm);
            sn = fmaxf(sn, wseen[w]);
        }
        part_ml[slot * 3] = mm;
        part_ml[slot * 3 + 1] = ls;
        part_ml[slot * 3 + 2] = sn;
    }
}

extern "C" __global__ void KILN_NAME(attention_decode_combine)(const float* __restrict__ part_o,
                                                               const float* __restrict__ part_ml,
                                                               __nv_bfloat16* __restrict__ out, int hq,
                                                               int splits) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const i64 base = ((i64)b * hq + h) * splits;
    float mm = -INFINITY, seen = 0.0f;
    for (int s = 0; s < splits; ++s) {
        mm = fmaxf(mm, part_ml[(base + s) * 3]);
        seen = fmaxf(seen, part_ml[(base + s) * 3 + 2]);
    }
    float ls = 0.0f, od = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = part_ml[(base + s) * 3];
        if (ms == -INFINITY) continue;
        const float w = expf(ms - mm);
        ls += part_ml[(base + s) * 3 + 1] * w;
        od += part_o[(base + s) * D + d] * w;
    }
    out[((i64)b * hq + h) * D + d] = __float2bfloat16_rn(seen > 0.0f ? od / ls : 0.0f);
}

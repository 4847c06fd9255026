// Decode GEMV: y[n] = scale * sum_k W[n, k] * x[k] for W[N, K] of storage type W_T (bf16, or
// fp8 e4m3 with a per-tensor scale), x f32, y f32. One warp per output row, 16-byte loads of
// W (VEC elements), GEMV_LOADS of them in flight per lane, when K is a multiple of VEC (and W
// and x are 16-byte aligned: the launcher's buffers are), a scalar loop otherwise. 256 threads
// per block.

#define ROWS_PER_BLOCK 8
#define GEMV_LOADS 4

// 16 bytes of weights, read once: streamed past L1 (ld.global.cs: evict first).
__device__ __forceinline__ uint4 ldg_stream(const W_T* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// The dot product of the VEC weights in `raw` with x[0..VEC).
__device__ __forceinline__ float kiln_dot16(const uint4& raw, const float* x) {
    const W_T* e = reinterpret_cast<const W_T*>(&raw);
    const float4* xv = reinterpret_cast<const float4*>(x);
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
        const float4 xx = xv[i];
        acc += kiln_f(e[4 * i]) * xx.x + kiln_f(e[4 * i + 1]) * xx.y + kiln_f(e[4 * i + 2]) * xx.z +
               kiln_f(e[4 * i + 3]) * xx.w;
    }
    return acc;
}

extern "C" __global__ void __launch_bounds__(256)
KILN_NAME(gemv)(const W_T* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                int n_rows, int k, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS_PER_BLOCK + warp;
    if (row >= n_rows) return;
    const W_T* wr = w + (i64)row * k;
    float acc = 0.0f;
    if (k % VEC == 0) {
        // GEMV_LOADS 16-byte weight loads in flight per lane, then their dot products.
        int c = lane * VEC;
        for (; c + (GEMV_LOADS - 1) * 32 * VEC < k; c += GEMV_LOADS * 32 * VEC) {
            uint4 raw[GEMV_LOADS];
#pragma unroll
            for (int u = 0; u < GEMV_LOADS; ++u) raw[u] = ldg_stream(wr + c + u * 32 * VEC);
#pragma unroll
            for (int u = 0; u < GEMV_LOADS; ++u) acc += kiln_dot16(raw[u], x + c + u * 32 * VEC);
        }
        for (; c < k; c += 32 * VEC) acc += kiln_dot16(ldg_stream(wr + c), x + c);
    } else {
        for (int c = lane; c < k; c += 32) acc += kiln_f(wr[c]) * x[c];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = acc * scale;
}

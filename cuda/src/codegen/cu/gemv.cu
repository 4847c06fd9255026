// Decode GEMV: y[n] = scale * sum_k W[n, k] * x[k] for W[N, K] of storage type W_T (bf16, or
// fp8 e4m3 with a per-tensor scale), x f32, y f32. One warp per output row, 16-byte loads of
// W (VEC elements) when K is a multiple of VEC, a scalar loop otherwise. 256 threads per block.

#define ROWS_PER_BLOCK 8

extern "C" __global__ void __launch_bounds__(256)
KILN_NAME(gemv)(const W_T* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                int n_rows, int k, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS_PER_BLOCK + warp;
    if (row >= n_rows) return;
    const W_T* wr = w + (i64)row * k;
    float acc = 0.0f;
    if (k % VEC == 0) {
        for (int c = lane * VEC; c < k; c += 32 * VEC) {
            const uint4 raw = *reinterpret_cast<const uint4*>(wr + c);
            const W_T* e = reinterpret_cast<const W_T*>(&raw);
            const float4* xv = reinterpret_cast<const float4*>(x + c);
#pragma unroll
            for (int i = 0; i < VEC / 4; ++i) {
                const float4 xx = xv[i];
                acc += kiln_f(e[4 * i]) * xx.x + kiln_f(e[4 * i + 1]) * xx.y +
                       kiln_f(e[4 * i + 2]) * xx.z + kiln_f(e[4 * i + 3]) * xx.w;
            }
        }
    } else {
        for (int c = lane; c < k; c += 32) acc += kiln_f(wr[c]) * x[c];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = acc * scale;
}

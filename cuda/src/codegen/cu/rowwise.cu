// Row-wise kernels over the last axis, one block per row: rmsnorm, layernorm, softmax.
// T is the storage type; statistics and arithmetic are f32.

extern "C" __global__ void KILN_NAME(rmsnorm)(const T* __restrict__ x, const T* __restrict__ w,
                                              T* __restrict__ y, int n, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * n;
    T* yr = y + (i64)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float v = kiln_f(xr[i]); ss += v * v; }
    ss = kiln_block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = kiln_from_f<T>(kiln_f(xr[i]) * r * kiln_f(w[i]));
}

extern "C" __global__ void KILN_NAME(layernorm)(const T* __restrict__ x, const T* __restrict__ w,
                                                const T* __restrict__ b, T* __restrict__ y, int n,
                                                float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * n;
    T* yr = y + (i64)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += kiln_f(xr[i]);
    const float mean = kiln_block_sum(s, scratch) / (float)n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = kiln_f(xr[i]) - mean; ss += d * d; }
    const float r = 1.0f / sqrtf(kiln_block_sum(ss, scratch) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = kiln_from_f<T>((kiln_f(xr[i]) - mean) * r * kiln_f(w[i]) + kiln_f(b[i]));
}

extern "C" __global__ void KILN_NAME(softmax)(const T* __restrict__ x, T* __restrict__ y, int n) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * n;
    T* yr = y + (i64)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = kiln_max_nan(m, kiln_f(xr[i]));
    m = kiln_block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(kiln_f(xr[i]) - m);
    s = kiln_block_sum(s, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = kiln_from_f<T>(expf(kiln_f(xr[i]) - m) / s);
}

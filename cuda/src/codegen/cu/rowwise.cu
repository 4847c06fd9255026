// Row-wise kernels over the last axis, one block per row: rmsnorm, layernorm, softmax.
// T is the storage type; statistics and arithmetic are f32.
//
// Fast path (a uniform branch): when the row length is a multiple of a 16-byte vector (RV
// elements), the buffers are 16-byte aligned and the row fits in ROW_R (defined by the
// launcher's module, codegen::ROW_VECTORS) vectors per thread,
// each thread loads its ROW_R vectors (threadIdx.x + i * blockDim.x) at once, keeps them in
// registers for every pass, and stores 16-byte vectors: the row is read once and written once.
// Otherwise a scalar grid-stride loop over the row, re-reading it per pass.

#define RV ((int)(16 / sizeof(T)))

// Element e (< RV) of a 16-byte vector of T, as f32.
__device__ __forceinline__ float kiln_lane(const uint4& v, int e) {
    return kiln_f(reinterpret_cast<const T*>(&v)[e]);
}

__device__ __forceinline__ void kiln_set_lane(uint4& v, int e, float x) {
    reinterpret_cast<T*>(&v)[e] = kiln_from_f<T>(x);
}

// Loads this thread's vectors of a row (zeros past its end); true if the fast path applies.
__device__ __forceinline__ bool kiln_row_load(const T* xr, int n, bool aligned, uint4 (&v)[ROW_R]) {
    const int nv = n / RV;
    if (!aligned || n % RV != 0 || nv > ROW_R * (int)blockDim.x) return false;
    const uint4* x4 = reinterpret_cast<const uint4*>(xr);
#pragma unroll
    for (int i = 0; i < ROW_R; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        v[i] = j < nv ? x4[j] : make_uint4(0, 0, 0, 0);
    }
    return true;
}

extern "C" __global__ void KILN_NAME(rmsnorm)(const T* __restrict__ x, const T* __restrict__ w,
                                              T* __restrict__ y, int n, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * n;
    T* yr = y + (i64)blockIdx.x * n;
    uint4 v[ROW_R];
    if (kiln_row_load(xr, n, kiln_aligned16(x) && kiln_aligned16(w) && kiln_aligned16(y), v)) {
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i)
#pragma unroll
            for (int e = 0; e < RV; ++e) { const float a = kiln_lane(v[i], e); ss += a * a; }
        const float r = 1.0f / sqrtf(kiln_block_sum(ss, scratch) / (float)n + eps);
        const int nv = n / RV;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j >= nv) break;
            const uint4 wv = reinterpret_cast<const uint4*>(w)[j];
            uint4 o;
#pragma unroll
            for (int e = 0; e < RV; ++e) kiln_set_lane(o, e, kiln_lane(v[i], e) * r * kiln_lane(wv, e));
            reinterpret_cast<uint4*>(yr)[j] = o;
        }
        return;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float a = kiln_f(xr[i]); ss += a * a; }
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
    uint4 v[ROW_R];
    const bool aligned = kiln_aligned16(x) && kiln_aligned16(w) && kiln_aligned16(b) && kiln_aligned16(y);
    if (kiln_row_load(xr, n, aligned, v)) {
        const int nv = n / RV;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i)
#pragma unroll
            for (int e = 0; e < RV; ++e) s += kiln_lane(v[i], e);
        const float mean = kiln_block_sum(s, scratch) / (float)n;
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            if ((int)threadIdx.x + i * (int)blockDim.x >= nv) break;
#pragma unroll
            for (int e = 0; e < RV; ++e) { const float d = kiln_lane(v[i], e) - mean; ss += d * d; }
        }
        const float r = 1.0f / sqrtf(kiln_block_sum(ss, scratch) / (float)n + eps);
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j >= nv) break;
            const uint4 wv = reinterpret_cast<const uint4*>(w)[j], bv = reinterpret_cast<const uint4*>(b)[j];
            uint4 o;
#pragma unroll
            for (int e = 0; e < RV; ++e)
                kiln_set_lane(o, e, (kiln_lane(v[i], e) - mean) * r * kiln_lane(wv, e) + kiln_lane(bv, e));
            reinterpret_cast<uint4*>(yr)[j] = o;
        }
        return;
    }
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
    uint4 v[ROW_R];
    if (kiln_row_load(xr, n, kiln_aligned16(x) && kiln_aligned16(y), v)) {
        const int nv = n / RV;
        float m = -INFINITY;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            if ((int)threadIdx.x + i * (int)blockDim.x >= nv) break;
#pragma unroll
            for (int e = 0; e < RV; ++e) m = kiln_max_nan(m, kiln_lane(v[i], e));
        }
        m = kiln_block_max(m, scratch);
        float p[ROW_R][RV];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            const bool in = (int)threadIdx.x + i * (int)blockDim.x < nv;
#pragma unroll
            for (int e = 0; e < RV; ++e) {
                p[i][e] = in ? expf(kiln_lane(v[i], e) - m) : 0.0f;
                s += p[i][e];
            }
        }
        s = kiln_block_sum(s, scratch);
#pragma unroll
        for (int i = 0; i < ROW_R; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j >= nv) break;
            uint4 o;
#pragma unroll
            for (int e = 0; e < RV; ++e) kiln_set_lane(o, e, p[i][e] / s);
            reinterpret_cast<uint4*>(yr)[j] = o;
        }
        return;
    }
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = kiln_max_nan(m, kiln_f(xr[i]));
    m = kiln_block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(kiln_f(xr[i]) - m);
    s = kiln_block_sum(s, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = kiln_from_f<T>(expf(kiln_f(xr[i]) - m) / s);
}

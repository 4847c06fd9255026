// Greedy sampling on the device: out[r] = argmax of row r of x[rows, n] (first index on
// ties, NaN larger than everything, as torch.argmax). One block per row.

__device__ __forceinline__ bool kiln_arg_better(float a, int ia, float b, int ib) {
    const bool na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    return a > b || (a == b && ia < ib);
}

extern "C" __global__ void KILN_NAME(argmax)(const T* __restrict__ x, i64* __restrict__ out, int n) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const T* xr = x + (i64)blockIdx.x * n;
    float best = -INFINITY;
    int bi = n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = kiln_f(xr[i]);
        if (bi == n || kiln_arg_better(v, i, best, bi)) { best = v; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (i < n && (bi == n || kiln_arg_better(v, i, best, bi))) { best = v; bi = i; }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        best = lane < warps ? sv[lane] : -INFINITY;
        bi = lane < warps ? si[lane] : n;
        for (int o = 16; o > 0; o >>= 1) {
            const float v = __shfl_xor_sync(0xffffffffu, best, o);
            const int i = __shfl_xor_sync(0xffffffffu, bi, o);
            if (i < n && (bi == n || kiln_arg_better(v, i, best, bi))) { best = v; bi = i; }
        }
        if (lane == 0) out[blockIdx.x] = bi;
    }
}

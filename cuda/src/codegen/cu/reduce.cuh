// Block-wide reductions. Sum of `v` over the block (blockDim.x a multiple of 32, at most
// 1024); every thread gets it.
__device__ __forceinline__ float kiln_block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Maximum of `v` over the block, NaN if any is NaN.
__device__ __forceinline__ float kiln_block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = kiln_max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) t = kiln_max_nan(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}


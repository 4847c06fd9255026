// kiln CUDA prelude: storage types, conversions and reductions shared by every kernel.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if KILN_FP8
#include <cuda_fp8.h>
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ float kiln_f(float x) { return x; }
__device__ __forceinline__ float kiln_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float kiln_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename U> __device__ __forceinline__ U kiln_from_f(float x);
template <> __device__ __forceinline__ float kiln_from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half kiln_from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 kiln_from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#if KILN_FP8
__device__ __forceinline__ float kiln_f(__nv_fp8_e4m3 x) { return float(x); }
__device__ __forceinline__ float kiln_f(__nv_fp8_e5m2 x) { return float(x); }
template <> __device__ __forceinline__ __nv_fp8_e4m3 kiln_from_f<__nv_fp8_e4m3>(float x) {
    __nv_fp8_e4m3 r; r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); return r;
}
template <> __device__ __forceinline__ __nv_fp8_e5m2 kiln_from_f<__nv_fp8_e5m2>(float x) {
    __nv_fp8_e5m2 r; r.__x = __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E5M2); return r;
}
#endif

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
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
__device__ __forceinline__ float kiln_max_nan(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b); }
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

// Rounding of an f32 value to a narrower float format, returned as f32 (fused elementwise
// nodes hold every float value as f32 rounded to the node's dtype).
__device__ __forceinline__ float kiln_rnd_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float kiln_rnd_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
#if KILN_FP8
__device__ __forceinline__ float kiln_rnd_e4m3(float x) { return kiln_f(kiln_from_f<__nv_fp8_e4m3>(x)); }
__device__ __forceinline__ float kiln_rnd_e5m2(float x) { return kiln_f(kiln_from_f<__nv_fp8_e5m2>(x)); }
#endif
__device__ __forceinline__ float kiln_min_nan(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fminf(a, b); }
// Float to integer as kiln's cast: truncate toward zero, NaN to 0, saturate to i64.
__device__ __forceinline__ i64 kiln_f2i(double x) {
    if (x != x) return 0;
    if (x >= 9223372036854775808.0) return (i64)0x7fffffffffffffffULL;
    if (x <= -9223372036854775808.0) return (i64)0x8000000000000000ULL;
    return (i64)x;
}
// Wrapping integer division; division by zero sets *err and gives 0.
__device__ __forceinline__ i64 kiln_idiv(i64 a, i64 b, int* err) {
    if (b == 0) { atomicExch(err, 1); return 0; }
    if (b == -1) return (i64)(0ULL - (u64)a);
    return a / b;
}
__device__ __forceinline__ double kiln_gelu(double x) { return 0.5 * x * (1.0 + erf(x / 1.4142135623730951)); }
__device__ __forceinline__ double kiln_gelu_tanh(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

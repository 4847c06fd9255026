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

// Rounding of an f32 value to a narrower float format, returned as f32 (fused elementwise
// nodes hold every float value as f32 rounded to the node's dtype).
__device__ __forceinline__ float kiln_rnd_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float kiln_rnd_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
#if KILN_FP8
__device__ __forceinline__ float kiln_rnd_e4m3(float x) { return kiln_f(kiln_from_f<__nv_fp8_e4m3>(x)); }
__device__ __forceinline__ float kiln_rnd_e5m2(float x) { return kiln_f(kiln_from_f<__nv_fp8_e5m2>(x)); }
#endif

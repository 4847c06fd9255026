// Host stand-ins for what generated elementwise kernels use from CUDA, so that
// tests/host_codegen.rs can run the generated text on the CPU: one "thread" whose grid-stride
// loop covers every element, f16 through the compiler's _Float16 and bf16 by round-to-nearest-
// even on the f32 bits (the same rounding as __float2bfloat16_rn).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdio.h>
#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__
typedef long long i64;
typedef unsigned long long u64;
struct KilnDim3 { unsigned x; };
static const KilnDim3 blockIdx{0}, threadIdx{0}, blockDim{1}, gridDim{1};
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float kiln_f(float x) { return x; }
inline float kiln_f(__half h) { return (float)h.v; }
inline float kiln_f(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16; float f; memcpy(&f, &u, 4); return f;
}
template <typename U> U kiln_from_f(float x);
template <> inline float kiln_from_f<float>(float x) { return x; }
template <> inline __half kiln_from_f<__half>(float x) { return __half{(_Float16)x}; }
template <> inline __nv_bfloat16 kiln_from_f<__nv_bfloat16>(float x) {
    uint32_t u; memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float kiln_rnd_f16(float x) { return kiln_f(kiln_from_f<__half>(x)); }
inline float kiln_rnd_bf16(float x) { return kiln_f(kiln_from_f<__nv_bfloat16>(x)); }

// kiln's scalar helpers, valid in host code too (tests/host_codegen.rs runs generated kernels
// on the CPU with them).
__device__ __forceinline__ float kiln_max_nan(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b); }
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
// Whether a pointer allows 16-byte vector access.
__device__ __forceinline__ bool kiln_aligned16(const void* p) { return ((u64)p & 15) == 0; }
// N consecutive elements, moved as one access of up to 16 bytes (several for wider element
// types): the unit of work of a generated elementwise kernel's vector path.
template <typename U, int N> struct alignas(sizeof(U) * N < 16 ? sizeof(U) * N : 16) kiln_pack {
    U v[N];
};
// `fast`, an f32 value within 2^-16 (relative) of an exact result, rounded to bf16 / f16 when
// every value that close rounds alike (so the exact result does too); otherwise `exact()`, the
// f64 evaluation as f32, rounded. Normal magnitudes only (2^-96 ≤ |fast| < 2^120); NaN and
// values outside take `exact()`.
__device__ __forceinline__ bool kiln_sure_range(float fast) {
    const float m = fabsf(fast);
    return m >= 0x1p-96f && m < 0x1p+120f;
}
template <typename F> __device__ __forceinline__ float kiln_narrow_bf16(float fast, F exact) {
    const float e = fabsf(fast) * 0x1p-16f;
    return kiln_sure_range(fast) && kiln_rnd_bf16(fast - e) == kiln_rnd_bf16(fast + e)
               ? kiln_rnd_bf16(fast)
               : kiln_rnd_bf16(exact());
}
template <typename F> __device__ __forceinline__ float kiln_narrow_f16(float fast, F exact) {
    const float e = fabsf(fast) * 0x1p-16f;
    return kiln_sure_range(fast) && kiln_rnd_f16(fast - e) == kiln_rnd_f16(fast + e)
               ? kiln_rnd_f16(fast)
               : kiln_rnd_f16(exact());
}

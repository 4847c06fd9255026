// Rotary position embedding, rotate-half form (Llama/HF): for x[b, h, s, d] and tables
// cos/sin[positions, d] (f32), with p = pos[b * s_len + s]:
//   y[.., i]       = x[i] * cos[p, i]       - x[i + d/2] * sin[p, i]
//   y[.., i + d/2] = x[i + d/2] * cos[p, i + d/2] + x[i] * sin[p, i + d/2]
// One thread per (row, i < d/2); positions out of the table's range set *err.

extern "C" __global__ void KILN_NAME(rope)(const T* __restrict__ x, const i64* __restrict__ pos,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                           T* __restrict__ y, int heads, int seq, int d, i64 table_rows,
                                           i64 total, int* __restrict__ err) {
    const int half = d >> 1;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const i64 row = t / half;
        const int i = (int)(t - row * half);
        const int s = (int)(row % seq);
        const i64 b = row / ((i64)seq * heads);
        const i64 p = pos[b * seq + s];
        if (p < 0 || p >= table_rows) { atomicExch(err, 1); continue; }
        const T* xr = x + row * d;
        T* yr = y + row * d;
        const float a = kiln_f(xr[i]), c = kiln_f(xr[i + half]);
        yr[i] = kiln_from_f<T>(a * cos_t[p * d + i] - c * sin_t[p * d + i]);
        yr[i + half] = kiln_from_f<T>(c * cos_t[p * d + i + half] + a * sin_t[p * d + i + half]);
    }
}

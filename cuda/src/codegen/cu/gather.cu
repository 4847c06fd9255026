// Embedding gather: out[r, :] = table[ids[r], :] for table[vocab, hidden]; an id outside
// 0..vocab sets *err and leaves its row unwritten. One block per row.

extern "C" __global__ void KILN_NAME(embedding)(const T* __restrict__ table, const i64* __restrict__ ids,
                                                T* __restrict__ out, i64 vocab, int hidden,
                                                int* __restrict__ err) {
    const i64 id = ids[blockIdx.x];
    if (id < 0 || id >= vocab) { if (threadIdx.x == 0) atomicExch(err, 1); return; }
    const T* src = table + id * hidden;
    T* dst = out + (i64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

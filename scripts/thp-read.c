// Read bandwidth of a 150 MB buffer (the bf16 weights of the 125M Llama) in 4 KiB pages and in
// 2 MiB transparent huge pages, with 1 or 2 threads (kiln_kernels::pages; BENCHMARKS.md).
//   cc -O2 -mavx512f -pthread scripts/thp-read.c -o /tmp/thp-read
//   /tmp/thp-read 0 2   # 4 KiB pages, 2 threads      /tmp/thp-read 1 2   # huge pages, 2 threads
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef struct { const char *p; size_t n; float s; } Part;

static void *read_part(void *arg) {
    Part *a = arg;
    __m512 x = _mm512_setzero_ps(), y = _mm512_setzero_ps();
    for (size_t i = 0; i < a->n; i += 128) {
        x = _mm512_add_ps(x, _mm512_loadu_ps((const float *)(a->p + i)));
        y = _mm512_add_ps(y, _mm512_loadu_ps((const float *)(a->p + i + 64)));
    }
    a->s = _mm512_reduce_add_ps(_mm512_add_ps(x, y));
    return 0;
}

int main(int argc, char **argv) {
    const size_t n = (size_t)150 << 20, huge = (size_t)2 << 20;
    int use_huge = argc > 1 && atoi(argv[1]), threads = argc > 2 ? atoi(argv[2]) : 2;
    char *base = mmap(0, n + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *p = (char *)(((size_t)base + huge - 1) & ~(huge - 1));
    madvise(p, n, MADV_NOHUGEPAGE);
    memset(p, 1, n);
    if (use_huge) {
        madvise(p, n, MADV_HUGEPAGE);
        if (madvise(p, n, MADV_COLLAPSE)) perror("MADV_COLLAPSE");
    }
    double best = 1e9;
    for (int r = 0; r < 20; r++) {
        Part a = {p, threads == 2 ? n / 2 : n, 0}, b = {p + n / 2, n / 2, 0};
        pthread_t t;
        double t0 = now();
        if (threads == 2) pthread_create(&t, 0, read_part, &b);
        read_part(&a);
        if (threads == 2) pthread_join(t, 0);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("%s pages, %d thread(s): %.1f GB/s\n", use_huge ? "2 MiB" : "4 KiB", threads, n / best / 1e9);
    return 0;
}

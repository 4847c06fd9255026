//! The CPU kernels (kiln-kernels) at decode- and prefill-like sizes, with throughput in elements
//! so criterion reports rates: f32 GEMM and bf16-weight GEMM at 256³, 1024³ and 2048³
//! (throughput: multiply-adds), bf16 and f32 GEMV at 4096×4096 (weights read), rmsnorm and
//! softmax on 512×4096, and `silu(a)·b` on 4M elements. `kiln bench kernel` gives the same figures as GFLOP/s and GB/s
//! against the machine's ceilings.
//!
//! `cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::gemm_bf16::{matmul_bf16, PackedBf16};
use kiln_kernels::{elementwise, gemv, rowwise};
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5)
        .collect()
}

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_f32");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for n in [256usize, 1024, 2048] {
        let (a, b) = (data(n * n, 0.0), data(n * n, 1.0));
        let mut out = vec![0.0; n * n];
        let p = Gemm::dense(n, n, n, false, false);
        g.throughput(Throughput::Elements((n * n * n) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}^3")),
            &n,
            |bch, _| bch.iter(|| matmul_f32(&p, black_box(&a), black_box(&b), &mut out).unwrap()),
        );
    }
    g.finish();
    let mut g = c.benchmark_group("gemm_bf16");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for n in [256usize, 1024, 2048] {
        let a = data(n * n, 0.0);
        let w: Vec<bf16> = data(n * n, 1.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let w = PackedBf16::pack(n, n, &w).unwrap();
        let mut out = vec![0.0; n * n];
        g.throughput(Throughput::Elements((n * n * n) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}^3")),
            &n,
            |bch, _| bch.iter(|| matmul_bf16(n, black_box(&a), &w, &mut out).unwrap()),
        );
    }
    g.finish();
}

fn gemv_bench(c: &mut Criterion) {
    let (n, k) = (4096usize, 4096usize);
    let wf = data(n * k, 0.0);
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let x = data(k, 2.0);
    let mut y = vec![0.0; n];
    let mut g = c.benchmark_group("gemv");
    g.sample_size(20);
    g.throughput(Throughput::Bytes((n * k * 2) as u64));
    g.bench_function("bf16/4096x4096", |b| {
        b.iter(|| gemv::gemv_bf16(n, k, black_box(&wb), black_box(&x), &mut y).unwrap())
    });
    g.throughput(Throughput::Bytes((n * k * 4) as u64));
    g.bench_function("f32/4096x4096", |b| {
        b.iter(|| gemv::gemv_f32(n, k, black_box(&wf), black_box(&x), &mut y).unwrap())
    });
    g.finish();
}

fn rows_and_elementwise(c: &mut Criterion) {
    let (rows, cols) = (512usize, 4096usize);
    let x = data(rows * cols, 0.0);
    let w = data(cols, 3.0);
    let mut y = vec![0.0; rows * cols];
    let mut g = c.benchmark_group("rowwise");
    g.sample_size(20);
    // Bytes read plus written.
    g.throughput(Throughput::Bytes((rows * cols * 8) as u64));
    g.bench_function("rmsnorm/512x4096", |b| {
        b.iter(|| rowwise::rmsnorm(rows, cols, black_box(&x), &w, 1e-6, &mut y).unwrap())
    });
    g.bench_function("softmax/512x4096", |b| {
        b.iter(|| rowwise::softmax(rows, cols, black_box(&x), &mut y).unwrap())
    });
    g.finish();
    let n = 1usize << 22;
    let (a, bb) = (data(n, 0.0), data(n, 1.0));
    let mut out = vec![0.0; n];
    let mut g = c.benchmark_group("elementwise");
    g.sample_size(20);
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("silu_mul/4M", |b| {
        b.iter(|| elementwise::silu_mul(black_box(&a), black_box(&bb), &mut out).unwrap())
    });
    g.finish();
}

criterion_group!(benches, gemm, gemv_bench, rows_and_elementwise);
criterion_main!(benches);

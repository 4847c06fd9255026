//! MLIR-JIT kernels (feature `mlir`) against the native kernels of kiln-kernels, same data,
//! same threads (rayon's global pool for both): fused `(mul (silu $0) $1)` on 16M elements,
//! rmsnorm and softmax on 4096×4096, f32 matmul 512³. Compilation is outside the timing.
//!
//! `cargo bench --features mlir --bench mlir_kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_compiler::mlir::{KernelSpec, MlirKernel};
use kiln_ir::{Expr, Op, F64};
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::{elementwise, rowwise};
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5)
        .collect()
}

/// Benchmarks the MLIR kernel for `spec` on `inputs` and the native closure side by side.
fn pair(
    c: &mut Criterion,
    name: &str,
    spec: KernelSpec,
    inputs: &[Vec<f32>],
    elements: u64,
    mut native: impl FnMut(&[Vec<f32>], &mut [f32]),
) {
    let k = MlirKernel::compile(&spec).unwrap();
    let shape = spec.output_shape().unwrap();
    let mut out = vec![0.0; shape.iter().product()];
    let args: Vec<(&[f32], &[usize])> = inputs
        .iter()
        .zip(&spec.inputs)
        .map(|(d, s)| (d.as_slice(), s.as_slice()))
        .collect();
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(elements));
    g.bench_function("mlir", |b| {
        b.iter(|| k.run(black_box(&args), &mut out, &shape).unwrap())
    });
    g.bench_function("native", |b| b.iter(|| native(black_box(inputs), &mut out)));
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let n = 16 << 20;
    let body: Expr = "(mul (silu $0) $1)".parse().unwrap();
    pair(
        c,
        "silu_mul_16M",
        KernelSpec::new(Op::FusedElementwise { body }, &[&[n], &[n]]),
        &[data(n, 0.0), data(n, 1.0)],
        n as u64,
        |x, y| elementwise::silu_mul(&x[0], &x[1], y).unwrap(),
    );
    let (r, cols) = (4096, 4096);
    pair(
        c,
        "rmsnorm_4096x4096",
        KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[r, cols], &[cols]]),
        &[data(r * cols, 0.0), data(cols, 1.0)],
        (r * cols) as u64,
        |x, y| rowwise::rmsnorm(r, cols, &x[0], &x[1], 1e-6, y).unwrap(),
    );
    pair(
        c,
        "softmax_4096x4096",
        KernelSpec::new(Op::Softmax { axis: 1 }, &[&[r, cols]]),
        &[data(r * cols, 0.0)],
        (r * cols) as u64,
        |x, y| rowwise::softmax(r, cols, &x[0], y).unwrap(),
    );
    let m = 512;
    let p = Gemm::dense(m, m, m, false, false);
    pair(
        c,
        "matmul_512^3",
        KernelSpec::new(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[&[m, m], &[m, m]],
        ),
        &[data(m * m, 0.0), data(m * m, 1.0)],
        (m * m * m) as u64,
        |x, y| matmul_f32(&p, &x[0], &x[1], y).unwrap(),
    );
}

criterion_group!(benches, kernels);
criterion_main!(benches);

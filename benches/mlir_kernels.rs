//! MLIR-JIT kernels (feature `mlir`) against the native kernels of kiln-kernels, same data,
//! same threads (rayon's global pool for both): fused `(mul (silu $0) $1)` on 16M elements,
//! rmsnorm and softmax on 4096×4096, f32 matmul 512³ (and with `b` transposed, also one row
//! `1×768 · (2048×768)ᵀ`), causal GQA attention (8 query heads over
//! 2 key/value heads, 512 positions, head dim 64). Compilation is outside the timing.
//!
//! The `compile` group times compiling one kernel (rmsnorm over rows of 768) by its parts:
//! an MLIR context, building the module (`lower`), the whole compilation from the key
//! (context, module, pipeline, JIT) and from the module an artifact carries
//! (`kiln_compiler::mlir::carry::compile`: parsed, verified, compared with a fresh lowering).
//!
//! `cargo bench --features mlir --bench mlir_kernels` (`-- compile` for that group only)

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_compiler::mlir::build::context;
use kiln_compiler::mlir::carry::{self, Source};
use kiln_compiler::mlir::lower::{lower, Target};
use kiln_compiler::mlir::{KernelSpec, MlirKernel};
use kiln_ir::{Expr, Op, F64};
use kiln_kernels::attention::{attention_f32, AttnOptions, AttnShape, Strides4, View};
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
    // `x · Wᵀ` (the linear layers' product): square, and one decode row against a weight.
    for (name, m, n, k) in [
        ("matmul_bt_512^3", 512, 512, 512),
        ("matmul_bt_1x768x2048", 1, 2048, 768),
    ] {
        let p = Gemm::dense(m, n, k, false, true);
        pair(
            c,
            name,
            KernelSpec::new(
                Op::MatMul {
                    transpose_a: false,
                    transpose_b: true,
                },
                &[&[m, k], &[n, k]],
            ),
            &[data(m * k, 0.0), data(n * k, 1.0)],
            (m * n * k) as u64,
            |x, y| matmul_f32(&p, &x[0], &x[1], y).unwrap(),
        );
    }
    let (hq, hkv, seq, d) = (8, 2, 512, 64);
    let dims = AttnShape {
        batch: 1,
        q_heads: hq,
        kv_heads: hkv,
        q_len: seq,
        kv_len: seq,
        head_dim: d,
        v_dim: d,
    };
    let scale = 1.0 / (d as f64).sqrt();
    let opts = AttnOptions {
        scale: scale as f32,
        causal: true,
        window: 0,
    };
    fn view(x: &[f32], heads: usize, seq: usize, d: usize) -> View<'_> {
        View {
            data: x,
            strides: Strides4::dense(heads, seq, d),
        }
    }
    pair(
        c,
        "attention_gqa_8x2x512x64",
        KernelSpec::new(
            Op::Attention {
                scale: F64(scale),
                causal: true,
                window: 0,
                merge_heads: false,
            },
            &[&[1, hq, seq, d], &[1, hkv, seq, d], &[1, hkv, seq, d]],
        ),
        &[
            data(hq * seq * d, 0.0),
            data(hkv * seq * d, 1.0),
            data(hkv * seq * d, 2.0),
        ],
        (hq * seq * seq / 2 * d) as u64,
        |x, y| {
            let (q, k, v) = (
                view(&x[0], hq, seq, d),
                view(&x[1], hkv, seq, d),
                view(&x[2], hkv, seq, d),
            );
            attention_f32(&dims, &opts, q, k, v, None, y, Strides4::dense(hq, seq, d)).unwrap()
        },
    );
}

fn compile(c: &mut Criterion) {
    let spec = KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[7, 768], &[768]]);
    let key = spec.key().unwrap();
    let carried = kiln_compiler::mlir::emit(&spec).unwrap();
    let mut g = c.benchmark_group("compile rmsnorm 768");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function("context", |b| b.iter(context));
    let ctx = context();
    g.bench_function("lower", |b| {
        b.iter(|| lower(&ctx, black_box(&key), Target::Cpu).unwrap().first_row)
    });
    g.bench_function("from the key", |b| {
        b.iter(|| MlirKernel::compile_key(black_box(&key)).unwrap())
    });
    g.bench_function("from the carried module", |b| {
        b.iter(|| {
            let (k, source) = carry::compile(black_box(&key), Some(&carried)).unwrap();
            assert_eq!(source, Source::Carried);
            k
        })
    });
    g.finish();
}

criterion_group!(benches, kernels, compile);
criterion_main!(benches);

//! The CPU kernels (kiln-kernels) at decode- and prefill-like sizes, with throughput in elements
//! so criterion reports rates: f32 GEMM and bf16-weight GEMM at 256³, 1024³ and 2048³
//! (throughput: multiply-adds), bf16 and f32 GEMV at 4096×4096 (weights read), rmsnorm and
//! softmax on 512×4096, and `silu(a)·b` on 4M elements; for the fast CPU executor: flash
//! attention (prefill seq 512, 12 query / 4 kv heads, head dim 64, throughput: flops of
//! `q·kᵀ` and `p·v`; decode q_len 1 over 1024 keys, and over 550 keys of a cache with room for 1024
//! (head stride 1024·d), throughput: K and V bytes read), the
//! compiled fused program `(mul (silu $0) $1)` on 16M elements (bytes read + written; the machine's
//! ceilings are printed first), layernorm on 512×4096, and a `[b, s, h, d]` →
//! `[b, h, s, d]` strided copy; fp8 e4m3 GEMV (one row and four rows of x) at 4096² and 8192²
//! (throughput: weight bytes read). `kiln bench kernel` gives the same figures as GFLOP/s and GB/s
//! against the machine's ceilings.
//!
//! `linear_decode`: the linear layers of one decode token of the 125M Llama (12 layers: Q/K/V,
//! output, gate/up, down projections; weights 2–4× the L3, so read from memory) in f32, bf16
//! and fp8 e4m3, each layer its own call (`separate`) or as the CPU plan runs them (`grouped`:
//! Q/K/V and gate/up one region each, the residual adds in the epilogue), and the same bytes as
//! one layer of k = 768 (`one_call`: the cost without any per-call cost); weights backed by huge
//! pages as the CPU backend asks for; throughput: weight bytes read.
//!
//! `region`: the fixed cost of one parallel region of tiny tasks after a short serial step, on
//! the kernels' team (`kiln_kernels::pool`) and on rayon's pool.
//!
//! `cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use kiln_kernels::attention::{attention_f32, AttnOptions, AttnShape, Strides4, View};
use kiln_kernels::fused::Program;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::gemm_bf16::{matmul_bf16, PackedBf16};
use kiln_kernels::layout::copy_strided;
use kiln_kernels::{elementwise, gemv, pages, peak, rowwise};
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
    print_ceilings();
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
    // fp8 e4m3 weights (one byte each) at 4096×4096 and 8192×8192 (64 MiB, beyond L3).
    for n in [4096usize, 8192] {
        let w8: Vec<u8> = data(n * n, 0.0)
            .iter()
            .map(|&v| kiln_ir::f8::f32_to_f8e4m3(v * 400.0))
            .collect();
        let x = data(n, 2.0);
        let mut y = vec![0.0; n];
        g.throughput(Throughput::Bytes((n * n) as u64));
        g.bench_function(format!("f8e4m3/{n}x{n}"), |b| {
            b.iter(|| gemv::gemv_f8e4m3(n, n, black_box(&w8), 0.01, &x, &mut y).unwrap())
        });
        let xs = data(4 * n, 3.0);
        let mut ys = vec![0.0; 4 * n];
        g.bench_function(format!("f8e4m3_batch4/{n}x{n}"), |b| {
            b.iter(|| gemv::gemv_f8e4m3_batch(4, n, n, black_box(&w8), 0.01, &xs, &mut ys).unwrap())
        });
    }
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

/// Prints this machine's ceilings, measured now (the machine is shared: compare each figure
/// with the ceilings printed in the same run).
fn print_ceilings() {
    eprintln!(
        "ceilings: peak f32 FMA {:.1} GFLOP/s, read {:.1} GB/s, copy (read + write) {:.1} GB/s",
        peak::fma_f32_gflops(5).unwrap_or(f64::NAN),
        peak::read_gbps(peak::BANDWIDTH_BYTES, 5),
        peak::copy_gbps(peak::BANDWIDTH_BYTES, 5)
    );
}

fn attention(c: &mut Criterion) {
    print_ceilings();
    let (hq, hkv, d) = (12usize, 4usize, 64usize);
    let mut g = c.benchmark_group("attention");
    g.sample_size(20);
    // (queries, keys, causal, key positions allocated: a KV cache's spare capacity).
    for (sq, sk, causal, cap) in [
        (512usize, 512usize, false, 512usize),
        (512, 512, true, 512),
        (1, 1024, true, 1024),
        (1, 550, true, 1024),
    ] {
        let q = data(hq * sq * d, 0.0);
        let (k, v) = (data(hkv * cap * d, 1.0), data(hkv * cap * d, 2.0));
        let mut out = vec![0.0; hq * sq * d];
        let shape = AttnShape {
            batch: 1,
            q_heads: hq,
            kv_heads: hkv,
            q_len: sq,
            kv_len: sk,
            head_dim: d,
            v_dim: d,
        };
        let opts = AttnOptions {
            scale: 0.125,
            causal,
            window: 0,
        };
        let name = if sq == 1 {
            g.throughput(Throughput::Bytes((2 * hkv * sk * d * 4) as u64));
            format!("decode/kv{sk}/cap{cap}")
        } else {
            // Flops of the full score matrix (causal does about half of them).
            g.throughput(Throughput::Elements((4 * hq * sq * sk * d) as u64));
            format!("prefill/{sq}{}", if causal { "/causal" } else { "" })
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                attention_f32(
                    &shape,
                    &opts,
                    View {
                        data: black_box(&q),
                        strides: Strides4::dense(hq, sq, d),
                    },
                    View {
                        data: &k,
                        strides: Strides4::dense(hkv, cap, d),
                    },
                    View {
                        data: &v,
                        strides: Strides4::dense(hkv, cap, d),
                    },
                    None,
                    &mut out,
                    Strides4::dense(hq, sq, d),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn executor_memory_kernels(c: &mut Criterion) {
    print_ceilings();
    let n = 1usize << 24;
    let (a, bb) = (data(n, 0.0), data(n, 1.0));
    let mut out = vec![0.0; n];
    let prog = Program::compile(
        &"(mul (silu $0) $1)".parse().unwrap(),
        &[kiln_ir::DType::F32; 2],
    )
    .unwrap();
    let mut g = c.benchmark_group("executor");
    g.sample_size(20);
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("fused_silu_mul/16M", |b| {
        b.iter(|| {
            prog.run(&[n], &[(black_box(&a), &[1]), (&bb, &[1])], &mut out)
                .unwrap()
        })
    });
    let (rows, cols) = (512usize, 4096usize);
    let (w, bias) = (data(cols, 3.0), data(cols, 4.0));
    g.throughput(Throughput::Bytes((rows * cols * 8) as u64));
    g.bench_function("layernorm/512x4096", |b| {
        b.iter(|| {
            rowwise::layernorm(
                rows,
                cols,
                black_box(&a[..rows * cols]),
                &w,
                &bias,
                1e-5,
                &mut out[..rows * cols],
            )
            .unwrap()
        })
    });
    // [s, h, d] → [h, s, d] (the permute before attention) at s = 2048, h = 32, d = 128.
    let (s, h, d) = (2048usize, 32usize, 128usize);
    g.throughput(Throughput::Bytes((s * h * d * 8) as u64));
    g.bench_function("permute_shd_to_hsd/2048x32x128", |b| {
        b.iter(|| {
            copy_strided(
                &[h, s, d],
                black_box(&a[..s * h * d]),
                0,
                &[d, h * d, 1],
                &mut out[..s * h * d],
                0,
                &[s * d, d, 1],
            )
            .unwrap()
        })
    });
    g.finish();
}

/// The weight shapes `[n, k]` of one 125M-Llama layer: q, k, v, o, gate, up, down.
fn llama_layer_shapes() -> [(usize, usize); 7] {
    let (h, kv, i) = (768, 256, 2048);
    [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
}

fn linear_decode(c: &mut Criterion) {
    use kiln_kernels::linear::{linear, Layer, Weight};
    const LAYERS: usize = 12;
    let shapes = llama_layer_shapes();
    let f32w: Vec<Vec<Vec<f32>>> = (0..LAYERS)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(j, &(n, k))| data(n * k, (l * 7 + j) as f32))
                .collect()
        })
        .collect();
    let bf16w: Vec<Vec<PackedBf16>> = f32w
        .iter()
        .map(|ws| {
            ws.iter()
                .zip(&shapes)
                .map(|(w, &(n, k))| {
                    let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                    PackedBf16::pack(n, k, &b).unwrap()
                })
                .collect()
        })
        .collect();
    let f8w: Vec<Vec<Vec<u8>>> = f32w
        .iter()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    w.iter()
                        .map(|&v| kiln_ir::f8::f32_to_f8e4m3(v * 400.0))
                        .collect()
                })
                .collect()
        })
        .collect();
    let scales: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| data(n, 5.0)).collect();
    let x = data(2048, 2.0);
    let resid = data(768, 3.0);
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0.0; n]).collect();
    let one_rows = shapes.iter().map(|(n, k)| n * k).sum::<usize>() * LAYERS / 768;
    let one_call = OneCall::all(one_rows);
    let mut one_out = vec![0.0; one_rows];
    // As the CPU backend does for a model's weights (`kiln_kernels::pages`).
    let spans = (f32w.iter().flatten().map(|w| pages::span(w)))
        .chain(bf16w.iter().flatten().map(|w| pages::span(w.words())))
        .chain(f8w.iter().flatten().map(|w| pages::span(w)));
    pages::back_with_huge_pages(spans);
    for o in &one_call {
        pages::back_with_huge_pages([match o {
            OneCall::F32(w) => pages::span(w),
            OneCall::Bf16(w) => pages::span(w.words()),
            OneCall::F8(w) => pages::span(w),
        }]);
    }
    let mut g = c.benchmark_group("linear_decode");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for kind in ["f32", "bf16", "fp8"] {
        let weight = |l: usize, j: usize| -> Weight<'_> {
            match kind {
                "f32" => Weight::F32(&f32w[l][j]),
                "bf16" => Weight::Bf16(&bf16w[l][j]),
                _ => Weight::F8E4M3(&f8w[l][j]),
            }
        };
        let bytes_per = match kind {
            "f32" => 4,
            "bf16" => 2,
            _ => 1,
        };
        let total: usize = shapes.iter().map(|(n, k)| n * k).sum::<usize>() * LAYERS;
        g.throughput(Throughput::Bytes((total * bytes_per) as u64));
        let scale = |j: usize| (kind == "fp8").then(|| scales[j].as_slice());
        // Each weight its own call of the kernel the plan used before; the fp8 scales and the
        // residual adds as second passes.
        g.bench_function(format!("separate/{kind}"), |b| {
            b.iter(|| {
                for l in 0..LAYERS {
                    for (j, out) in outs.iter_mut().enumerate() {
                        let (n, k) = shapes[j];
                        let x = &x[..k];
                        match kind {
                            "f32" => gemv::gemv_f32(n, k, &f32w[l][j], x, out).unwrap(),
                            "bf16" => matmul_bf16(1, x, &bf16w[l][j], out).unwrap(),
                            _ => gemv::gemv_f8e4m3(n, k, &f8w[l][j], 1.0, x, out).unwrap(),
                        }
                        if let Some(s) = scale(j) {
                            for (v, s) in out.iter_mut().zip(s) {
                                *v *= s;
                            }
                        }
                        if j == 3 || j == 6 {
                            for (v, r) in out.iter_mut().zip(&resid) {
                                *v += r;
                            }
                        }
                    }
                }
            })
        });
        g.bench_function(format!("grouped/{kind}"), |b| {
            b.iter(|| {
                for l in 0..LAYERS {
                    let [q, kk, v, o, gate, up, down] = &mut outs[..] else {
                        unreachable!()
                    };
                    let mk = |j: usize, add, out| Layer {
                        scale: scale(j),
                        add,
                        ..Layer::new(weight(l, j), out)
                    };
                    linear(
                        1,
                        768,
                        &x[..768],
                        &mut [mk(0, None, q), mk(1, None, kk), mk(2, None, v)],
                    )
                    .unwrap();
                    linear(1, 768, &x[..768], &mut [mk(3, Some(&resid), o)]).unwrap();
                    linear(1, 768, &x[..768], &mut [mk(4, None, gate), mk(5, None, up)]).unwrap();
                    linear(1, 2048, &x, &mut [mk(6, Some(&resid), down)]).unwrap();
                }
            })
        });
        // The same weight bytes as ONE layer of k = 768 (one region, one stream per thread):
        // what the token's 48 calls would cost without any per-call cost.
        let one = one_call[kind_index(kind)].weight();
        g.bench_function(format!("one_call/{kind}"), |b| {
            b.iter(|| linear(1, 768, &x[..768], &mut [Layer::new(one, &mut one_out)]).unwrap())
        });
    }
    g.finish();
}

/// One weight of `rows × 768` in each kind (f32, packed bf16, fp8 e4m3).
enum OneCall {
    F32(Vec<f32>),
    Bf16(PackedBf16),
    F8(Vec<u8>),
}

impl OneCall {
    fn all(rows: usize) -> [OneCall; 3] {
        let w = data(rows * 768, 0.5);
        let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let f8 = w
            .iter()
            .map(|&v| kiln_ir::f8::f32_to_f8e4m3(v * 400.0))
            .collect();
        [
            OneCall::Bf16(PackedBf16::pack(rows, 768, &b).unwrap()),
            OneCall::F8(f8),
            OneCall::F32(w),
        ]
    }

    fn weight(&self) -> kiln_kernels::linear::Weight<'_> {
        use kiln_kernels::linear::Weight;
        match self {
            OneCall::F32(w) => Weight::F32(w),
            OneCall::Bf16(w) => Weight::Bf16(w),
            OneCall::F8(w) => Weight::F8E4M3(w),
        }
    }
}

fn kind_index(kind: &str) -> usize {
    match kind {
        "bf16" => 0,
        "fp8" => 1,
        _ => 2,
    }
}

/// The fixed cost of one parallel region as decode pays it: a region of one small task per
/// thread (a few hundred nanoseconds of work each) after a short serial step on the calling
/// thread (outside any pool, as the executor's), on the kernels' team or on rayon's pool.
fn region(c: &mut Criterion) {
    use rayon::prelude::*;
    let threads = kiln_kernels::threads();
    let work = |v: &mut f32| {
        for i in 0..256 {
            *v = black_box(*v * 0.999 + i as f32);
        }
    };
    let mut items = vec![0.0f32; threads];
    let mut serial = 0.0f32;
    let mut g = c.benchmark_group("region");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    g.bench_function("team", |b| {
        b.iter(|| {
            work(&mut serial);
            kiln_kernels::pool::for_each(&mut items, |_, v| work(v))
        })
    });
    g.bench_function("rayon", |b| {
        b.iter(|| {
            work(&mut serial);
            items.par_iter_mut().for_each(work)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    region,
    linear_decode,
    gemm,
    gemv_bench,
    rows_and_elementwise,
    attention,
    executor_memory_kernels
);
criterion_main!(benches);

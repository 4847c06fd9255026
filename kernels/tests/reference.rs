//! Every kernel against the reference executor (which defines the IR's meaning), on a one-op
//! graph per case, random data and shapes including odd sizes (1, 7, 33, 4097), at every
//! instruction-set level this CPU has.
//!
//! Tolerances: products (GEMM, GEMV) |got − want| ≤ 1e-5 · Σ_p |a_ip|·|b_pj| (f32 accumulation
//! against the reference's f64); the bf16 GEMV is compared with the graph
//! `cast(cast(x, bf16), f32) · cast(W, f32)ᵀ`, i.e. x rounded to bf16 as the kernel documents.
//! rmsnorm, softmax, silu·mul: |got − want| ≤ 1e-5 · |want| + 1e-30 (a few f32 ulp); layernorm
//! (where cancellation near zero outputs makes relative bounds meaningless):
//! |got − want| ≤ 1e-5 · (|want − bias| + |bias| + |weight|).

use half::bf16;
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op, F64};
use kiln_kernels::gemm::{matmul_f32, matmul_f32_batched, BatchStrides, Gemm, MatLayout};
use kiln_kernels::gemm_bf16::{matmul_bf16_many_with, matmul_bf16_with, PackedBf16, RowEpilogue};
use kiln_kernels::{elementwise, gemv, rowwise, Isa, KernelError};
use kiln_runtime::{Storage, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};
mod common;

use common::{assert_rel, eval, f32t, isas, random, rng};

/// Reference product of op(A)[m×k]·op(B)[k×n] (dense, stored as the flags say) and the bound
/// Σ|a||b| per element.
fn reference_matmul(
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    a: &[f32],
    b: &[f32],
) -> (Vec<f32>, Vec<f64>) {
    let t = Tracer::new();
    let sa = if ta { [k, m] } else { [m, k] };
    let sb = if tb { [n, k] } else { [k, n] };
    let x = t.input("a", DType::F32, sa);
    let w = t.input("b", DType::F32, sb);
    let y = x.matmul_t(&w, ta, tb).unwrap();
    t.output("y", &y);
    let want = eval(&t, vec![("a", f32t(&sa, a)), ("b", f32t(&sb, b))]);
    let at = |i: usize, p: usize| f64::from(if ta { a[p * m + i] } else { a[i * k + p] }).abs();
    let bt = |p: usize, j: usize| f64::from(if tb { b[j * k + p] } else { b[p * n + j] }).abs();
    let mut bound = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            bound[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
        }
    }
    (want, bound)
}

fn assert_products(what: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (f64::from(*g) - f64::from(*w)).abs();
        assert!(
            d <= 1e-5 * b + 1e-30,
            "{what}: element {i}: got {g}, want {w} (bound {b})"
        );
    }
}

const GEMM_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 33),
    (7, 1, 33),
    (33, 7, 1),
    (7, 33, 7),
    (33, 33, 33),
    (64, 48, 96),
    (65, 129, 70),
    (130, 97, 257),
    (1, 33, 4097),
];

#[test]
fn matmul_f32_matches_reference_for_every_transpose() {
    let mut r = rng(1);
    for &(m, n, k) in GEMM_SHAPES {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = random(&mut r, m * k, -1.0, 1.0);
            let b = random(&mut r, k * n, -1.0, 1.0);
            let (want, bound) = reference_matmul(m, n, k, ta, tb, &a, &b);
            let mut c = vec![f32::NAN; m * n]; // beta = 0: C must not be read.
            matmul_f32(&Gemm::dense(m, n, k, ta, tb), &a, &b, &mut c).unwrap();
            assert_products(&format!("{m}x{n}x{k} ta={ta} tb={tb}"), &c, &want, &bound);
        }
    }
}

#[test]
fn matmul_f32_strided_with_alpha_beta() {
    let mut r = rng(2);
    let (m, n, k) = (33, 17, 41);
    let (lda, ldb, ldc) = (k + 3, k + 5, n + 7);
    // A untransposed m×k with padding; B transposed (stored n×k) with padding.
    let a = random(&mut r, m * lda, -1.0, 1.0);
    let b = random(&mut r, n * ldb, -1.0, 1.0);
    let c0 = random(&mut r, m * ldc, -1.0, 1.0);
    let dense_a: Vec<f32> = (0..m)
        .flat_map(|i| a[i * lda..i * lda + k].to_vec())
        .collect();
    let dense_b: Vec<f32> = (0..n)
        .flat_map(|j| b[j * ldb..j * ldb + k].to_vec())
        .collect();
    let (want, bound) = reference_matmul(m, n, k, false, true, &dense_a, &dense_b);
    let p = Gemm {
        m,
        n,
        k,
        a: MatLayout {
            ld: lda,
            trans: false,
        },
        b: MatLayout {
            ld: ldb,
            trans: true,
        },
        ldc,
        alpha: 0.5,
        beta: -2.0,
    };
    let mut c = c0.clone();
    matmul_f32(&p, &a, &b, &mut c).unwrap();
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                assert_eq!(got, c0[i * ldc + j], "padding of C is untouched");
                continue;
            }
            let w = 0.5 * f64::from(want[i * n + j]) - 2.0 * f64::from(c0[i * ldc + j]);
            let d = (f64::from(got) - w).abs();
            assert!(
                d <= 1e-5 * (0.5 * bound[i * n + j] + 2.0),
                "({i},{j}): {got} vs {w}"
            );
        }
    }
}

#[test]
fn matmul_f32_batched_with_broadcast_matches_reference() {
    let mut r = rng(3);
    for &(batch, m, n, k) in &[(3, 7, 33, 5), (4, 65, 64, 63), (2, 1, 1, 1)] {
        let a = random(&mut r, batch * m * k, -1.0, 1.0);
        let b = random(&mut r, k * n, -1.0, 1.0); // one B for the whole batch
        let t = Tracer::new();
        let x = t.input("a", DType::F32, [batch, m, k]);
        let w = t.input("b", DType::F32, [1, k, n]);
        let y = x.matmul(&w).unwrap();
        t.output("y", &y);
        let want = eval(
            &t,
            vec![("a", f32t(&[batch, m, k], &a)), ("b", f32t(&[1, k, n], &b))],
        );
        let mut c = vec![0.0; batch * m * n];
        let strides = BatchStrides {
            a: m * k,
            b: 0,
            c: m * n,
        };
        matmul_f32_batched(
            &Gemm::dense(m, n, k, false, false),
            batch,
            strides,
            &a,
            &b,
            &mut c,
        )
        .unwrap();
        let mut bound = Vec::new();
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    bound.push(
                        (0..k)
                            .map(|p| f64::from((a[bi * m * k + i * k + p] * b[p * n + j]).abs()))
                            .sum(),
                    );
                }
            }
        }
        assert_products(&format!("batch {batch} {m}x{n}x{k}"), &c, &want, &bound);
    }
}

#[test]
fn matmul_rejects_short_operands() {
    let p = Gemm::dense(4, 4, 4, false, false);
    let mut c = vec![0.0; 16];
    let e = matmul_f32(&p, &[0.0; 15], &[0.0; 16], &mut c).unwrap_err();
    assert!(matches!(e, KernelError::Layout(_)));
    let bad = Gemm { ldc: 3, ..p };
    assert!(matmul_f32(&bad, &[0.0; 16], &[0.0; 16], &mut c).is_err());
    let s = BatchStrides { a: 16, b: 16, c: 8 };
    assert!(matmul_f32_batched(&p, 2, s, &[0.0; 32], &[0.0; 32], &mut [0.0; 32]).is_err());
}

const GEMV_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (7, 7),
    (1, 33),
    (33, 1),
    (33, 33),
    (64, 64),
    (257, 129),
    (9, 4097),
    (300, 130),
];

#[test]
fn gemv_bf16_matches_reference_with_x_rounded_to_bf16() {
    let mut r = rng(4);
    for &(n, k) in GEMV_SHAPES {
        let wf = random(&mut r, n * k, -1.0, 1.0);
        let w: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = random(&mut r, k, -2.0, 2.0);
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, [1, k]);
        let wi = t.input("w", DType::BF16, [n, k]);
        let xr = xi.cast(DType::BF16).unwrap().cast(DType::F32).unwrap();
        let wr = wi.cast(DType::F32).unwrap();
        let y = xr.matmul_t(&wr, false, true).unwrap();
        t.output("y", &y);
        let wt = Tensor::new(vec![n, k], Storage::BF16(w.clone())).unwrap();
        let want = eval(&t, vec![("x", f32t(&[1, k], &x)), ("w", wt)]);
        let bound: Vec<f64> = (0..n)
            .map(|i| {
                (0..k)
                    .map(|j| {
                        f64::from((w[i * k + j].to_f32() * bf16::from_f32(x[j]).to_f32()).abs())
                    })
                    .sum()
            })
            .collect();
        for isa in isas() {
            let mut y = vec![f32::NAN; n];
            gemv::gemv_bf16_with(isa, n, k, &w, &x, &mut y).unwrap();
            assert_products(
                &format!("bf16 gemv {n}x{k} at {}", isa.name()),
                &y,
                &want,
                &bound,
            );
        }
    }
}

#[test]
fn gemv_f32_matches_reference() {
    let mut r = rng(5);
    for &(n, k) in GEMV_SHAPES {
        let w = random(&mut r, n * k, -1.0, 1.0);
        let x = random(&mut r, k, -2.0, 2.0);
        let (want, bound) = reference_matmul(n, 1, k, false, false, &w, &x);
        for isa in isas() {
            let mut y = vec![f32::NAN; n];
            gemv::gemv_f32_with(isa, n, k, &w, &x, &mut y).unwrap();
            assert_products(
                &format!("f32 gemv {n}x{k} at {}", isa.name()),
                &y,
                &want,
                &bound,
            );
        }
    }
    let mut y = vec![0.0; 3];
    assert!(gemv::gemv_f32(3, 4, &[0.0; 11], &[0.0; 4], &mut y).is_err());
    assert!(gemv::gemv_bf16(3, 4, &[bf16::ZERO; 12], &[0.0; 5], &mut y).is_err());
}

const ROW_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (7, 1),
    (1, 7),
    (3, 33),
    (33, 64),
    (5, 4097),
    (700, 65),
];

#[test]
fn rmsnorm_matches_reference() {
    let mut r = rng(6);
    for &(rows, cols) in ROW_SHAPES {
        let x = random(&mut r, rows * cols, -3.0, 3.0);
        let g = random(&mut r, cols, 0.5, 1.5);
        let eps = 1e-6;
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, [rows, cols]);
        let wi = t.input("w", DType::F32, [cols]);
        let y = t.apply(Op::RmsNorm { eps: F64(eps) }, &[&xi, &wi]).unwrap();
        t.output("y", &y);
        let want = eval(
            &t,
            vec![("x", f32t(&[rows, cols], &x)), ("w", f32t(&[cols], &g))],
        );
        for isa in isas() {
            let mut y = vec![f32::NAN; rows * cols];
            rowwise::rmsnorm_with(isa, rows, cols, &x, &g, eps, &mut y).unwrap();
            assert_rel(
                &format!("rmsnorm {rows}x{cols} at {}", isa.name()),
                &y,
                &want,
            );
        }
    }
}

#[test]
fn layernorm_matches_reference() {
    let mut r = rng(16);
    for &(rows, cols) in ROW_SHAPES {
        // An offset mean, so the two-pass variance matters.
        let x = random(&mut r, rows * cols, 7.0, 13.0);
        let g = random(&mut r, cols, -1.5, 1.5);
        let b = random(&mut r, cols, -1.0, 1.0);
        let eps = 1e-5;
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, [rows, cols]);
        let wi = t.input("w", DType::F32, [cols]);
        let bi = t.input("b", DType::F32, [cols]);
        let y = t
            .apply(Op::LayerNorm { eps: F64(eps) }, &[&xi, &wi, &bi])
            .unwrap();
        t.output("y", &y);
        let want = eval(
            &t,
            vec![
                ("x", f32t(&[rows, cols], &x)),
                ("w", f32t(&[cols], &g)),
                ("b", f32t(&[cols], &b)),
            ],
        );
        for isa in isas() {
            let mut y = vec![f32::NAN; rows * cols];
            rowwise::layernorm_with(isa, rows, cols, &x, &g, &b, eps, &mut y).unwrap();
            for (i, (got, w)) in y.iter().zip(&want).enumerate() {
                // |weight · normalized| is |want − bias|; the offset mean's rounding adds
                // a few ulp of |weight|.
                let j = i % cols;
                let (w64, g64, b64) = (f64::from(*w), f64::from(g[j]), f64::from(b[j]));
                let bound = 1e-5 * ((w64 - b64).abs() + b64.abs() + g64.abs());
                assert!(
                    (f64::from(*got) - f64::from(*w)).abs() <= bound,
                    "layernorm {rows}x{cols} at {}: element {i}: got {got}, want {w}",
                    isa.name()
                );
            }
        }
    }
    assert!(matches!(
        rowwise::layernorm(2, 3, &[0.0; 6], &[1.0; 3], &[0.0; 2], 1e-5, &mut [0.0; 6]),
        Err(KernelError::Layout(_))
    ));
}

#[test]
fn softmax_matches_reference() {
    let mut r = rng(7);
    for &(rows, cols) in ROW_SHAPES {
        let x = random(&mut r, rows * cols, -20.0, 20.0);
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, [rows, cols]);
        let y = xi.softmax(-1).unwrap();
        t.output("y", &y);
        let want = eval(&t, vec![("x", f32t(&[rows, cols], &x))]);
        for isa in isas() {
            let mut y = vec![f32::NAN; rows * cols];
            rowwise::softmax_with(isa, rows, cols, &x, &mut y).unwrap();
            assert_rel(
                &format!("softmax {rows}x{cols} at {}", isa.name()),
                &y,
                &want,
            );
        }
    }
}

#[test]
fn silu_mul_matches_reference() {
    let mut r = rng(8);
    for &len in &[1usize, 7, 33, 4097, 100_003] {
        let a = random(&mut r, len, -12.0, 12.0);
        let b = random(&mut r, len, -2.0, 2.0);
        let t = Tracer::new();
        let ai = t.input("a", DType::F32, [len]);
        let bi = t.input("b", DType::F32, [len]);
        let y = ai.silu().unwrap().mul(&bi).unwrap();
        t.output("y", &y);
        let want = eval(&t, vec![("a", f32t(&[len], &a)), ("b", f32t(&[len], &b))]);
        for isa in isas() {
            let mut y = vec![f32::NAN; len];
            elementwise::silu_mul_with(isa, &a, &b, &mut y).unwrap();
            assert_rel(&format!("silu_mul {len} at {}", isa.name()), &y, &want);
        }
    }
    assert!(elementwise::silu_mul(&[0.0; 3], &[0.0; 2], &mut [0.0; 3]).is_err());
}

#[test]
fn matmul_bf16_matches_reference_with_a_rounded_to_bf16() {
    let mut r = rng(9);
    for &(m, n, k) in &[
        (1, 1, 1),
        (7, 33, 7),
        (33, 7, 33),
        (17, 33, 0),
        (9, 65, 4097),
        (65, 100, 130),
        (8, 64, 64),
        // More rows, columns and k than one task's block (256 rows, 8 panels, 128 k-pairs).
        (300, 290, 600),
        (263, 33, 513),
    ] {
        let af = random(&mut r, m * k, -2.0, 2.0);
        let wf = random(&mut r, n * k, -1.0, 1.0);
        let w: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let (want, bound) = bf16_reference(m, n, k, &af, &w);
        let packed = PackedBf16::pack(n, k, &w).unwrap();
        for isa in isas() {
            let mut c = vec![f32::NAN; m * n];
            matmul_bf16_with(isa, m, &af, &packed, &mut c).unwrap();
            assert_products(
                &format!("bf16 matmul {m}x{n}x{k} at {}", isa.name()),
                &c,
                &want,
                &bound,
            );
        }
    }
    assert!(PackedBf16::pack(2, 3, &[bf16::ZERO; 5]).is_err());
    let p = PackedBf16::pack(2, 3, &[bf16::ZERO; 6]).unwrap();
    assert!(matmul_bf16_with(Isa::best(), 2, &[0.0; 5], &p, &mut [0.0; 4]).is_err());
}

/// The reference of `bf16(a) · Wᵀ` (`a` `m × k`, `w` `n × k`) and each element's bound
/// `Σ |bf16(a)·w|`.
fn bf16_reference(m: usize, n: usize, k: usize, af: &[f32], w: &[bf16]) -> (Vec<f32>, Vec<f64>) {
    let t = Tracer::new();
    let xi = t.input("a", DType::F32, [m, k]);
    let wi = t.input("w", DType::BF16, [n, k]);
    let xr = xi.cast(DType::BF16).unwrap().cast(DType::F32).unwrap();
    let y = xr
        .matmul_t(&wi.cast(DType::F32).unwrap(), false, true)
        .unwrap();
    t.output("y", &y);
    let wt = Tensor::new(vec![n, k], Storage::BF16(w.to_vec())).unwrap();
    let want = eval(&t, vec![("a", f32t(&[m, k], af)), ("w", wt)]);
    let mut bound = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            bound[i * n + j] = (0..k)
                .map(|p| {
                    f64::from(
                        (bf16::from_f32(af[i * k + p]).to_f32() * w[j * k + p].to_f32()).abs(),
                    )
                })
                .sum();
        }
    }
    (want, bound)
}

#[test]
fn matmul_bf16_many_matches_reference_per_product() {
    let mut r = rng(10);
    let (m, k) = (140, 301);
    let af = random(&mut r, m * k, -2.0, 2.0);
    let ns = [33, 0, 290, 7];
    let ws: Vec<Vec<bf16>> = ns
        .iter()
        .map(|&n| {
            random(&mut r, n * k, -1.0, 1.0)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect()
        })
        .collect();
    let packed: Vec<PackedBf16> = ns
        .iter()
        .zip(&ws)
        .map(|(&n, w)| PackedBf16::pack(n, k, w).unwrap())
        .collect();
    for isa in isas() {
        let run = |epilogue: Option<&RowEpilogue<'_>>| {
            let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
            let mut products: Vec<(&PackedBf16, &mut [f32])> = packed
                .iter()
                .zip(outs.iter_mut())
                .map(|(p, c)| (p, c.as_mut_slice()))
                .collect();
            matmul_bf16_many_with(isa, m, &af, &mut products, epilogue).unwrap();
            drop(products);
            outs
        };
        let outs = run(None);
        for ((&n, w), c) in ns.iter().zip(&ws).zip(&outs) {
            let (want, bound) = bf16_reference(m, n, k, &af, w);
            assert_products(
                &format!("bf16 many {m}x{n}x{k} at {}", isa.name()),
                c,
                &want,
                &bound,
            );
        }
        // With an epilogue: every element finished exactly once, after its product, knowing
        // its product, row and column.
        let calls: Vec<Vec<AtomicU32>> = ns
            .iter()
            .map(|&n| (0..m * n).map(|_| AtomicU32::new(0)).collect())
            .collect();
        let finish = |i: usize, r: usize, c0: usize, y: &mut [f32]| {
            for (j, v) in y.iter_mut().enumerate() {
                calls[i][r * ns[i] + c0 + j].fetch_add(1, Ordering::Relaxed);
                *v = -*v + (i + r % 3 + (c0 + j) % 5) as f32;
            }
        };
        let outs = run(Some(&finish));
        for (i, ((&n, w), c)) in ns.iter().zip(&ws).zip(&outs).enumerate() {
            assert!(calls[i].iter().all(|c| c.load(Ordering::Relaxed) == 1));
            let (want, bound) = bf16_reference(m, n, k, &af, w);
            let want: Vec<f32> = (0..m * n)
                .map(|e| -want[e] + (i + (e / n) % 3 + (e % n) % 5) as f32)
                .collect();
            assert_products(
                &format!("bf16 many + epilogue {m}x{n}x{k} at {}", isa.name()),
                c,
                &want,
                &bound,
            );
        }
    }
    let short = PackedBf16::pack(2, 4, &[bf16::ZERO; 8]).unwrap();
    let mut c = [0.0; 4];
    let e = matmul_bf16_many_with(
        Isa::best(),
        2,
        &[0.0; 6],
        &mut [(&packed[0], &mut []), (&short, &mut c)],
        None,
    );
    assert!(e.is_err());
}

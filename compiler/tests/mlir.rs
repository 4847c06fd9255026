//! MLIR-generated kernels (feature `mlir`) against the reference executor, which defines the
//! IR's meaning: each case is a one-op graph run by `kiln_runtime::reference::run` on random
//! data, at shapes including odd sizes (1, 7, 33, 4097).
//!
//! Tolerances (f32 kernels against the reference's f64 arithmetic rounded to f32):
//! - elementwise bodies, softmax, log-softmax, rmsnorm: |got − want| ≤ 1e-5·|want| + 1e-6
//!   (a few f32 ulp of relative error; the absolute term covers results near zero that come
//!   out of a difference, e.g. `x - max` in log-softmax);
//! - layernorm: |got − want| ≤ 1e-5·(|want| + 1) (the centred `x - mean` loses up to an ulp of
//!   the row's magnitude, about 1 here);
//! - sums and means: |got − want| ≤ 1e-5·Σ|x| (f32 accumulation); max and min exact;
//! - matmul: |got − want| ≤ 1e-5·Σ_p |a_ip|·|b_pj| (f32 accumulation), as the native kernels.
#![cfg(feature = "mlir")]

use kiln_compiler::mlir::{KernelCache, KernelSpec, MlirError, MlirKernel};
use kiln_ir::trace::Tracer;
use kiln_ir::{BinaryOp, DType, Expr, Op, ReduceOp, UnaryOp, F64};
use kiln_runtime::cpu::external::Operand;
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

fn random(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// The reference executor's result for `spec` on `data`.
fn reference(spec: &KernelSpec, data: &[Vec<f32>]) -> Vec<f32> {
    let t = Tracer::new();
    let ins: Vec<_> = spec
        .inputs
        .iter()
        .enumerate()
        .map(|(i, s)| t.input(&format!("x{i}"), DType::F32, s.clone()))
        .collect();
    let y = t
        .apply(spec.op.clone(), &ins.iter().collect::<Vec<_>>())
        .unwrap();
    t.output("y", &y);
    let g = t.finish().unwrap();
    let inputs: HashMap<String, Tensor> = spec
        .inputs
        .iter()
        .zip(data)
        .enumerate()
        .map(|(i, (s, d))| {
            (
                format!("x{i}"),
                Tensor::from_f32(s.clone(), d.clone()).unwrap(),
            )
        })
        .collect();
    run(&g, &inputs, &NoParams).unwrap()["y"]
        .as_f32()
        .unwrap()
        .to_vec()
}

/// Compiles and runs `spec` on `data`.
fn mlir(spec: &KernelSpec, data: &[Vec<f32>]) -> Vec<f32> {
    let k = MlirKernel::compile(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let out = spec.output_shape().unwrap();
    let mut y = vec![f32::NAN; out.iter().product()];
    let ins: Vec<(&[f32], &[usize])> = data
        .iter()
        .zip(&spec.inputs)
        .map(|(d, s)| (d.as_slice(), s.as_slice()))
        .collect();
    k.run(&ins, &mut y, &out).unwrap();
    y
}

/// Checks |got − want| ≤ bound(i, want) elementwise (NaN matches NaN).
fn check(what: &str, got: &[f32], want: &[f32], bound: impl Fn(usize, f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (f64::from(*g) - f64::from(*w)).abs();
        let ok = d <= bound(i, f64::from(*w)) || (g.is_nan() && w.is_nan()) || g == w;
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

fn rel(what: &str, got: &[f32], want: &[f32]) {
    check(what, got, want, |_, w| 1e-5 * w.abs() + 1e-6);
}

fn body(s: &str) -> Op {
    Op::FusedElementwise {
        body: s.parse::<Expr>().unwrap(),
    }
}

#[test]
fn fused_elementwise_matches_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let bodies = [
        "(mul (silu $0) $1)",
        "(add (mul $0 $1) (const f32 0.5))",
        "(div (exp $0) (add (sigmoid $1) (const f32 1)))",
        "(mul (gelu $0) $1)",
        "(add (gelu_tanh $0) $1)",
        "(where (lt $0 $1) (tanh $0) (max $0 $1))",
        "(mul (rsqrt (add (abs $0) (const f32 1))) (relu $1))",
        "(sub (neg $0) (cast f32 (ge $0 $1)))",
    ];
    for b in bodies {
        for len in [1usize, 7, 33, 4097, 100_003] {
            let spec = KernelSpec::new(body(b), &[&[len], &[len]]);
            let data = vec![
                random(&mut r, len, -12.0, 12.0),
                random(&mut r, len, -2.0, 2.0),
            ];
            rel(
                &format!("{b} at {len}"),
                &mlir(&spec, &data),
                &reference(&spec, &data),
            );
        }
    }
}

#[test]
fn exp_matches_reference_over_its_whole_range() {
    // Both ends of f32's exp: subnormal results, 0, overflow to +inf, and NaN.
    let mut x: Vec<f32> = (-1100..=1000).map(|i| i as f32 * 0.1).collect();
    x.extend([
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        88.72,
        88.73,
        -87.5,
        -100.0,
    ]);
    let spec = KernelSpec::new(Op::Unary(UnaryOp::Exp), &[&[x.len()]]);
    let data = vec![x];
    let got = mlir(&spec, &data);
    let want = reference(&spec, &data);
    // Subnormal results carry fewer significant bits: allow 2 units of 2^-149 there.
    check("exp", &got, &want, |_, w| 1e-5 * w.abs() + 3e-45);
}

#[test]
fn broadcast_elementwise_matches_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for (a, b) in [
        (vec![7, 33], vec![33]),
        (vec![33, 1], vec![1, 7]),
        (vec![4, 1, 33], vec![5, 33]),
        (vec![1], vec![4097]),
        (vec![], vec![3, 7]),
    ] {
        let spec = KernelSpec::new(Op::Binary(BinaryOp::Mul), &[&a, &b]);
        let na = a.iter().product();
        let nb = b.iter().product();
        let data = vec![random(&mut r, na, -2.0, 2.0), random(&mut r, nb, -2.0, 2.0)];
        rel(
            &format!("mul {a:?} {b:?}"),
            &mlir(&spec, &data),
            &reference(&spec, &data),
        );
        let spec = KernelSpec::new(body("(add (silu $0) $1)"), &[&a, &b]);
        rel(
            &format!("silu+ {a:?} {b:?}"),
            &mlir(&spec, &data),
            &reference(&spec, &data),
        );
    }
}

const ROWS: &[(usize, usize)] = &[
    (1, 1),
    (7, 1),
    (1, 7),
    (3, 33),
    (33, 64),
    (5, 4097),
    (700, 65),
];

#[test]
fn softmax_and_log_softmax_match_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    for &(rows, cols) in ROWS {
        let x = random(&mut r, rows * cols, -20.0, 20.0);
        for op in [Op::Softmax { axis: 1 }, Op::LogSoftmax { axis: 1 }] {
            let spec = KernelSpec::new(op.clone(), &[&[rows, cols]]);
            let data = vec![x.clone()];
            rel(
                &format!("{} {rows}x{cols}", op.name()),
                &mlir(&spec, &data),
                &reference(&spec, &data),
            );
        }
    }
    // Rank 3, and a row of -inf (NaN, as PyTorch).
    let spec = KernelSpec::new(Op::Softmax { axis: 2 }, &[&[2, 3, 33]]);
    let mut x = random(&mut r, 2 * 3 * 33, -5.0, 5.0);
    x[33..66].fill(f32::NEG_INFINITY);
    let data = vec![x];
    rel(
        "softmax rank 3",
        &mlir(&spec, &data),
        &reference(&spec, &data),
    );
}

#[test]
fn rmsnorm_and_layernorm_match_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(4);
    for &(rows, cols) in ROWS {
        let x = random(&mut r, rows * cols, -3.0, 3.0);
        let w = random(&mut r, cols, 0.5, 1.5);
        let bias = random(&mut r, cols, -1.0, 1.0);
        let spec = KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[rows, cols], &[cols]]);
        let data = vec![x.clone(), w.clone()];
        rel(
            &format!("rmsnorm {rows}x{cols}"),
            &mlir(&spec, &data),
            &reference(&spec, &data),
        );
        let spec = KernelSpec::new(
            Op::LayerNorm { eps: F64(1e-5) },
            &[&[rows, cols], &[cols], &[cols]],
        );
        let data = vec![x, w, bias];
        check(
            &format!("layernorm {rows}x{cols}"),
            &mlir(&spec, &data),
            &reference(&spec, &data),
            |_, w| 1e-5 * (w.abs() + 1.0),
        );
    }
}

#[test]
fn reductions_match_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    for (shape, axes) in [
        (vec![7, 33], vec![1]),
        (vec![7, 33], vec![0]),
        (vec![3, 4097], vec![0, 1]),
        (vec![1, 7, 33], vec![0, 2]),
        (vec![33], vec![0]),
    ] {
        let n: usize = shape.iter().product();
        let x = random(&mut r, n, -2.0, 2.0);
        for op in ReduceOp::ALL {
            for keepdim in [false, true] {
                let spec = KernelSpec::new(
                    Op::Reduce {
                        op,
                        axes: axes.clone(),
                        keepdim,
                    },
                    &[&shape],
                );
                let data = vec![x.clone()];
                let want = reference(&spec, &data);
                let total: f64 = x.iter().map(|v| f64::from(v.abs())).sum();
                check(
                    &format!("{} {shape:?} {axes:?} keepdim={keepdim}", op.name()),
                    &mlir(&spec, &data),
                    &want,
                    |_, _| match op {
                        ReduceOp::Sum | ReduceOp::Mean => 1e-5 * total,
                        ReduceOp::Max | ReduceOp::Min => 0.0,
                    },
                );
            }
        }
    }
}

/// A matmul case: batch axes of `a` and of `b`, then `m`, `n`, `k`.
type Case = (Vec<usize>, Vec<usize>, usize, usize, usize);

#[test]
fn matmul_matches_reference_for_every_transpose_and_batch() {
    let mut r = ChaCha8Rng::seed_from_u64(6);
    let cases: &[Case] = &[
        (vec![], vec![], 1, 1, 1),
        (vec![], vec![], 7, 33, 1),
        (vec![], vec![], 33, 7, 65),
        (vec![], vec![], 1, 33, 4097),
        (vec![], vec![], 130, 97, 257),
        (vec![3], vec![3], 7, 33, 5),
        (vec![2, 3], vec![1], 7, 9, 33),
        (vec![4], vec![], 65, 64, 63),
        // Big enough (> 65536 outputs) to run in parallel row / batch blocks.
        (vec![], vec![], 300, 257, 9),
        (vec![8], vec![8], 100, 100, 3),
        // Whole blocks of the CPU's `a · bᵀ` (4 × 4 dot products over 16-lane k vectors) with
        // no tail, and a decode-like row.
        (vec![], vec![], 8, 4, 32),
        (vec![], vec![], 1, 301, 768),
    ];
    for (ba, bb, m, n, k) in cases {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut sa = ba.clone();
            sa.extend(if ta { [*k, *m] } else { [*m, *k] });
            let mut sb = bb.clone();
            sb.extend(if tb { [*n, *k] } else { [*k, *n] });
            let spec = KernelSpec::new(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[&sa, &sb],
            );
            let a = random(&mut r, sa.iter().product(), -1.0, 1.0);
            let b = random(&mut r, sb.iter().product(), -1.0, 1.0);
            // Bound Σ|a||b| per output element: the product of the absolute values.
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
            let bound = reference(&spec, &[abs(&a), abs(&b)]);
            let data = vec![a, b];
            check(
                &format!("matmul {sa:?}·{sb:?} ta={ta} tb={tb}"),
                &mlir(&spec, &data),
                &reference(&spec, &data),
                |i, _| 1e-5 * f64::from(bound[i]) + 1e-30,
            );
        }
    }
}

/// `(b, hq, hkv, sq, sk, d, dv, causal, window, mask shape)`.
type AttnCase = ([usize; 7], bool, usize, Option<Vec<usize>>);

#[test]
fn attention_matches_reference_with_gqa_causal_window_and_masks() {
    let mut r = ChaCha8Rng::seed_from_u64(8);
    let cases: &[AttnCase] = &[
        ([1, 4, 4, 7, 7, 8, 8], true, 0, None),
        // Grouped-query heads, fewer queries than keys (a later chunk of a prompt).
        ([2, 8, 2, 5, 33, 16, 16], true, 0, None),
        ([1, 2, 1, 33, 33, 7, 5], true, 4, None),
        // A padding mask per batch row (with -inf keys), not causal.
        ([3, 4, 2, 9, 9, 33, 3], false, 0, Some(vec![3, 1, 1, 9])),
        // One decode query over 65 keys, a full mask.
        ([2, 4, 4, 1, 65, 8, 8], true, 0, Some(vec![2, 4, 1, 65])),
        // More queries than keys: the first ones see no key (zeros).
        ([1, 1, 1, 5, 3, 4, 4], true, 0, None),
        // Big enough (> 65536 outputs) to run in parallel batch blocks; a 2-D mask.
        ([5, 4, 4, 64, 64, 64, 64], true, 16, Some(vec![64, 64])),
        // Key tiles of the CPU kernel (16 keys): partial last tiles, head vectors of 16 and 8
        // lanes, GQA, decode, masks following the keys or broadcast along them.
        ([1, 4, 2, 7, 7, 32, 32], true, 0, None),
        ([1, 4, 2, 65, 65, 64, 64], true, 0, Some(vec![1, 1, 65, 65])),
        ([2, 8, 2, 1, 33, 64, 64], true, 0, Some(vec![2, 1, 1, 33])),
        ([1, 2, 1, 33, 33, 48, 16], true, 7, None),
        ([1, 2, 2, 17, 65, 24, 40], true, 5, Some(vec![17, 1])),
        ([1, 3, 1, 1, 1, 16, 16], false, 0, None),
    ];
    for ([b, hq, hkv, sq, sk, d, dv], causal, window, mask) in cases {
        let op = Op::Attention {
            scale: F64(1.0 / (*d as f64).sqrt()),
            causal: *causal,
            window: *window,
            merge_heads: false,
        };
        let mut shapes = vec![vec![*b, *hq, *sq, *d], vec![*b, *hkv, *sk, *d]];
        shapes.push(vec![*b, *hkv, *sk, *dv]);
        shapes.extend(mask.clone());
        let refs: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let spec = KernelSpec::new(op, &refs);
        let mut data: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| random(&mut r, s.iter().product(), -2.0, 2.0))
            .collect();
        if let Some(m) = data.get_mut(3) {
            // Some keys hidden outright; in the padding case, every key of batch row 0 (NaN
            // there, as softmax of all -inf).
            for (i, x) in m.iter_mut().enumerate() {
                if i % 5 == 3 || (*b == 3 && i < *sk) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // Bound Σ_j p_j·|v_j| per output: the result's own scale.
        let mut abs = data.clone();
        abs[2] = abs[2].iter().map(|x| x.abs()).collect();
        let bound = reference(&spec, &abs);
        check(
            &format!("attention {shapes:?} causal={causal} window={window}"),
            &mlir(&spec, &data),
            &reference(&spec, &data),
            |i, _| 1e-5 * f64::from(bound[i]) + 1e-6,
        );
    }
}

/// The dense elements `[b, h, s, d]` as a view into a buffer with `cap` positions per head
/// (the KV cache grown in place): the buffer and the view's strides.
fn in_capacity(x: &[f32], [b, h, s, d]: [usize; 4], cap: usize) -> (Vec<f32>, Vec<usize>) {
    let mut buf = vec![f32::NAN; b * h * cap * d];
    for (i, row) in x.chunks(d).enumerate() {
        let (bh, p) = (i / s, i % s);
        buf[(bh * cap + p) * d..][..d].copy_from_slice(row);
    }
    (buf, vec![h * cap * d, cap * d, d, 1])
}

#[test]
fn attention_reads_views_of_a_cache_and_copies_other_views() {
    let mut r = ChaCha8Rng::seed_from_u64(10);
    let (b, hq, hkv, d) = (2, 4, 2, 8);
    let op = Op::Attention {
        scale: F64(0.3),
        causal: true,
        window: 0,
        merge_heads: false,
    };
    let cache = KernelCache::new();
    for (sq, sk) in [(5, 5), (1, 6), (1, 17)] {
        let shapes = [[b, hq, sq, d], [b, hkv, sk, d], [b, hkv, sk, d]];
        let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let spec = KernelSpec::new(op.clone(), &refs);
        let data: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| random(&mut r, s.iter().product(), -2.0, 2.0))
            .collect();
        let (k, ks) = in_capacity(&data[1], shapes[1], 32);
        let (v, vs) = in_capacity(&data[2], shapes[2], 32);
        // q as a view too: stored [b, s, h, d] and read transposed (not a view the kernel
        // takes: copied).
        let mut qt = vec![0.0; data[0].len()];
        for (i, x) in data[0].iter().enumerate() {
            let (bi, h, p, c) = (i / (hq * sq * d), i / (sq * d) % hq, i / d % sq, i % d);
            qt[((bi * sq + p) * hq + h) * d + c] = *x;
        }
        let qs = [sq * hq * d, d, hq * d, 1];
        let views = [
            Operand {
                data: &qt,
                shape: &shapes[0],
                strides: &qs,
            },
            Operand {
                data: &k,
                shape: &shapes[1],
                strides: &ks,
            },
            Operand {
                data: &v,
                shape: &shapes[2],
                strides: &vs,
            },
        ];
        let kernel = cache.get(&spec).unwrap();
        let out = spec.output_shape().unwrap();
        let mut y = vec![f32::NAN; out.iter().product()];
        kernel.run_views(&views, &mut y, &out).unwrap();
        let mut abs = data.clone();
        abs[2] = abs[2].iter().map(|x| x.abs()).collect();
        let bound = reference(&spec, &abs);
        check(
            &format!("attention on views sq={sq} sk={sk}"),
            &y,
            &reference(&spec, &data),
            |i, _| 1e-5 * f64::from(bound[i]) + 1e-6,
        );
        // Strides reaching past the data are refused: the view reaches the last key's last
        // element, one short of that here.
        let reach = (b * hkv - 1) * 32 * d + sk * d;
        let short = Operand {
            data: &k[..reach - 1],
            ..views[1]
        };
        assert!(kernel
            .run_views(&[views[0], short, views[2]], &mut y, &out)
            .is_err());
    }
    assert_eq!(cache.compilations(), 1);
}

#[test]
fn unsupported_ops_and_bad_arguments_are_errors() {
    let e = MlirKernel::compile(&KernelSpec::new(Op::Softmax { axis: 0 }, &[&[3, 4]])).unwrap_err();
    assert!(matches!(e, MlirError::Unsupported(_)), "{e}");
    let e = MlirKernel::compile(&KernelSpec::new(
        Op::Permute { perm: vec![1, 0] },
        &[&[3, 4]],
    ))
    .unwrap_err();
    assert!(matches!(e, MlirError::Unsupported(_)), "{e}");
    // Ill-typed: the IR's typing rule says why.
    let e = MlirKernel::compile(&KernelSpec::new(Op::Binary(BinaryOp::Add), &[&[3], &[4]]))
        .unwrap_err();
    assert!(matches!(e, MlirError::Unsupported(_)), "{e}");
    let k = MlirKernel::compile(&KernelSpec::new(Op::Unary(UnaryOp::Exp), &[&[4]])).unwrap();
    let mut y = [0.0; 4];
    assert!(k.run(&[(&[0.0; 3], &[3])], &mut y, &[4]).is_err());
    assert!(k.run(&[(&[0.0; 4], &[4])], &mut y[..3], &[3]).is_err());
    assert!(k.run(&[], &mut y, &[4]).is_err());
}

#[test]
fn cache_compiles_each_key_once() {
    let cache = KernelCache::new();
    let a = KernelSpec::new(Op::Unary(UnaryOp::Exp), &[&[8]]);
    let k1 = cache.get(&a).unwrap();
    let k2 = cache.get(&a).unwrap();
    assert!(std::sync::Arc::ptr_eq(&k1, &k2));
    // Another length of the same op is the same kernel.
    let k3 = cache
        .get(&KernelSpec::new(Op::Unary(UnaryOp::Exp), &[&[33]]))
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&k1, &k3));
    assert!(cache
        .get(&KernelSpec::new(Op::Softmax { axis: 0 }, &[&[2, 2]]))
        .is_err());
    // Refused at layout, before any compilation.
    assert_eq!((cache.len(), cache.compilations()), (1, 1));
    // A bounded cache empties itself for a key beyond its limit (rmsnorm fixes its row length,
    // so each of these is a key of its own).
    let bounded = KernelCache::bounded(2);
    let specs: Vec<KernelSpec> = [1usize, 2, 3]
        .iter()
        .map(|&n| KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[1, n], &[n]]))
        .collect();
    let first = bounded.get(&specs[0]).unwrap();
    bounded.get(&specs[1]).unwrap();
    assert_eq!(bounded.len(), 2);
    bounded.get(&specs[2]).unwrap();
    assert_eq!(bounded.len(), 1);
    assert_eq!(bounded.compilations(), 3);
    // An evicted kernel still runs for whoever holds it, and is compiled anew when asked.
    let mut y = [0.0];
    first
        .run(&[(&[2.0], &[1, 1]), (&[3.0], &[1])], &mut y, &[1, 1])
        .unwrap();
    assert!((y[0] - 3.0).abs() < 1e-5, "{y:?}");
    assert!(!std::sync::Arc::ptr_eq(
        &first,
        &bounded.get(&specs[0]).unwrap()
    ));
    assert_eq!(bounded.compilations(), 4);
}

/// Runs every spec of `family` through one cache against the reference executor (`bound` as in
/// [`check`], given the data) and checks that they all ran on one compiled kernel.
fn one_kernel(
    r: &mut ChaCha8Rng,
    what: &str,
    family: &[KernelSpec],
    bound: impl Fn(&KernelSpec, &[Vec<f32>]) -> Vec<f64>,
) {
    let cache = KernelCache::new();
    for spec in family {
        let data: Vec<Vec<f32>> = spec
            .inputs
            .iter()
            .map(|s| random(r, s.iter().product(), -2.0, 2.0))
            .collect();
        let k = cache.get(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        let out = spec.output_shape().unwrap();
        let mut y = vec![f32::NAN; out.iter().product()];
        let ins: Vec<(&[f32], &[usize])> = data
            .iter()
            .zip(&spec.inputs)
            .map(|(d, s)| (d.as_slice(), s.as_slice()))
            .collect();
        k.run(&ins, &mut y, &out).unwrap();
        let b = bound(spec, &data);
        check(
            &format!("{what} {:?}", spec.inputs),
            &y,
            &reference(spec, &data),
            |i, _| b[i],
        );
    }
    assert_eq!(cache.compilations(), 1, "{what}: kernels compiled");
}

#[test]
fn one_kernel_serves_every_sequence_and_cache_length() {
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let rel_bound = |spec: &KernelSpec, data: &[Vec<f32>]| -> Vec<f64> {
        reference(spec, data)
            .iter()
            .map(|w| 1e-5 * f64::from(w.abs()) + 1e-6)
            .collect()
    };
    let spec = |op: &Op, shapes: &[&[usize]]| KernelSpec::new(op.clone(), shapes);
    let silu = body("(mul (silu $0) $1)");
    let lens = [1usize, 7, 33, 4097, 100_003];
    let family: Vec<_> = lens.iter().map(|&n| spec(&silu, &[&[n], &[n]])).collect();
    one_kernel(&mut r, "silu·mul", &family, rel_bound);
    // RoPE-like broadcast: [1, s, heads, d] · [s, 1, d].
    let family: Vec<_> = [1usize, 5, 64]
        .iter()
        .map(|&n| spec(&Op::Binary(BinaryOp::Mul), &[&[1, n, 4, 8], &[n, 1, 8]]))
        .collect();
    one_kernel(&mut r, "broadcast mul", &family, rel_bound);
    let softmax = Op::Softmax { axis: 2 };
    let family: Vec<_> = [(1, 1), (5, 9), (1, 4097), (300, 300)]
        .iter()
        .map(|&(q, k)| spec(&softmax, &[&[4, q, k]]))
        .collect();
    one_kernel(&mut r, "softmax", &family, rel_bound);
    let rms = Op::RmsNorm { eps: F64(1e-6) };
    let family: Vec<_> = [1usize, 7, 1000]
        .iter()
        .map(|&n| spec(&rms, &[&[1, n, 65], &[65]]))
        .collect();
    one_kernel(&mut r, "rmsnorm", &family, rel_bound);
    // Products: Σ|a||b| bounds the rounding (as in the matmul test).
    let abs_bound = |spec: &KernelSpec, data: &[Vec<f32>]| -> Vec<f64> {
        let abs: Vec<Vec<f32>> = data
            .iter()
            .map(|v| v.iter().map(|x| x.abs()).collect())
            .collect();
        reference(spec, &abs)
            .iter()
            .map(|b| 1e-5 * f64::from(*b) + 1e-6)
            .collect()
    };
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b: true,
    };
    let family: Vec<_> = [(1, 1, 1), (7, 33, 65), (300, 257, 9)]
        .iter()
        .map(|&(m, n, k)| spec(&mm, &[&[1, m, k], &[n, k]]))
        .collect();
    one_kernel(&mut r, "matmul", &family, abs_bound);
    let bmm = Op::MatMul {
        transpose_a: false,
        transpose_b: true,
    };
    let family: Vec<_> = [(1, 1), (5, 9), (64, 64)]
        .iter()
        .map(|&(q, k)| spec(&bmm, &[&[2, 3, q, 8], &[2, 3, k, 8]]))
        .collect();
    one_kernel(&mut r, "batched matmul", &family, abs_bound);
    // A prompt, then decode steps over a growing cache, with a full mask.
    let attn = Op::Attention {
        scale: F64(0.25),
        causal: true,
        window: 0,
        merge_heads: false,
    };
    let family: Vec<_> = [(9, 9), (1, 10), (1, 11), (1, 65), (64, 64)]
        .iter()
        .map(|&(q, k)| {
            spec(
                &attn,
                &[&[2, 4, q, 16], &[2, 2, k, 16], &[2, 2, k, 8], &[2, 1, q, k]],
            )
        })
        .collect();
    let v_bound = |spec: &KernelSpec, data: &[Vec<f32>]| -> Vec<f64> {
        let mut abs = data.to_vec();
        abs[2] = abs[2].iter().map(|x| x.abs()).collect();
        reference(spec, &abs)
            .iter()
            .map(|b| 1e-5 * f64::from(*b) + 1e-6)
            .collect()
    };
    one_kernel(&mut r, "attention", &family, v_bound);
}

/// `ptxas`: `$KILN_PTXAS`, else the CUDA wheel unpacked under `~/.cache/kiln/cuda`, else `PATH`.
fn ptxas() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS") {
        return Some(p.into());
    }
    let home = std::env::var_os("HOME")?;
    let cached = std::path::Path::new(&home).join(".cache/kiln/cuda/nvidia/cuda_nvcc/bin/ptxas");
    if cached.is_file() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ptxas"))
            .find(|p| p.is_file())
    })
}

#[test]
fn ptx_for_sm90_is_produced_and_assembles() {
    let specs = [
        KernelSpec::new(body("(mul (silu $0) $1)"), &[&[4097], &[4097]]),
        KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[33, 4097], &[4097]]),
        KernelSpec::new(Op::LayerNorm { eps: F64(1e-5) }, &[&[7, 33], &[33], &[33]]),
        KernelSpec::new(Op::Softmax { axis: 1 }, &[&[7, 33]]),
    ];
    let ptxas = ptxas();
    // The toolkit holding libdevice: two levels above `bin/ptxas`.
    let toolkit = ptxas
        .as_ref()
        .and_then(|p| p.parent()?.parent().map(|d| d.to_path_buf()))
        .filter(|d| d.join("nvvm/libdevice/libdevice.10.bc").is_file());
    let dir = std::env::temp_dir().join(format!("kiln-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, spec) in specs.iter().enumerate() {
        let ptx = kiln_compiler::mlir::ptx(spec, "sm_90", toolkit.as_deref());
        // rmsnorm and layernorm call `sqrt`, which only libdevice provides on the GPU.
        let needs_libdevice = matches!(spec.op, Op::RmsNorm { .. } | Op::LayerNorm { .. });
        let ptx = match (ptx, &toolkit) {
            (Ok(ptx), _) => ptx,
            (Err(MlirError::Unsupported(e)), None) if needs_libdevice => {
                assert!(e.contains("__nv_sqrtf"), "{e}");
                eprintln!(
                    "no CUDA toolkit with libdevice: {} not lowered to PTX",
                    spec.op.name()
                );
                continue;
            }
            (Err(e), _) => panic!("{spec:?}: {e}"),
        };
        for (j, ptx) in ptx.iter().enumerate() {
            assert!(ptx.contains(".target sm_90"), "{ptx}");
            assert!(ptx.contains(".entry"), "{ptx}");
            let Some(ptxas) = &ptxas else {
                eprintln!("ptxas not found (KILN_PTXAS, ~/.cache/kiln/cuda, PATH): not assembled");
                continue;
            };
            let src = dir.join(format!("k{i}_{j}.ptx"));
            std::fs::write(&src, ptx).unwrap();
            let out = std::process::Command::new(ptxas)
                .arg("-arch=sm_90")
                .arg(&src)
                .arg("-o")
                .arg(dir.join(format!("k{i}_{j}.cubin")))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ptxas rejected PTX module {j} of {spec:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    for chip in ["gfx90a", "sm_100", "sm_80a", "sm_"] {
        assert!(
            kiln_compiler::mlir::ptx(&specs[0], chip, None).is_err(),
            "{chip}"
        );
    }
}

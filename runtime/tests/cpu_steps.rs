//! The CPU backend's fused steps against the reference executor, on small graphs built to
//! trigger each fusion, at shapes including the odd sizes 1, 7 and 33: linear groups (f32,
//! bf16 and fp8 weights, one and several rows of x), linear epilogues (fp8-style per-column
//! scale, residual add, bias add), the rotate-half rotary embedding, and attention storing its
//! output permuted. Each test also checks that the plan did fuse (the step kinds it holds), so
//! a pattern that stops matching fails here rather than silently running the unfused path.
//! Tolerance: f32 within 1e-5 of the output's largest magnitude (f32 accumulation against the
//! reference's f64); bf16/fp8 operands are rounded identically on both sides, so the same.

use kiln_ir::trace::{Tensor as T, Tracer};
use kiln_ir::{DType, Dim, Expr, Op, F64};
use kiln_runtime::cpu::{CpuGraph, Step};
use kiln_runtime::reference;
use kiln_runtime::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

const SIZES: [usize; 3] = [1, 7, 33];

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_f32(shape.to_vec(), data).unwrap()
}

/// Runs `graph` on the CPU backend and the reference executor; returns the plan's steps.
fn check(
    graph: kiln_ir::Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Vec<Step> {
    let want = reference::run(&graph, inputs, params).unwrap();
    let cpu = CpuGraph::compile(vec![graph], params).unwrap().remove(0);
    for run in 0..2 {
        let got = cpu.run(inputs, params).unwrap();
        for (name, w) in &want {
            let (g, w) = (got[name].to_f64_vec(), w.to_f64_vec());
            assert_eq!(g.len(), w.len(), "{name}");
            let scale = w.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{name}[{i}] (run {run}): {a} vs {b} (scale {scale})"
                );
            }
        }
    }
    cpu.plan().steps.clone()
}

/// A weight parameter `name` `[n, k]` of `dtype` as the graph reads it (cast to f32 when
/// narrow, as precision lowering emits), with its random value.
fn weight(
    t: &Tracer,
    params: &mut HashMap<String, Tensor>,
    rng: &mut ChaCha8Rng,
    name: &str,
    dtype: DType,
    [n, k]: [usize; 2],
) -> T {
    let w = t.param(name, dtype, [n as i64, k as i64]);
    let scale = if dtype == DType::F8E4M3 { 64.0 } else { 1.0 };
    let n_k = n * k;
    let data = (0..n_k)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    let value = Tensor::from_f32(vec![n, k], data).unwrap();
    params.insert(name.into(), value.cast(dtype));
    if dtype == DType::F32 {
        w
    } else {
        w.cast(DType::F32).unwrap()
    }
}

/// `x` as a linear layer with `dtype` weights reads it: rounded to bf16 for bf16 and fp8
/// weights, as precision lowering emits.
fn rounded(x: &T, dtype: DType) -> T {
    if dtype == DType::F32 {
        x.clone()
    } else {
        x.cast(DType::BF16).unwrap().cast(DType::F32).unwrap()
    }
}

fn linear_layers(steps: &[Step]) -> Vec<usize> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Linear(l) => Some(l.len()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_linear_group_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for m in [1usize, 7] {
            for k in SIZES {
                let t = Tracer::new();
                let mut params = HashMap::new();
                let x = t.input("x", DType::F32, [m as i64, k as i64]);
                let xr = rounded(&x, dtype);
                for (j, n) in SIZES.into_iter().enumerate() {
                    let w = weight(&t, &mut params, &mut rng, &format!("w{j}"), dtype, [n, k]);
                    t.output(&format!("y{j}"), &xr.matmul_t(&w, false, true).unwrap());
                }
                let inputs = HashMap::from([("x".to_string(), random(&mut rng, &[m, k]))]);
                let steps = check(t.finish().unwrap(), &inputs, &params);
                assert_eq!(linear_layers(&steps), [3], "{dtype:?} m={m} k={k}");
            }
        }
    }
}

#[test]
fn linear_epilogues_match_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for m in SIZES {
            for (k, n) in [(7usize, 33usize), (33, 1), (1, 7)] {
                let t = Tracer::new();
                let mut params = HashMap::new();
                let x = t.input("x", DType::F32, [m as i64, k as i64]);
                let x = rounded(&x, dtype);
                let r = t.input("r", DType::F32, [m as i64, n as i64]);
                let w = weight(&t, &mut params, &mut rng, "w", dtype, [n, k]);
                let w2 = weight(&t, &mut params, &mut rng, "w2", dtype, [n, k]);
                // (x · Wᵀ) · s + r, with s a [n, 1] parameter read as [n] (fp8's scales).
                let s = t.param("s", DType::F32, [n as i64, 1]);
                params.insert("s".into(), random(&mut rng, &[n, 1]));
                let s = s.reshape(&[Dim::fixed(n as i64)]).unwrap();
                let y = x.matmul_t(&w, false, true).unwrap();
                let y = y.mul(&s).unwrap().add(&r).unwrap();
                t.output("scaled_residual", &y);
                // x · W2ᵀ + b, b a [n] bias.
                let b = t.param("b", DType::F32, [n as i64]);
                params.insert("b".into(), random(&mut rng, &[n]));
                let z = x.matmul_t(&w2, false, true).unwrap().add(&b).unwrap();
                t.output("bias", &z);
                let inputs = HashMap::from([
                    ("x".to_string(), random(&mut rng, &[m, k])),
                    ("r".to_string(), random(&mut rng, &[m, n])),
                ]);
                let steps = check(t.finish().unwrap(), &inputs, &params);
                // Both layers fused with their epilogues (different epilogues: two steps)
                // and no elementwise step left.
                assert_eq!(linear_layers(&steps), [1, 1], "{dtype:?} {m}x{n}x{k}");
                assert!(
                    !steps.iter().any(|s| matches!(s, Step::Fused(_))),
                    "{dtype:?} {m}x{n}x{k}: an epilogue was not fused"
                );
            }
        }
    }
}

#[test]
fn rotate_half_rope_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (b, h, s) in [(1usize, 1usize, 1usize), (2, 7, 3), (1, 3, 33)] {
        for (d, to_bf16) in [(2usize, false), (8, true), (34, false), (34, true)] {
            let t = Tracer::new();
            let dims = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
            let x0 = t.input("x", DType::F32, dims(&[b, s, h, d]));
            let cos = t.input("cos", DType::F32, dims(&[b, 1, s, d]));
            let sin = t.input("sin", DType::F32, dims(&[b, 1, s, d]));
            // A computed value in a [b, h, s, d] strided view, as a projection's heads are.
            let x = x0.mul(&x0).unwrap().permute(&[0, 2, 1, 3]).unwrap();
            let half = d as i64 / 2;
            let lo = x.slice(-1, 0, half).unwrap();
            let hi = x.slice(-1, half, d as i64).unwrap();
            let rot = T::cat(&[&hi.neg().unwrap(), &lo], -1).unwrap();
            let body: Expr = "(add (mul $0 $1) (mul $2 $3))".parse().unwrap();
            let y = t
                .apply(Op::FusedElementwise { body }, &[&x, &cos, &rot, &sin])
                .unwrap();
            // A bf16 graph rounds the query for attention; the rope step does it.
            let y = if to_bf16 {
                y.cast(DType::BF16).unwrap().cast(DType::F32).unwrap()
            } else {
                y
            };
            t.output("y", &y);
            let inputs = HashMap::from([
                ("x".to_string(), random(&mut rng, &[b, s, h, d])),
                ("cos".to_string(), random(&mut rng, &[b, 1, s, d])),
                ("sin".to_string(), random(&mut rng, &[b, 1, s, d])),
            ]);
            let steps = check(t.finish().unwrap(), &inputs, &HashMap::new());
            assert!(
                steps
                    .iter()
                    .any(|s| matches!(s, Step::Rope { round_bf16, .. } if *round_bf16 == to_bf16)),
                "{b}x{h}x{s}x{d} (bf16: {to_bf16}): no rope step"
            );
            // Only x's own producer (x0²) is an elementwise step.
            let fused = steps.iter().filter(|s| matches!(s, Step::Fused(_))).count();
            assert_eq!(
                fused, 1,
                "{b}x{h}x{s}x{d}: a separate elementwise step remains"
            );
            assert!(
                !steps.iter().any(|s| matches!(s, Step::Concat | Step::Copy)),
                "{b}x{h}x{s}x{d}: the rotate-half concat is still computed"
            );
        }
    }
}

#[test]
fn attention_stored_permuted_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (b, h, q, kv, d) in [
        (1usize, 1usize, 1usize, 1usize, 1usize),
        (2, 7, 3, 7, 33),
        (1, 3, 33, 33, 7),
    ] {
        let t = Tracer::new();
        let dims = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
        let qv = t.input("q", DType::F32, dims(&[b, h, q, d]));
        let kt = t.input("k", DType::F32, dims(&[b, h, kv, d]));
        let vt = t.input("v", DType::F32, dims(&[b, h, kv, d]));
        let op = Op::Attention {
            scale: F64(0.3),
            causal: q == kv,
            window: 0,
        };
        // q² so attention reads a computed buffer, as in a model.
        let qc = qv.mul(&qv).unwrap();
        let a = t.apply(op, &[&qc, &kt, &vt]).unwrap();
        let a = a.permute(&[0, 2, 1, 3]).unwrap();
        let y = a.reshape(&[
            Dim::fixed(b as i64),
            Dim::fixed(q as i64),
            Dim::fixed((h * d) as i64),
        ]);
        // Read by an elementwise op that needs nothing strided, and by a linear layer.
        let w = t.param("w", DType::F32, [5i64, (h * d) as i64]);
        let y = y.unwrap();
        t.output("y", &y.matmul_t(&w, false, true).unwrap());
        let params = HashMap::from([("w".to_string(), random(&mut rng, &[5, h * d]))]);
        let inputs = HashMap::from([
            ("q".to_string(), random(&mut rng, &[b, h, q, d])),
            ("k".to_string(), random(&mut rng, &[b, h, kv, d])),
            ("v".to_string(), random(&mut rng, &[b, h, kv, d])),
        ]);
        let steps = check(t.finish().unwrap(), &inputs, &params);
        assert!(
            steps
                .iter()
                .any(|s| matches!(s, Step::Attention { bshd: true, .. })),
            "{b}x{h}x{q}x{kv}x{d}: attention not stored permuted"
        );
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Copy)),
            "{b}x{h}x{q}x{kv}x{d}: a copy remains"
        );
    }
}

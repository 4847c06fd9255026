//! The CPU backend's fused steps against the reference executor, on small graphs built to
//! trigger each fusion, at shapes including the odd sizes 1, 7 and 33: linear groups (f32,
//! bf16 and fp8 weights, one and several rows of x), linear epilogues (the `linear` op's
//! fp8-style per-column scale, residual add, bias add), the rotate-half rotary embedding, and attention storing its
//! output permuted. Each test also checks that the plan did fuse (the step kinds it holds), so
//! a pattern that stops matching fails here rather than silently running the unfused path.
//! Tolerance: f32 within 1e-5 of the output's largest magnitude (f32 accumulation against the
//! reference's f64); bf16/fp8 operands are rounded identically on both sides, so the same.

use kiln_ir::trace::{Tensor as T, Tracer};
use kiln_ir::{DType, Dim, Expr, Op, F64};
use kiln_runtime::cpu::{CpuGraph, MoeWeight, Step};
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
    let scale = if dtype == DType::F8E4M3 { 64.0 } else { 1.0 };
    let data = (0..n * k)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    declare_weight(
        t,
        params,
        name,
        dtype,
        Tensor::from_f32(vec![n, k], data).unwrap(),
    )
}

/// A weight parameter `name` of `dtype` with the f32 `value` (cast to `dtype`), as the graph
/// reads it (cast to f32 when narrow).
fn declare_weight(
    t: &Tracer,
    params: &mut HashMap<String, Tensor>,
    name: &str,
    dtype: DType,
    value: Tensor,
) -> T {
    let dims: Vec<i64> = value.shape().iter().map(|&d| d as i64).collect();
    let w = t.param(name, dtype, dims);
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

/// `x · Wᵀ`, then `* scale` and `+ add` as the optimizer's `linear` op when there is one.
fn linear(t: &Tracer, x: &T, w: &T, scale: Option<&T>, add: Option<&T>) -> T {
    if scale.is_none() && add.is_none() {
        return x.matmul_t(w, false, true).unwrap();
    }
    let op = Op::Linear {
        transpose_b: true,
        scaled: scale.is_some(),
        added: add.is_some(),
        heads: 0,
        rotary: false,
    };
    let operands: Vec<&T> = [Some(x), Some(w), scale, add]
        .into_iter()
        .flatten()
        .collect();
    t.apply(op, &operands).unwrap()
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
                let y = linear(&t, &x, &w, Some(&s), Some(&r));
                t.output("scaled_residual", &y);
                // x · W2ᵀ + b, b a [n] bias.
                let b = t.param("b", DType::F32, [n as i64]);
                params.insert("b".into(), random(&mut rng, &[n]));
                let z = linear(&t, &x, &w2, None, Some(&b));
                t.output("bias", &z);
                let inputs = HashMap::from([
                    ("x".to_string(), random(&mut rng, &[m, k])),
                    ("r".to_string(), random(&mut rng, &[m, n])),
                ]);
                let steps = check(t.finish().unwrap(), &inputs, &params);
                // Both layers computed with their epilogues (different epilogues: two
                // steps), no elementwise step.
                assert_eq!(linear_layers(&steps), [1, 1], "{dtype:?} {m}x{n}x{k}");
                assert!(
                    !steps.iter().any(|s| matches!(s, Step::Fused(_))),
                    "{dtype:?} {m}x{n}x{k}: an epilogue was not fused"
                );
            }
        }
    }
}

/// A `linear` op whose scale is computed (not a parameter the kernel reads prepared) or whose
/// weight is an activation runs the reference executor's op, with its result.
#[test]
fn linear_ops_without_a_kernel_run_the_reference_op() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for computed_weight in [false, true] {
        let t = Tracer::new();
        let mut params = HashMap::new();
        let x = t.input("x", DType::F32, [3, 7]);
        let r = t.input("r", DType::F32, [3, 5]);
        let s = t.input("s", DType::F32, [5]).exp().unwrap();
        let w = weight(&t, &mut params, &mut rng, "w", DType::F32, [5, 7]);
        let w = if computed_weight { w.neg().unwrap() } else { w };
        let scale = (!computed_weight).then_some(&s);
        t.output("y", &linear(&t, &x, &w, scale, Some(&r)));
        let inputs = HashMap::from([
            ("x".to_string(), random(&mut rng, &[3, 7])),
            ("r".to_string(), random(&mut rng, &[3, 5])),
            ("s".to_string(), random(&mut rng, &[5])),
        ]);
        let steps = check(t.finish().unwrap(), &inputs, &params);
        assert!(linear_layers(&steps).is_empty(), "{steps:?}");
        assert!(steps.iter().any(|s| matches!(s, Step::Reference)));
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
            let y = t.apply(Op::Rotary, &[&x, &cos, &sin]).unwrap();
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
            merge_heads: false,
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

/// Values `j/8` with `|j| ≤ 8`, as an f32 tensor: exact in bf16 and e4m3, with products and
/// short sums exact in f32, so values the graph rounds to bf16 round the same here and in the
/// reference (random f32 data would let the order of additions flip a rounding).
fn eighths(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| rng.random_range(-8i32..=8) as f32 / 8.0)
        .collect();
    Tensor::from_f32(shape.to_vec(), data).unwrap()
}

/// A weight `[n, k]` of `dtype` with values from [`eighths`], as the graph reads it.
fn exact_weight(
    t: &Tracer,
    params: &mut HashMap<String, Tensor>,
    rng: &mut ChaCha8Rng,
    name: &str,
    dtype: DType,
    [n, k]: [usize; 2],
) -> T {
    declare_weight(t, params, name, dtype, eighths(rng, &[n, k]))
}

/// `x` `[b, s, h·d]` split into heads `[b, h, s, d]`, as the Hugging Face attention does.
fn heads(x: &T, [b, s, h, d]: [usize; 4]) -> T {
    let dims: Vec<Dim> = [b, s, h, d].iter().map(|&v| Dim::fixed(v as i64)).collect();
    x.reshape(&dims).unwrap().permute(&[0, 2, 1, 3]).unwrap()
}

/// `x·cos + rotate_half(x)·sin` as the optimizer leaves the Llama family's RoPE.
fn rotary(t: &Tracer, x: &T, cos: &T, sin: &T) -> T {
    t.apply(Op::Rotary, &[x, cos, sin]).unwrap()
}

/// A Llama attention block's decode graph as precision lowering emits it for `dtype` weights:
/// Q/K/V projections of x (`[1, s, k]`), heads, RoPE on q and k, q (and for narrow weights k
/// and v) rounded to bf16, k and v appended to the caches `past.key` / `past.value`
/// (`[1, kv_heads, past, d]`, bf16 for narrow weights) as graph outputs, and attention. With
/// `extra`, the v heads are also an output before rounding (a pattern the fusions must not
/// take).
#[allow(clippy::too_many_arguments)]
fn attention_block(
    rng: &mut ChaCha8Rng,
    params: &mut HashMap<String, Tensor>,
    dtype: DType,
    s: usize,
    k: usize,
    [h, kvh, d]: [usize; 3],
    extra: bool,
) -> kiln_ir::Graph {
    let t = Tracer::new();
    let narrow = dtype != DType::F32;
    let cache = if narrow { DType::BF16 } else { DType::F32 };
    let past = Dim::sym("past");
    let cache_dims = || {
        vec![
            Dim::fixed(1),
            Dim::fixed(kvh as i64),
            past.clone(),
            Dim::fixed(d as i64),
        ]
    };
    let past_k = t.input("past.key", cache, cache_dims());
    let past_v = t.input("past.value", cache, cache_dims());
    let x = t.input("x", DType::F32, [1, s as i64, k as i64]);
    let cos = t.input("cos", DType::F32, [1, 1, s as i64, d as i64]);
    let sin = t.input("sin", DType::F32, [1, 1, s as i64, d as i64]);
    let xr = rounded(&x, dtype);
    let mut proj = |name: &str, n: usize| {
        let w = exact_weight(&t, params, rng, name, dtype, [n * d, k]);
        xr.matmul_t(&w, false, true).unwrap()
    };
    let (q, kk, v) = (proj("q", h), proj("k", kvh), proj("v", kvh));
    let q = rotary(&t, &heads(&q, [1, s, h, d]), &cos, &sin);
    let kk = rotary(&t, &heads(&kk, [1, s, kvh, d]), &cos, &sin);
    let v = heads(&v, [1, s, kvh, d]);
    if extra {
        t.output("v.heads", &v);
    }
    let (q, kk, v) = if narrow {
        (
            q.cast(DType::BF16).unwrap().cast(DType::F32).unwrap(),
            kk.cast(DType::BF16).unwrap(),
            v.cast(DType::BF16).unwrap(),
        )
    } else {
        (q, kk, v)
    };
    let present_k = T::cat(&[&past_k, &kk], 2).unwrap();
    let present_v = T::cat(&[&past_v, &v], 2).unwrap();
    let op = Op::Attention {
        scale: F64(0.25),
        causal: false,
        window: 0,
        merge_heads: false,
    };
    let wide = |c: &T| c.cast(DType::F32).unwrap();
    let a = t
        .apply(op, &[&q, &wide(&present_k), &wide(&present_v)])
        .unwrap();
    t.output("a", &a);
    t.output("present.key", &present_k);
    t.output("present.value", &present_v);
    t.finish().unwrap()
}

fn close(got: &Tensor, want: &Tensor, what: &str) {
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    assert_eq!(got.shape(), want.shape(), "{what}");
    let scale = w.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}]: {a} vs {b}");
    }
}

/// The QKV group with RoPE on q and k in its epilogue, bf16 rounding of q, k and v for narrow
/// weights, and the KV-cache appends done by the group step: one linear step of three layers
/// and nothing else but attention, against the reference executor over a first run (from host
/// caches) of 1, 7 or 33 new tokens then three one-token decode steps fed the caches the
/// previous run returned (appended in place: the capacity does not change).
#[test]
fn a_qkv_group_with_rope_rounding_and_cache_appends_matches_the_reference() {
    use kiln_runtime::cpu::state::CpuState;
    use kiln_runtime::Value;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for s in SIZES {
            for k in SIZES {
                let dims = [3usize, 1, 8];
                let [_, kvh, d] = dims;
                let what = format!("{dtype:?} s={s} k={k}");
                let cache = if dtype == DType::F32 {
                    DType::F32
                } else {
                    DType::BF16
                };
                let mut params = HashMap::new();
                let first = attention_block(&mut rng, &mut params, dtype, s, k, dims, false);
                // The decode graph: the same weights, one new token.
                let mut again = HashMap::new();
                let mut same = ChaCha8Rng::seed_from_u64(0);
                let step = attention_block(&mut same, &mut again, dtype, 1, k, dims, false);
                let cpu = CpuGraph::compile(vec![first.clone(), step.clone()], &params).unwrap();
                for g in &cpu {
                    let steps = &g.plan().steps;
                    let groups: Vec<_> = steps
                        .iter()
                        .filter_map(|s| match s {
                            Step::Linear(l) => Some(l.clone()),
                            _ => None,
                        })
                        .collect();
                    assert_eq!(groups.len(), 1, "{what}: {}", g.plan());
                    let layers = &groups[0];
                    assert_eq!(layers.len(), 3, "{what}");
                    let narrow = dtype != DType::F32;
                    for l in layers.iter() {
                        let (rope, round) = (l.rope.is_some(), l.round_bf16);
                        match l.weight.as_str() {
                            "q" => assert!(rope && round == narrow && l.append.is_none(), "{what}"),
                            "k" => assert!(rope && round == narrow && l.append.is_some(), "{what}"),
                            _ => assert!(!rope && round == narrow && l.append.is_some(), "{what}"),
                        }
                        assert_eq!(l.heads, Some(d), "{what}");
                    }
                    let others = steps.iter().filter(|s| {
                        !matches!(
                            s,
                            Step::Source
                                | Step::Skip
                                | Step::Grouped
                                | Step::Alias
                                | Step::View
                                | Step::Linear(_)
                                | Step::Attention { .. }
                        )
                    });
                    assert_eq!(others.count(), 0, "{what}: {}", g.plan());
                }
                let mut want_k = eighths(&mut rng, &[1, kvh, 7, d]).cast(cache);
                let mut want_v = eighths(&mut rng, &[1, kvh, 7, d]).cast(cache);
                let (mut got_k, mut got_v) =
                    (Value::Host(want_k.clone()), Value::Host(want_v.clone()));
                let mut capacity = None;
                for (run, (graph, plan)) in [
                    (&first, &cpu[0]),
                    (&step, &cpu[1]),
                    (&step, &cpu[1]),
                    (&step, &cpu[1]),
                ]
                .into_iter()
                .enumerate()
                {
                    let n = if run == 0 { s } else { 1 };
                    let x = eighths(&mut rng, &[1, n, k]);
                    let cos = eighths(&mut rng, &[1, 1, n, d]);
                    let sin = eighths(&mut rng, &[1, 1, n, d]);
                    let host = HashMap::from([
                        ("x".to_string(), x),
                        ("cos".to_string(), cos),
                        ("sin".to_string(), sin),
                    ]);
                    let mut inputs = host.clone();
                    inputs.insert("past.key".into(), want_k.clone());
                    inputs.insert("past.value".into(), want_v.clone());
                    let want = reference::run(graph, &inputs, &params).unwrap();
                    let mut values: HashMap<String, Value> =
                        host.into_iter().map(|(k, v)| (k, Value::Host(v))).collect();
                    values.insert("past.key".into(), got_k);
                    values.insert("past.value".into(), got_v);
                    let mut got = plan.run_values(values, &params, None).unwrap();
                    let what = format!("{what} run {run}");
                    close(
                        &got.remove("a").unwrap().into_host().unwrap(),
                        &want["a"],
                        &what,
                    );
                    got_k = got.remove("present.key").unwrap();
                    got_v = got.remove("present.value").unwrap();
                    for (v, name) in [(&got_k, "present.key"), (&got_v, "present.value")] {
                        assert_eq!(v.clone().into_host().unwrap(), want[name], "{what} {name}");
                    }
                    let Value::Device(state) = &got_k else {
                        panic!("{what}: the key cache is not a state");
                    };
                    let c = state
                        .as_any()
                        .downcast_ref::<CpuState>()
                        .unwrap()
                        .capacity();
                    if run > 0 {
                        assert_eq!(
                            *capacity.get_or_insert(c),
                            c,
                            "{what}: not appended in place"
                        );
                    }
                    want_k = want["present.key"].clone();
                    want_v = want["present.value"].clone();
                }
            }
        }
    }
}

/// Where a head view has another reader (here v's heads are also an output before their
/// rounding), v keeps its separate steps and stays correct; q and k still fuse.
#[test]
fn a_head_view_with_another_reader_is_not_fused() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for dtype in [DType::F32, DType::BF16] {
        let mut params = HashMap::new();
        let g = attention_block(&mut rng, &mut params, dtype, 7, 33, [2, 2, 8], true);
        let cache = if dtype == DType::F32 {
            DType::F32
        } else {
            DType::BF16
        };
        let inputs = HashMap::from([
            ("x".to_string(), eighths(&mut rng, &[1, 7, 33])),
            ("cos".to_string(), eighths(&mut rng, &[1, 1, 7, 8])),
            ("sin".to_string(), eighths(&mut rng, &[1, 1, 7, 8])),
            (
                "past.key".to_string(),
                eighths(&mut rng, &[1, 2, 5, 8]).cast(cache),
            ),
            (
                "past.value".to_string(),
                eighths(&mut rng, &[1, 2, 5, 8]).cast(cache),
            ),
        ]);
        let steps = check(g, &inputs, &params);
        let layers: Vec<_> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Linear(l) => Some(l.clone()),
                _ => None,
            })
            .flat_map(|l| l.to_vec())
            .collect();
        let v = layers.iter().find(|l| l.weight == "v").unwrap();
        assert!(v.heads.is_none() && v.append.is_none(), "{dtype:?}");
        assert!(
            layers.iter().filter(|l| l.rope.is_some()).count() == 2,
            "{dtype:?}: q and k lost their RoPE"
        );
        assert!(steps.iter().any(|s| matches!(s, Step::Concat)), "{dtype:?}");
    }
}

/// `silu(x·Gᵀ) · (x·Uᵀ)` (each scaled per column for fp8, as the optimizer leaves it) is one
/// linear layer with a gate; a gate also read elsewhere is not fused (and stays correct).
#[test]
fn swiglu_as_a_gated_linear_layer_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for m in SIZES {
            for (k, n) in [(7usize, 33usize), (33, 1), (1, 7)] {
                for shared_gate in [false, true] {
                    let t = Tracer::new();
                    let mut params = HashMap::new();
                    let x = t.input("x", DType::F32, [m as i64, k as i64]);
                    let xr = rounded(&x, dtype);
                    let mut proj = |name: &str| {
                        let w = weight(&t, &mut params, &mut rng, name, dtype, [n, k]);
                        if dtype != DType::F8E4M3 {
                            return linear(&t, &xr, &w, None, None);
                        }
                        let s = t.param(&format!("{name}.scale"), DType::F32, [n as i64]);
                        params.insert(format!("{name}.scale"), random(&mut rng, &[n]));
                        linear(&t, &xr, &w, Some(&s), None)
                    };
                    let (g, u) = (proj("gate"), proj("up"));
                    let body: Expr = "(mul (silu $0) $1)".parse().unwrap();
                    let y = t.apply(Op::FusedElementwise { body }, &[&g, &u]).unwrap();
                    t.output("y", &y);
                    if shared_gate {
                        t.output("g", &g);
                    }
                    let inputs = HashMap::from([("x".to_string(), random(&mut rng, &[m, k]))]);
                    let steps = check(t.finish().unwrap(), &inputs, &params);
                    let what = format!("{dtype:?} {m}x{n}x{k} shared gate: {shared_gate}");
                    let gated = steps.iter().any(
                        |s| matches!(s, Step::Linear(l) if l.iter().any(|l| l.gate.is_some())),
                    );
                    let fused = steps.iter().any(|s| matches!(s, Step::Fused(_)));
                    assert_eq!((gated, fused), (!shared_gate, shared_gate), "{what}");
                }
            }
        }
    }
}

/// A mixture-of-experts block as precision lowering emits it (every weight `cast(w, f32)`,
/// fp8 ones times a per-row scale `[rows, 1]`): the moe step widens the narrow parameters
/// itself (no cast or scale step is computed) and matches the reference executor at 1, 7 and
/// 33 tokens, with f32, bf16 and fp8 weights.
#[test]
fn moe_with_narrow_weights_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (h, inter, experts) = (16usize, 24usize, 4usize);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for tokens in SIZES {
            let t = Tracer::new();
            let mut params = HashMap::new();
            let x = t.input("x", DType::F32, [tokens as i64, h as i64]);
            let mut w = |name: &str, shape: [usize; 2]| {
                let v = weight(&t, &mut params, &mut rng, name, dtype, shape);
                if dtype != DType::F8E4M3 {
                    return v;
                }
                let scale = format!("{name}.scale");
                let s = t.param(&scale, DType::F32, [shape[0] as i64, 1]);
                let factors = (0..shape[0]).map(|r| 1.0 / (64.0 + r as f32)).collect();
                params.insert(scale, Tensor::from_f32(vec![shape[0], 1], factors).unwrap());
                v.mul(&s).unwrap()
            };
            let mut operands = vec![x.clone(), w("gate", [experts, h])];
            for e in 0..experts {
                operands.push(w(&format!("w1.{e}"), [inter, h]));
                operands.push(w(&format!("w3.{e}"), [inter, h]));
                operands.push(w(&format!("w2.{e}"), [h, inter]));
            }
            let refs: Vec<&T> = operands.iter().collect();
            let y = t.apply(Op::Moe { top_k: 2 }, &refs).unwrap();
            t.output("y", &y);
            let inputs = HashMap::from([("x".to_string(), random(&mut rng, &[tokens, h]))]);
            let steps = check(t.finish().unwrap(), &inputs, &params);
            let what = format!("{dtype} tokens={tokens}");
            let Some(Step::Moe { weights, .. }) =
                steps.iter().find(|s| matches!(s, Step::Moe { .. }))
            else {
                panic!("{what}: no moe step");
            };
            let narrow = weights
                .iter()
                .all(|w| matches!(w, MoeWeight::Narrow { scale, .. } if scale.is_some() == (dtype == DType::F8E4M3)));
            assert_eq!(narrow, dtype != DType::F32, "{what}: {weights:?}");
            let computed = steps
                .iter()
                .filter(|s| !matches!(s, Step::Source | Step::Skip | Step::Moe { .. }))
                .count();
            assert_eq!(computed, 0, "{what}: {steps:?}");
        }
    }
}

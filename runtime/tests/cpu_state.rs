//! The CPU backend's KV cache kept between runs ([`kiln_runtime::cpu::state`]): a decode-like
//! graph (`present = concat(past, k)` read by attention and output) run for many steps with
//! each step's `present` fed back as the next `past`, against the reference executor on the
//! same values concatenated as host tensors. The cache must come back as a state that grows in
//! place (its capacity changes only when it doubles), for f32 and bf16-declared caches, batch
//! 1 and 2, and stay correct when the caller still holds the previous value (then it is
//! copied, not overwritten); a bf16 cache is stored as bf16. Tolerance: 1e-5 of the output's largest magnitude (f32
//! accumulation against the reference's f64); the cache itself must be equal.

use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op, F64};
use kiln_runtime::cpu::state::CpuState;
use kiln_runtime::cpu::CpuGraph;
use kiln_runtime::reference::{self, NoParams};
use kiln_runtime::{Tensor, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

const HEADS: i64 = 2;
const DIM: i64 = 4;

/// `present = concat(past, x²)` along the sequence axis, `a = attention(q, present, present)`.
fn decode_graph(cache: DType) -> kiln_ir::Graph {
    let t = Tracer::new();
    let batch = kiln_ir::Dim::sym("batch");
    let dims = |len: kiln_ir::Dim| {
        vec![
            batch.clone(),
            kiln_ir::Dim::fixed(HEADS),
            len,
            kiln_ir::Dim::fixed(DIM),
        ]
    };
    let past = t.input("past", cache, dims(kiln_ir::Dim::sym("past")));
    let x = t.input("x", DType::F32, dims(kiln_ir::Dim::fixed(1)));
    let q = t.input("q", DType::F32, dims(kiln_ir::Dim::fixed(1)));
    // The new keys are computed (so they sit in a buffer), rounded as the cache's dtype.
    let mut k = x.mul(&x).unwrap();
    if cache != DType::F32 {
        k = k.cast(cache).unwrap();
    }
    let present = kiln_ir::trace::Tensor::cat(&[&past, &k], 2).unwrap();
    let wide = present.cast(DType::F32).unwrap();
    let op = Op::Attention {
        scale: F64(0.5),
        causal: false,
        window: 0,
        merge_heads: false,
    };
    t.output("a", &t.apply(op, &[&q, &wide, &wide]).unwrap());
    t.output("present", &present);
    t.finish().unwrap()
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_f32(shape.to_vec(), data).unwrap()
}

fn close(got: &Tensor, want: &Tensor, what: &str) {
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    assert_eq!(got.shape(), want.shape(), "{what}");
    let scale = w.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}]: {a} vs {b}");
    }
}

/// Runs `steps` decode steps from a prompt cache of `prompt` positions; with `hold`, the
/// caller keeps every previous cache value alive (so it may not be reused in place).
fn run_steps(cache: DType, batch: usize, prompt: usize, steps: usize, hold: bool) {
    let graph = decode_graph(cache);
    let cpu = CpuGraph::compile(vec![graph.clone()], &NoParams)
        .unwrap()
        .remove(0);
    let mut rng = ChaCha8Rng::seed_from_u64(batch as u64 * 100 + prompt as u64);
    let (h, d) = (HEADS as usize, DIM as usize);
    let start = random(&mut rng, &[batch, h, prompt, d]).cast(cache);
    let (mut past, mut want_past) = (Value::Host(start.clone()), start);
    let mut capacities = Vec::new();
    let mut held = Vec::new();
    for step in 0..steps {
        let x = random(&mut rng, &[batch, h, 1, d]);
        let q = random(&mut rng, &[batch, h, 1, d]);
        let inputs = HashMap::from([
            ("past".to_string(), want_past.clone()),
            ("x".to_string(), x.clone()),
            ("q".to_string(), q.clone()),
        ]);
        let want = reference::run(&graph, &inputs, &NoParams).unwrap();
        if hold {
            held.push((past.clone(), past.clone().into_host().unwrap()));
        }
        let mut got = cpu
            .run_values(
                HashMap::from([
                    ("past".to_string(), past),
                    ("x".to_string(), Value::Host(x)),
                    ("q".to_string(), Value::Host(q)),
                ]),
                &NoParams,
                None,
            )
            .unwrap();
        let what = format!("{cache} batch {batch} step {step}");
        close(
            &got.remove("a").unwrap().into_host().unwrap(),
            &want["a"],
            &what,
        );
        past = got.remove("present").unwrap();
        let Value::Device(d) = &past else {
            panic!("{what}: the cache came back as a host tensor");
        };
        let state = d.as_any().downcast_ref::<CpuState>().unwrap();
        capacities.push(state.capacity());
        // A bf16 cache is stored as bf16 (half the bytes decode attention reads).
        assert_eq!(state.is_narrow(), cache == DType::BF16, "{what}");
        assert_eq!(past.dtype(), cache, "{what}");
        assert_eq!(past.clone().into_host().unwrap(), want["present"], "{what}");
        want_past = want["present"].clone();
    }
    // The capacity only ever doubles: one new buffer on the first step, then in place.
    let grown = capacities.windows(2).filter(|w| w[0] != w[1]).count();
    let len = prompt + steps;
    assert!(capacities.iter().all(|&c| c > prompt));
    assert!(
        grown <= (len as f64 / 64.0).log2().ceil().max(0.0) as usize,
        "capacities {capacities:?}"
    );
    // Held values are still the caches they were.
    for (i, (v, then)) in held.into_iter().enumerate() {
        assert_eq!(&v.into_host().unwrap(), &then, "held cache {i} changed");
    }
}

#[test]
fn the_cache_grows_in_place_and_matches_the_reference() {
    for cache in [DType::F32, DType::BF16] {
        for batch in [1, 2] {
            run_steps(cache, batch, 7, 80, false);
        }
    }
    run_steps(DType::F32, 1, 1, 3, false);
}

#[test]
fn a_cache_the_caller_still_holds_is_copied_not_overwritten() {
    run_steps(DType::BF16, 2, 5, 20, true);
    // A held state must keep its values after a later step appended to a copy.
    let graph = decode_graph(DType::F32);
    let cpu = CpuGraph::compile(vec![graph], &NoParams).unwrap().remove(0);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let step = |past: Value, rng: &mut ChaCha8Rng| {
        cpu.run_values(
            HashMap::from([
                ("past".to_string(), past),
                ("x".to_string(), Value::Host(random(rng, &[1, 2, 1, 4]))),
                ("q".to_string(), Value::Host(random(rng, &[1, 2, 1, 4]))),
            ]),
            &NoParams,
            Some(&["present"]),
        )
        .unwrap()
        .remove("present")
        .unwrap()
    };
    let first = step(Value::Host(random(&mut rng, &[1, 2, 3, 4])), &mut rng);
    let before = first.clone().into_host().unwrap();
    let Value::Device(shared) = &first else {
        panic!("not a state")
    };
    let keep: Arc<dyn kiln_runtime::DeviceValue> = shared.clone();
    let second = step(first, &mut rng);
    assert_eq!(keep.to_host().unwrap(), before);
    assert_eq!(second.shape(), &[1, 2, 5, 4]);
}

//! Helpers shared by the kernel tests: seeded random data, f32 tensors, running a traced graph
//! on the reference executor, the instruction-set levels to test, and tolerance checks.
#![allow(dead_code)] // each test binary uses a subset

use kiln_ir::trace::Tracer;
use kiln_kernels::Isa;
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

pub fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
}

/// Runs a finished graph on named f32/bf16 inputs; returns output "y" as f32.
pub fn eval(t: &Tracer, inputs: Vec<(&str, Tensor)>) -> Vec<f32> {
    let g = t.finish().unwrap();
    let inputs: HashMap<String, Tensor> = inputs.into_iter().map(|(k, v)| (k.into(), v)).collect();
    let out = run(&g, &inputs, &NoParams).unwrap();
    out["y"].as_f32().unwrap().to_vec()
}

pub fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

pub fn assert_rel(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (f64::from(*g) - f64::from(*w)).abs();
        let ok = d <= 1e-5 * f64::from(*w).abs() + 1e-30 || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

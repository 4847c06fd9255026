//! Helpers shared by the family tests: fixture paths, JSON id lists, and the comparison with
//! transformers' outputs.

// Each test crate uses a subset of these.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Tolerance (max abs) against transformers' f32 outputs: both sides f32, different summation
/// orders.
pub const TOL: f64 = 1e-4;

/// `tests/fixtures/hf/<name>` at the workspace root.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(name)
}

/// A JSON list of integers (token ids, masks).
pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Largest absolute difference, in f64.
pub fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

//! Test helpers shared by the unit tests and the integration tests (which include this file
//! with `#[path]`): random tensors for a graph's sources and the output comparison.

use kiln_ir::{DType, TensorType};
use kiln_runtime::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Maximum relative difference allowed between an optimized graph's outputs and the original's.
pub const TOLERANCE: f64 = 1e-5;

/// A tensor of type `ty` (fixed shape) with uniform elements in `[-1, 1)` (f32) or `[0, 4)`
/// (integers).
pub fn random_tensor(rng: &mut ChaCha8Rng, ty: &TensorType) -> Tensor {
    let shape: Vec<usize> = ty
        .shape
        .iter()
        .map(|d| d.as_fixed().expect("a fixed shape") as usize)
        .collect();
    let n = shape.iter().product();
    match ty.dtype {
        DType::F32 => {
            Tensor::from_f32(shape, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
        }
        DType::I64 => Tensor::from_i64(shape, (0..n).map(|_| rng.random_range(0..4)).collect()),
        other => panic!("no random {other} tensors"),
    }
    .expect("shape and data agree")
}

/// Asserts that `got` has the outputs of `want` with equal shapes and elements within
/// [`TOLERANCE`] of the largest magnitude of each output (NaN matches NaN).
pub fn assert_close(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    assert_eq!(got.len(), want.len());
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape(), w.shape(), "{name}");
        let scale = (0..w.numel())
            .map(|i| w.get(i).as_f64().abs())
            .filter(|x| x.is_finite())
            .fold(f64::MIN_POSITIVE, f64::max);
        for i in 0..w.numel() {
            let (a, b) = (g.get(i).as_f64(), w.get(i).as_f64());
            let same = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= TOLERANCE * scale;
            assert!(same, "{name}[{i}]: {a} vs {b} (scale {scale})");
        }
    }
}

//! Helpers shared by the root integration tests: fixture paths, transformers' reference
//! outputs, running the `kiln` binary, and reading safetensors files it writes.

// Each test crate uses a subset of these.
#![allow(dead_code)]

use kiln::runtime::weights::Checkpoint;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `tests/fixtures/hf/<name>`, under `KILN_REPO` when set (test binaries carried to another
/// machine, as `scripts/gpu-check` does), else under the repository this was built in.
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("KILN_REPO").map_or_else(|| PathBuf::from(ROOT), PathBuf::from);
    root.join("tests/fixtures/hf").join(name)
}

/// The fixture's `reference.json` (transformers' outputs).
pub fn reference_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `reference.json` and the tensors of `reference.safetensors`.
pub fn reference(name: &str) -> (Value, Checkpoint) {
    let tensors = Checkpoint::open(&fixture(name).join("reference.safetensors")).unwrap();
    (reference_json(name), tensors)
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Runs the `kiln` binary from the repository root.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run kiln")
}

/// Asserts that `kiln args` exits with 2, without panicking, and says every fragment.
pub fn refused(args: &[&str], fragments: &[&str]) {
    let o = kiln(args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    for f in fragments {
        assert!(e.contains(f), "{args:?}: expected {f:?} in: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

/// Shape and values of the f32 tensor `name` of a safetensors file.
pub fn f32_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

/// The largest |a − b| over two equally long slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The index of the largest value (the first of equals).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

//! Heap allocations per decode step (issue 5's "no allocation inside the decode loop") of a
//! causal LM in f32, bf16 and fp8, counted on every thread by a global allocator around
//! `System` (`tests/common/allocations.rs`, which `tests/decode_allocations.rs` also uses to
//! bound them on the Llama fixture): the fewest over 8 steps after 3 warm-up steps; and the
//! generation loop's for 24 more new tokens (greedy, and sampling). The model
//! is the tiny Llama fixture, or the directory in `KILN_BENCH_MODEL`.
//!
//! `KILN_BENCH_MODEL=~/.cache/kiln/llama125m cargo bench --bench decode_allocations`

#[path = "../tests/common/allocations.rs"]
mod allocations;

use allocations::{per_generated, per_step, PRECISIONS};
use std::path::{Path, PathBuf};

fn main() {
    let dir = std::env::var_os("KILN_BENCH_MODEL").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama"),
        PathBuf::from,
    );
    if !dir.is_dir() {
        eprintln!(
            "decode_allocations: {} is not a model directory (set KILN_BENCH_MODEL to one)",
            dir.display()
        );
        std::process::exit(2);
    }
    for precision in PRECISIONS {
        let n = per_step(&dir, precision, 3, 8);
        println!(
            "{} {}: {n} allocations per decode step",
            dir.display(),
            precision.name()
        );
    }
    for sample in [false, true] {
        let n = per_generated(&dir, PRECISIONS[0], sample, 8, 24);
        println!(
            "{} f32, sample {sample}: {n} allocations of the generation loop for 24 more tokens",
            dir.display()
        );
    }
}

//! The reference executor on the tiny Llama fixture (`tests/fixtures/hf/llama`: 2 layers, hidden
//! 32, vocabulary 320): prefill of a 34-token prompt, and the same followed by 24 decode steps
//! with the KV cache (the difference over 24 is the per-token decode time). A baseline for the
//! fast backends, not a target: the reference executor favours clarity.
//!
//! `cargo bench --bench reference_decode`

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::load::causal_lm;
use kiln::runtime::LanguageModel;
use std::path::Path;

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let mut model = causal_lm(&dir).expect("the llama fixture loads");
    let prompt: Vec<u32> = (0..34).map(|i| 4 + (i * 7) % 300).collect();
    c.bench_function("reference/llama-fixture/prefill-34", |b| {
        b.iter(|| {
            model
                .model
                .lm
                .prefill(std::slice::from_ref(&prompt))
                .expect("prefill")
        })
    });
    c.bench_function("reference/llama-fixture/prefill-34+decode-24", |b| {
        b.iter(|| {
            model
                .model
                .lm
                .prefill(std::slice::from_ref(&prompt))
                .expect("prefill");
            for step in 0..24 {
                model.model.lm.decode(&[4 + step]).expect("decode");
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

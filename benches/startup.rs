//! Loading a causal LM in-process (warm page cache): from its model directory (trace, optimize,
//! bind the safetensors weights) against from its artifact (map the file, check the sections,
//! parse the graphs, borrow the weights in place; `verified`: also wait for the weight data's
//! checksum, which otherwise runs in the background until the first output), plus the
//! artifact's checksum alone. The model is the tiny Llama fixture, or the directory in
//! `KILN_BENCH_MODEL` (e.g. `~/.cache/kiln/llama125m`).
//!
//! `KILN_BENCH_MODEL=~/.cache/kiln/llama125m cargo bench --bench startup`

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::compile::{compile, CompileOptions};
use kiln::load::causal_lm;
use kiln::runtime::artifact::checksum::xxh3;
use std::path::{Path, PathBuf};

fn bench(c: &mut Criterion) {
    let dir = std::env::var_os("KILN_BENCH_MODEL").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama"),
        PathBuf::from,
    );
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy());
    let (bytes, _) = compile(&dir, &CompileOptions::default()).expect("the model compiles");
    let art = std::env::temp_dir().join(format!("kiln-startup-{}.kiln", std::process::id()));
    std::fs::write(&art, &bytes).expect("write the artifact");
    let mut g = c.benchmark_group(format!("startup/{name}"));
    g.sample_size(10);
    g.bench_function("load-directory", |b| {
        b.iter(|| causal_lm(&dir).expect("load"))
    });
    g.bench_function("load-artifact", |b| {
        b.iter(|| causal_lm(&art).expect("load"))
    });
    g.bench_function("load-artifact-verified", |b| {
        b.iter(|| {
            let lm = causal_lm(&art).expect("load");
            lm.model.verify().expect("intact");
            lm
        })
    });
    g.bench_function("xxh3-whole-artifact", |b| b.iter(|| xxh3(&bytes)));
    g.finish();
    let _ = std::fs::remove_file(&art);
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Heap allocations per decode token (issue 5's "no allocation inside the decode loop"): a
//! counting global allocator around `System` counts every allocation and reallocation on every
//! thread (the kernels' pool helpers included) while the Llama fixture, loaded as `kiln` loads
//! it in f32, bf16 and fp8, decodes one token at a time through [`GraphLm`]'s
//! [`LanguageModel::decode`] after a few warm-up steps. The count must not grow with the
//! number of layers: what remains is the step's bookkeeping at the `GraphLm` boundary (the
//! inputs map with each layer's cache, the outputs map, the logits), bounded below.
//!
//! `cargo test --release --test decode_allocations -- --ignored --nocapture` prints the same
//! figures for the 125M Llama in `~/.cache/kiln/llama125m` (12 layers), when present.

use kiln::load::{causal_lm_with, LoadOptions};
use kiln_compiler::precision::Precision;
use kiln_runtime::LanguageModel;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `System`, counting allocations (fresh and resized) on all threads.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
// contract; the counter has no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout (see the impl's comment).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One count at a time: the tests of this binary run on parallel threads.
static COUNTING: Mutex<()> = Mutex::new(());

/// Allocations per decode step of the model in `dir` at `precision`: the fewest over `steps`
/// steps after `warm` warm-up steps, from a prompt of 5 tokens. The fewest, because other
/// threads of this process (the test harness's) allocate now and then while a step runs,
/// adding to its count at random; what every step allocates is in the fewest.
fn per_step(dir: &Path, precision: Precision, warm: usize, steps: usize) -> usize {
    let _one = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let opts = LoadOptions {
        precision,
        ..LoadOptions::default()
    };
    let mut lm = causal_lm_with(dir, &opts).unwrap().model.lm;
    let vocab = lm.vocab_size() as u32;
    lm.prefill(&[vec![1, 2, 3, 4, 5]]).unwrap();
    let token = |i: usize| (7 + 13 * i as u32) % vocab;
    for i in 0..warm {
        lm.decode(&[token(i)]).unwrap();
    }
    (0..steps)
        .map(|i| {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            lm.decode(&[token(warm + i)]).unwrap();
            ALLOCATIONS.load(Ordering::Relaxed) - before
        })
        .min()
        .unwrap_or(0)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A copy of the Llama fixture whose config keeps only its first `layers` decoder layers (the
/// later layers' weights are left unread).
fn llama_with_layers(layers: usize) -> PathBuf {
    let src = fixture("llama");
    let dir = std::env::temp_dir().join(format!(
        "kiln-decode-allocations-{}-{layers}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["num_hidden_layers"] = layers.into();
    std::fs::write(&config, json.to_string()).unwrap();
    dir
}

const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Fp8];

/// Allocations per decode step of the Llama fixture with 1 and 2 layers: a layer adds no more
/// than its share of the `GraphLm` boundary (`PER_LAYER`: the names of its `past` inputs and
/// `present` outputs and the two state handles, as `HashMap<String, Value>` holds them), and
/// a step no more than `BOUND` in all (what remains is listed in BENCHMARKS.md).
#[test]
fn a_decode_step_allocates_independently_of_the_layers() {
    const PER_LAYER: usize = 6;
    const BOUND: usize = 115;
    let dirs = [llama_with_layers(1), fixture("llama")];
    let mut counts = Vec::new();
    for precision in PRECISIONS {
        let [one, two] = dirs.clone().map(|d| per_step(&d, precision, 8, 16));
        println!(
            "llama fixture {}: {one} allocations per decode step with 1 layer, {two} with 2",
            precision.name()
        );
        counts.push((precision.name(), one, two));
    }
    std::fs::remove_dir_all(&dirs[0]).unwrap();
    for (precision, one, two) in counts {
        assert!(
            two <= one + PER_LAYER,
            "{precision}: a layer adds {} allocations per step",
            two as isize - one as isize
        );
        assert!(two <= BOUND, "{precision}: {two} allocations per step");
    }
}

/// The same figures on the 125M Llama (12 layers), where it is on this machine.
#[test]
#[ignore = "needs ~/.cache/kiln/llama125m; run with --release -- --ignored --nocapture"]
fn llama125m_allocations_per_decode_step() {
    let Some(home) = std::env::var_os("HOME") else {
        return;
    };
    let dir = PathBuf::from(home).join(".cache/kiln/llama125m");
    assert!(dir.is_dir(), "{} is not here", dir.display());
    for precision in PRECISIONS {
        let n = per_step(&dir, precision, 3, 8);
        println!(
            "llama125m {}: {n} allocations per decode step",
            precision.name()
        );
    }
}

//! Counting heap allocations per decode step, shared by `tests/decode_allocations.rs` (which
//! asserts bounds on the Llama fixture) and `benches/decode_allocations.rs` (which prints them
//! for any causal LM): a global allocator around `System` counting every allocation and
//! reallocation on every thread (the kernels' pool helpers and rayon's workers included),
//! [`per_step`], the count of one [`LanguageModel::decode_into`] step as `kiln` loads the
//! model, and [`per_generated`], the count of the generation loop's extra tokens.
//! Included with `#[path]`: it installs the including crate's global allocator.

use kiln::load::{causal_lm_with, LoadOptions};
use kiln_compiler::precision::Precision;
use kiln_runtime::generate::{generate, GenerationConfig};
use kiln_runtime::LanguageModel;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The precisions counted.
pub const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Fp8];

/// `System`, counting allocations (fresh and resized) on all threads.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// Held while counting: the tests of one binary run on parallel threads, whose allocations
/// would count in each other's figures.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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

/// Allocations per decode step ([`LanguageModel::decode_into`], the logits' vectors handed
/// back each step) of the model in `dir` at `precision`: the fewest over `steps`
/// steps after `warm` warm-up steps, from a prompt of 5 tokens. The fewest, because other
/// threads of this process (a test harness's) allocate now and then while a step runs,
/// adding to its count at random; what every step allocates is in the fewest.
pub fn per_step(dir: &Path, precision: Precision, warm: usize, steps: usize) -> usize {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let opts = LoadOptions {
        precision,
        ..LoadOptions::default()
    };
    let mut lm = causal_lm_with(dir, &opts).unwrap().model.lm;
    let vocab = lm.vocab_size() as u32;
    lm.prefill(&[vec![1, 2, 3, 4, 5]]).unwrap();
    let token = |i: usize| (7 + 13 * i as u32) % vocab;
    let mut logits = Vec::new();
    for i in 0..warm {
        lm.decode_into(&[token(i)], &mut logits).unwrap();
    }
    (0..steps)
        .map(|i| {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            lm.decode_into(&[token(warm + i)], &mut logits).unwrap();
            ALLOCATIONS.load(Ordering::Relaxed) - before
        })
        .min()
        .unwrap_or(0)
}

/// Allocations of the generation loop ([`generate`], greedy or sampling with top-k and
/// top-p) for `extra` more new tokens than `base`, from the same prompt of 5 tokens, with the
/// model loaded once (the fewest over 3 tries of each): what the loop allocates per token,
/// times `extra`, plus the amortized growth of its vectors (the tokens, the attention mask).
pub fn per_generated(
    dir: &Path,
    precision: Precision,
    sample: bool,
    base: usize,
    extra: usize,
) -> usize {
    let opts = LoadOptions {
        precision,
        ..LoadOptions::default()
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lm = causal_lm_with(dir, &opts).unwrap().model.lm;
    let mut count = |tokens: usize| {
        let cfg = GenerationConfig {
            max_new_tokens: Some(tokens),
            do_sample: sample,
            top_k: 20,
            top_p: 0.9,
            eos_token_id: Vec::new(),
            ..GenerationConfig::default()
        };
        (0..3)
            .map(|_| {
                let before = ALLOCATIONS.load(Ordering::Relaxed);
                let out = generate(&mut lm, &[vec![1, 2, 3, 4, 5]], &cfg, 7, &mut |_, _| true);
                let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
                assert_eq!(out.unwrap()[0].len(), tokens);
                n
            })
            .min()
            .unwrap_or(0)
    };
    let short = count(base);
    count(base + extra).saturating_sub(short)
}

//! Every Hugging Face family of `tests/fixtures/hf/` run end to end on the CPU backend with
//! MLIR kernels (`--codegen mlir`'s engine, [`MlirProvider`]) against transformers' outputs,
//! with the same bounds as the native tests (`tests/hf_causal.rs`, `tests/artifact.rs`):
//! causal prompt logits within 1e-4 (max abs) and one cached decode step equal to the full
//! forward's row; encoder hidden states and masked-LM logits at cosine ≥ 0.9999; classifier
//! logits within 1e-4. Each family must run a positive number of nodes on MLIR kernels, and
//! none of its attention, norm, softmax or activation-product nodes may fall back to native.
//!
//! This lives in `kiln-compiler` (not the root package) so that CI, which builds the compiler
//! with `--features mlir`, runs it without building the root package with the feature too. It
//! loads models the way `kiln::load` does for f32 (trace, optimize, adapt parameter names,
//! bind), without the root package's tokenizer and artifact handling.
#![cfg(feature = "mlir")]

use kiln_compiler::cost::Target;
use kiln_compiler::mlir::MlirProvider;
use kiln_compiler::pipeline::{optimize, Limits};
use kiln_ir::Graph;
use kiln_models::config::Family;
use kiln_models::encoder::{base_model_prefix, trace_encoder};
use kiln_models::nn::adapt_param_names;
use kiln_models::ModelDir;
use kiln_runtime::cpu::external::{KernelProvider, Provider};
use kiln_runtime::cpu::CpuGraph;
use kiln_runtime::encoder::EncoderRunner;
use kiln_runtime::{Checkpoint, Convert, GraphExecutor, GraphLm, LanguageModel, Params};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

const CAUSAL: [&str; 9] = [
    "llama",
    "llama_tied",
    "llama_rope_linear",
    "llama_rope_dynamic",
    "llama_rope_llama3",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
];

/// Logits against transformers (f32 on both sides, different summation orders).
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(name)
}

fn reference(name: &str) -> (Value, Option<Checkpoint>) {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let tensors = dir.join("reference.safetensors");
    let tensors = tensors
        .is_file()
        .then(|| Checkpoint::open(&tensors).unwrap());
    (serde_json::from_str(&text).unwrap(), tensors)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum()
    };
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

/// The directory's graphs optimized for the CPU, renamed to the checkpoint's parameter names,
/// planned with MLIR kernels over the bound parameters.
fn plan(
    dir: &ModelDir,
    graphs: Vec<Graph>,
) -> (Vec<Box<dyn GraphExecutor>>, Params, Arc<Provider>) {
    let (plans, params, provider) = plan_with(dir, graphs, Some(Arc::new(MlirProvider::new())));
    (plans, params, provider.expect("a provider"))
}

/// [`plan`] with `mlir`'s kernels, or the native kernels only when `None`.
fn plan_with(
    dir: &ModelDir,
    graphs: Vec<Graph>,
    mlir: Option<Arc<MlirProvider>>,
) -> (Vec<Box<dyn GraphExecutor>>, Params, Option<Arc<Provider>>) {
    let ckpt = Checkpoint::open_many(&dir.weight_files().unwrap()).unwrap();
    let prefix = base_model_prefix(&dir.config.model_type);
    let graphs: Vec<Graph> = graphs
        .iter()
        .map(|g| {
            let (g, _) = optimize(g, &Target::cpu(), &Limits::default()).unwrap();
            adapt_param_names(&g, prefix, |n| ckpt.info(n).is_some())
        })
        .collect();
    let params = ckpt.bind(&graphs[0], Convert::Exact).unwrap();
    let provider = mlir.map(|m| Provider::new(m as Arc<dyn KernelProvider>));
    let plans = CpuGraph::compile_with(graphs, &params, provider.as_ref())
        .unwrap()
        .into_iter()
        .map(|g| Box::new(g) as Box<dyn GraphExecutor>)
        .collect();
    (plans, params, provider)
}

fn causal(name: &str) -> (GraphLm<Params>, Arc<Provider>) {
    let (lm, provider) = causal_with(name, Some(Arc::new(MlirProvider::new())));
    (lm, provider.expect("a provider"))
}

/// [`causal`] with `mlir`'s kernels, or the native kernels only when `None`.
fn causal_with(
    name: &str,
    mlir: Option<Arc<MlirProvider>>,
) -> (GraphLm<Params>, Option<Arc<Provider>>) {
    let dir = ModelDir::open(&fixture(name)).unwrap();
    let graphs = match &dir.config.family {
        Family::Decoder(d) => d.trace(),
        Family::Gpt2(g) => g.trace(),
        _ => panic!("{name}: not a causal LM"),
    }
    .unwrap();
    let (plans, params, provider) = plan_with(&dir, vec![graphs.prefill, graphs.decode], mlir);
    let [p, d]: [Box<dyn GraphExecutor>; 2] = plans.try_into().ok().unwrap();
    let lm = GraphLm::with_executors(p, d, params, graphs.num_layers, graphs.vocab_size);
    (lm, provider)
}

fn encoder(name: &str) -> (EncoderRunner<Params>, Arc<Provider>) {
    let dir = ModelDir::open(&fixture(name)).unwrap();
    let traced = trace_encoder(&dir.config).unwrap();
    let (mut plans, params, provider) = plan(&dir, vec![traced.graph]);
    let runner = EncoderRunner::with_executor(plans.remove(0), params, traced.uses_token_types);
    (runner, provider)
}

/// At least one node ran on an MLIR kernel; prints what stayed native and why.
fn ran_on_mlir(name: &str, provider: &Provider) {
    eprintln!(
        "{name}: {} node runs on MLIR kernels; native: {:?}",
        provider.runs(),
        provider.fallbacks()
    );
    assert!(provider.runs() > 0, "{name}: no node ran on an MLIR kernel");
    let native = provider.fallbacks();
    for kind in ["attention", "rmsnorm", "layernorm", "softmax", "matmul"] {
        assert!(!native.contains_key(kind), "{name}: {kind} stayed native");
    }
}

#[test]
fn causal_families_with_mlir_kernels_match_transformers() {
    for name in CAUSAL {
        let (r, tensors) = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = tensors.unwrap().load("logits").unwrap();
        let (mut lm, provider) = causal(name);
        let logits = lm.forward(&prompt).unwrap();
        assert_eq!(logits.shape(), want.shape(), "{name}");
        let want = want.as_f32().unwrap();
        let err = max_abs(logits.as_f32().unwrap(), want);
        eprintln!("{name}: logits max abs error {err:e}");
        assert!(err <= TOL, "{name}: logits max abs error {err:e} > {TOL:e}");
        // One cached step (dynamic NTK RoPE excluded, as in tests/hf_causal.rs: its cached
        // keys keep the frequencies of the step that computed them).
        if name != "llama_rope_dynamic" {
            let n = prompt.len();
            let vocab = want.len() / n;
            lm.prefill(&[prompt[..n - 1].to_vec()]).unwrap();
            let step = lm.decode(&[prompt[n - 1]]).unwrap();
            let err = max_abs(&step[0], &want[(n - 1) * vocab..]);
            assert!(err <= TOL, "{name}: cached decode step differs by {err:e}");
        }
        ran_on_mlir(name, &provider);
    }
}

#[test]
fn encoder_families_with_mlir_kernels_match_transformers() {
    for name in ["bert", "distilbert"] {
        let (r, tensors) = reference(name);
        let tensors = tensors.unwrap();
        let (runner, provider) = encoder(name);
        let out = runner.run(&[ids(&r["input_ids"])]).unwrap();
        for (what, got) in [
            ("last_hidden_state", &out.last_hidden_state),
            ("mlm_logits", out.logits.as_ref().expect("masked-LM logits")),
        ] {
            let want = tensors.load(what).unwrap();
            assert_eq!(got.shape(), want.shape(), "{name} {what}");
            let cos = cosine(got.as_f32().unwrap(), want.as_f32().unwrap());
            eprintln!("{name}: {what} cosine {cos}");
            assert!(cos >= 0.9999, "{name}: {what} cosine {cos}");
        }
        ran_on_mlir(name, &provider);
    }
    for name in ["bert_cls", "distilbert_cls"] {
        let (r, _) = reference(name);
        let (runner, provider) = encoder(name);
        // The padded rows transformers saw, without their padding (the runner pads again).
        let batch: Vec<Vec<u32>> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["attention_mask"].as_array().unwrap())
            .map(|(row, mask)| {
                ids(row)
                    .into_iter()
                    .zip(ids(mask))
                    .filter(|(_, m)| *m == 1)
                    .map(|(t, _)| t)
                    .collect()
            })
            .collect();
        let out = runner.run(&batch).unwrap();
        let got = out.logits.expect("classifier logits");
        let want: Vec<f32> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let err = max_abs(got.as_f32().unwrap(), &want);
        eprintln!("{name}: classifier logits max abs error {err:e}");
        assert!(err < TOL, "{name}: classifier logits max abs error {err:e}");
        ran_on_mlir(name, &provider);
    }
}

/// A greedy 50-step decode with MLIR kernels compiles each distinct kernel once, all by the end
/// of the first step (the cache grows every step; kernels take its length at run time), and
/// every step's logits follow the native backend's (whose own steps `tests/hf_causal.rs`
/// checks against transformers) within [`TOL`].
#[test]
fn decode_compiles_each_kernel_once() {
    let mlir = Arc::new(MlirProvider::new());
    let (mut lm, provider) = causal_with("llama", Some(mlir.clone()));
    let (mut native, _) = causal_with("llama", None);
    let (r, _) = reference("llama");
    let prompt = ids(&r["prompt_ids"])[..8].to_vec();
    let got = lm.prefill(std::slice::from_ref(&prompt)).unwrap();
    let want = native.prefill(std::slice::from_ref(&prompt)).unwrap();
    assert!(max_abs(&got[0], &want[0]) <= TOL, "prefill");
    let mut token = prompt[prompt.len() - 1];
    let mut after_first = 0;
    for step in 0..50 {
        let got = lm.decode(&[token]).unwrap();
        let want = native.decode(&[token]).unwrap();
        let err = max_abs(&got[0], &want[0]);
        assert!(err <= TOL, "step {step}: logits differ by {err:e}");
        token = (0..want[0].len())
            .max_by(|&a, &b| want[0][a].total_cmp(&want[0][b]))
            .unwrap() as u32;
        if step == 0 {
            after_first = mlir.compilations();
        }
    }
    eprintln!(
        "llama: {} kernels compiled for prefill and 50 decode steps",
        mlir.compilations()
    );
    assert_eq!(
        mlir.compilations(),
        after_first,
        "kernels compiled after step 1"
    );
    assert_eq!(
        mlir.compilations(),
        mlir.kernels(),
        "a kernel compiled twice"
    );
    ran_on_mlir("llama", &provider.expect("a provider"));
}

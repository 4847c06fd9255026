//! Helpers shared by the compiler's integration tests: every Hugging Face family fixture's
//! graphs traced, optimized and checked against the unoptimized graphs on the reference
//! executor with the fixture's weights; and config-only models of real sizes optimized within
//! the limits.

// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

#[path = "../../src/testutil.rs"]
pub mod testutil;

use kiln_compiler::pipeline::run_lowered;
use kiln_compiler::{optimize, Limits, Target};
use kiln_ir::{verify, Bindings, DType, Graph, Op};
use kiln_models::config::Family;
use kiln_models::encoder::base_model_prefix;
use kiln_models::nn::adapt_param_names;
use kiln_models::{trace_encoder, ModelDir};
use kiln_runtime::reference;
use kiln_runtime::weights::{Checkpoint, Convert};
use kiln_runtime::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// The family's graphs by name: prefill and decode for causal LMs, the encoder otherwise.
pub fn graphs(dir: &ModelDir) -> Vec<(&'static str, Graph)> {
    match &dir.config.family {
        Family::Decoder(d) => {
            let g = d.trace().unwrap();
            vec![("prefill", g.prefill), ("decode", g.decode)]
        }
        Family::Gpt2(c) => {
            let g = c.trace().unwrap();
            vec![("prefill", g.prefill), ("decode", g.decode)]
        }
        Family::Bert(_) | Family::DistilBert(_) => {
            vec![("encoder", trace_encoder(&dir.config).unwrap().graph)]
        }
    }
}

/// Inputs for batch 2, 3 new tokens after 2 cached ones (decode) or none (prefill, encoders).
pub fn inputs(g: &Graph) -> HashMap<String, Tensor> {
    let past = if g.inputs().any(|(n, ..)| n.starts_with("past.")) {
        2
    } else {
        0
    };
    let env: Bindings = [("batch", 2), ("seq", 3), ("past", past)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    g.inputs()
        .map(|(name, _, ty)| {
            let shape: Vec<usize> = ty
                .shape
                .iter()
                .map(|d| d.eval(&env).unwrap() as usize)
                .collect();
            let n: usize = shape.iter().product();
            let t = match name {
                "input_ids" => {
                    Tensor::from_i64(shape, (0..n as i64).map(|i| (i * 7 + 3) % 23).collect())
                }
                "attention_mask" => Tensor::from_i64(shape, vec![1; n]),
                "token_type_ids" => Tensor::from_i64(shape, vec![0; n]),
                "position_ids" => {
                    Tensor::from_i64(shape, (0..n as i64).map(|i| past + i % 3).collect())
                }
                _ => {
                    // Random f32 values, rounded to the declared width (a bf16 KV cache).
                    let wide = kiln_ir::TensorType::new(DType::F32, shape);
                    Ok(testutil::random_tensor(&mut rng, &wide).cast(ty.dtype))
                }
            };
            (name.to_string(), t.unwrap())
        })
        .collect()
}

/// How many times a causal LM graph applies its LM head (and final norm): twice in a prefill
/// graph with `last_logits` (every position, and the last alone), else once.
pub fn heads(g: &Graph) -> usize {
    1 + usize::from(g.outputs().iter().any(|o| o.name == "last_logits"))
}

/// How many nodes of `g` have the op named `op`.
/// The head-layout projections of `g` (`linear` ops with heads and groups of `packed_linear`
/// ops) and how many of them are rotated.
pub fn projections(g: &Graph) -> (usize, usize) {
    g.nodes()
        .iter()
        .fold((0, 0), |(split, rotated), n| match &n.op {
            Op::Linear {
                heads: 1.., rotary, ..
            } => (split + 1, rotated + usize::from(*rotary)),
            Op::PackedLinear { heads, rotary, .. } => (split + heads.len(), rotated + rotary),
            _ => (split, rotated),
        })
}

pub fn count(g: &Graph, op: &str) -> usize {
    g.nodes().iter().filter(|n| n.op.name() == op).count()
}

/// One traced graph of a fixture and its optimized form.
pub struct Optimized {
    /// `prefill`, `decode` or `encoder`.
    pub which: &'static str,
    /// The traced graph (parameter names as in the checkpoint).
    pub original: Graph,
    /// The default pipeline's result, after the lowered passes.
    pub optimized: Graph,
}

/// Opens `tests/fixtures/hf/<fixture>`, optimizes each of its graphs with the default
/// pipeline and the passes that follow precision lowering (which changes nothing at f32), and
/// checks that the optimizer gave no warnings, the result verifies, and the reference
/// executor gives the unoptimized graph's outputs with the fixture's weights.
pub fn optimize_fixture(fixture: &str) -> (ModelDir, Vec<Optimized>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(fixture);
    let dir = ModelDir::open(&path).unwrap();
    let ckpt = Checkpoint::open_many(&dir.weight_files().unwrap()).unwrap();
    let prefix = base_model_prefix(&dir.config.model_type);
    let mut out = vec![];
    for (which, g) in graphs(&dir) {
        let g = adapt_param_names(&g, prefix, |n| ckpt.info(n).is_some());
        let params = ckpt.bind(&g, Convert::Exact).unwrap();
        let (h, mut report) = optimize(&g, &Target::cpu(), &Limits::default()).unwrap();
        let h = run_lowered(&h, &Target::cpu(), &Limits::default(), &mut report).unwrap();
        println!(
            "{fixture} {which}: {} -> {} ops\n{report}",
            g.nodes().len(),
            h.nodes().len()
        );
        assert!(report.warnings.is_empty(), "{report}");
        verify(&h).unwrap();
        let feeds = inputs(&g);
        let want = reference::run(&g, &feeds, &params).unwrap();
        let got = reference::run(&h, &feeds, &params).unwrap();
        testutil::assert_close(&got, &want);
        out.push(Optimized {
            which,
            original: g,
            optimized: h,
        });
    }
    (dir, out)
}

/// Traces the causal LM of a `config.json` text (no weights) and optimizes its prefill and
/// decode graphs (the default and the lowered passes, at f32), printing op counts and times (`--nocapture`; times are not asserted) and
/// checking that no limit was hit. Returns the optimized graphs by name.
pub fn optimize_config(config: &str, label: &str) -> Vec<(&'static str, Graph)> {
    let cfg = kiln_models::config::parse(config, Path::new("config.json")).unwrap();
    let Family::Decoder(d) = &cfg.family else {
        panic!("{label}: not a decoder")
    };
    let graphs = d.trace().unwrap();
    [("prefill", graphs.prefill), ("decode", graphs.decode)]
        .into_iter()
        .map(|(which, g)| {
            let start = std::time::Instant::now();
            let (h, mut report) = optimize(&g, &Target::cpu(), &Limits::default()).unwrap();
            let h = run_lowered(&h, &Target::cpu(), &Limits::default(), &mut report).unwrap();
            println!(
                "{label} {which}: {} -> {} ops in {:.3} s\n{report}",
                g.nodes().len(),
                h.nodes().len(),
                start.elapsed().as_secs_f64()
            );
            assert!(report.warnings.is_empty(), "{label} {which}: {report}");
            (which, h)
        })
        .collect()
}

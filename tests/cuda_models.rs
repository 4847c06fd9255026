//! Every Hugging Face family fixture run on the CUDA backend (`--device cuda`), against
//! transformers' f32 logits (fixtures from `scripts/reference/hf_fixtures.py`) and against the
//! CPU backend:
//! - f32: prompt logits within 5e-4 of transformers' (cuBLAS f32 GEMMs sum in another order
//!   than PyTorch's CPU kernels), and greedy generation (prefill, then decode steps through the
//!   KV cache kept on the device) token for token identical to the CPU path;
//! - bf16: top-1 agreement with transformers' f32 logits over every prompt position of every
//!   causal family ≥ 99%;
//! - encoders: last hidden states within 5e-4 of the CPU backend's.
//!
//! Needs a CUDA device: without one each test prints why and returns, unless
//! `KILN_REQUIRE_GPU=1` (set by `scripts/gpu-check`), which makes that a failure.

mod common;

use common::{argmax, fixture, ids, max_abs, reference};
use kiln::compiler::Precision;
use kiln::load::{causal_lm_with, encoder_with, LoadOptions};
use kiln::placement::{cuda_backend, Placement};
use kiln::runtime::LanguageModel;

const CAUSAL: [&str; 6] = ["llama", "llama_tied", "mistral", "qwen2", "mixtral", "gpt2"];

fn gpu_or_skip(test: &str) -> bool {
    match cuda_backend() {
        Ok(b) => {
            eprintln!("{test}: on {}", b.device().name());
            true
        }
        Err(e) if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("{test}: KILN_REQUIRE_GPU=1 but {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped, no CUDA device ({e})");
            false
        }
    }
}

fn opts(precision: Precision, placement: Placement) -> LoadOptions {
    LoadOptions {
        precision,
        placement,
        ..LoadOptions::default()
    }
}

fn greedy(lm: &mut dyn LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut logits = lm.prefill(&[prompt.to_vec()]).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits[0]) as u32;
        out.push(t);
        logits = lm.decode(&[t]).unwrap();
    }
    out
}

#[test]
fn f32_matches_transformers_and_greedy_matches_the_cpu() {
    if !gpu_or_skip("f32") {
        return;
    }
    for name in CAUSAL {
        let (r, tensors) = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = tensors.load("logits").unwrap();
        let mut gpu = causal_lm_with(&fixture(name), &opts(Precision::F32, Placement::Cuda))
            .unwrap()
            .model;
        assert!(gpu.lm.graphs()[0].backend().starts_with("cuda"), "{name}");
        let logits = gpu.lm.forward(&prompt).unwrap();
        assert_eq!(logits.shape(), want.shape(), "{name}");
        let err = max_abs(logits.as_f32().unwrap(), want.as_f32().unwrap());
        eprintln!("{name}: f32 on CUDA, prompt logits max abs error {err:e} against transformers");
        assert!(err <= 5e-4, "{name}: {err:e}");
        let mut cpu = causal_lm_with(&fixture(name), &opts(Precision::F32, Placement::Cpu))
            .unwrap()
            .model;
        let (g, c) = (
            greedy(&mut gpu.lm, &prompt, 8),
            greedy(&mut cpu.lm, &prompt, 8),
        );
        eprintln!("{name}: greedy CUDA {g:?}, CPU {c:?}");
        assert_eq!(
            g, c,
            "{name}: greedy generation on CUDA differs from the CPU"
        );
    }
}

#[test]
fn bf16_top1_agrees_with_transformers() {
    if !gpu_or_skip("bf16") {
        return;
    }
    let (mut same, mut total) = (0usize, 0usize);
    for name in CAUSAL {
        let (r, tensors) = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = tensors.load("logits").unwrap();
        let gpu = causal_lm_with(&fixture(name), &opts(Precision::Bf16, Placement::Cuda))
            .unwrap()
            .model;
        let got = gpu.lm.forward(&prompt).unwrap();
        let vocab = *want.shape().last().unwrap();
        let rows = |t: &kiln::runtime::Tensor| -> Vec<usize> {
            t.as_f32().unwrap().chunks(vocab).map(argmax).collect()
        };
        let (g, w) = (rows(&got), rows(&want));
        let agree = g.iter().zip(&w).filter(|(a, b)| a == b).count();
        eprintln!("{name}: bf16 on CUDA, top-1 {agree}/{} positions", w.len());
        same += agree;
        total += w.len();
    }
    let rate = same as f64 / total as f64;
    eprintln!(
        "bf16 on CUDA: top-1 agreement {same}/{total} = {:.1}%",
        rate * 100.0
    );
    assert!(rate >= 0.99, "bf16 top-1 agreement {rate}");
}

#[test]
fn encoders_match_the_cpu() {
    if !gpu_or_skip("encoders") {
        return;
    }
    for name in ["bert", "bert_cls", "distilbert"] {
        let batch = vec![vec![2u32, 7, 11, 5, 3], vec![2, 9, 3]];
        let run = |placement| {
            let e = encoder_with(&fixture(name), &opts(Precision::F32, placement))
                .unwrap()
                .model;
            e.runner.run(&batch).unwrap().last_hidden_state
        };
        let (g, c) = (run(Placement::Cuda), run(Placement::Cpu));
        assert_eq!(g.shape(), c.shape(), "{name}");
        let err = max_abs(g.as_f32().unwrap(), c.as_f32().unwrap());
        eprintln!("{name}: last hidden state on CUDA, max abs error {err:e} against the CPU");
        assert!(err <= 5e-4, "{name}: {err:e}");
    }
}

/// Kernel selection needs no GPU: every causal family's prefill and decode graphs, in f32,
/// bf16 and fp8, get a device kernel for every node (mask and position arithmetic included)
/// except `moe` (no CUDA kernel yet) and `attention` in f32 or with a head dim the flash kernels
/// lack (the fixtures' tiny heads; bf16 at 64 and 128 runs on the device), which run on the
/// host; every matmul with a weight is a linear step (cuBLAS, or the fp8 GEMV). The graphs are
/// optimized and lowered for the `cuda-sm90` target (loaded on the CPU: no GPU needed), as a
/// CUDA placement lowers them (a CPU target's fp8 refines the LM head with `refine_logits`,
/// which CUDA targets do not emit).
#[test]
fn graphs_run_on_device_kernels() {
    use kiln::compiler::cost::Target;
    use kiln::ir::Op;
    use kiln_cuda::exec::select::{legalize, Plan, Step};
    let sm90 = Target::by_name("cuda-sm90").unwrap();
    for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
        for name in CAUSAL {
            let options = LoadOptions {
                target: sm90,
                ..opts(precision, Placement::Cpu)
            };
            let m = causal_lm_with(&fixture(name), &options).unwrap().model;
            for g in m.lm.graphs() {
                let graph = &legalize(g.graph()).unwrap();
                let plan = Plan::new(graph);
                let host: Vec<&str> = graph
                    .iter()
                    .filter(|(id, _)| plan.steps[id.index()] == Step::Host)
                    .map(|(_, n)| n.op.name())
                    .collect();
                eprintln!("{name} {precision:?}: {} | host: {host:?}", plan.summary());
                assert!(
                    host.iter().all(|op| matches!(*op, "attention" | "moe")),
                    "{name} {precision:?}: {host:?} on the host"
                );
                let linears = plan
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Linear { .. }))
                    .count();
                let weight_matmuls = graph
                    .iter()
                    .filter(|(_, n)| matches!(n.op, Op::MatMul { .. }))
                    .filter(|(_, n)| {
                        let w = graph.node(n.inputs[1]);
                        let w = match w.map(|w| (&w.op, w)) {
                            Some((Op::Cast { .. }, w)) => graph.node(w.inputs[0]),
                            _ => w,
                        };
                        w.is_some_and(|w| matches!(w.op, Op::Param { .. }) && w.ty.rank() == 2)
                    })
                    .count();
                assert_eq!(
                    linears, weight_matmuls,
                    "{name} {precision:?}: linear steps"
                );
            }
        }
    }
}

/// Every kernel the CUDA executor generates for every family fixture — prefill and decode, f32,
/// bf16 and fp8, batch 2 with 5 new and 3 cached positions — compiles with NVRTC for sm_90
/// (and, except fp8 ones, sm_80). Needs no GPU, only the CUDA tools
/// (`scripts/fetch-cuda-tools`; `KILN_REQUIRE_NVRTC=1` makes their absence a failure).
#[test]
fn generated_kernels_compile_for_every_family() {
    use kiln::ir::{Bindings, DType};
    use kiln_cuda::compile::compile;
    use kiln_cuda::exec::kernels;
    use kiln_cuda::exec::select::{legalize, Plan};
    use kiln_cuda::Arch;
    use std::collections::HashSet;
    if let Err(e) = kiln_cuda::toolkit::preload_nvrtc() {
        assert!(
            std::env::var("KILN_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "KILN_REQUIRE_NVRTC=1 but {e}"
        );
        eprintln!("*** NOTICE: generated_kernels_compile_for_every_family did NOT run: {e}");
        return;
    }
    let mut seen = HashSet::new();
    for name in CAUSAL.iter().chain(&["bert", "bert_cls", "distilbert"]) {
        for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            let o = opts(precision, Placement::Cpu);
            let graphs: Vec<kiln::ir::Graph> = match causal_lm_with(&fixture(name), &o) {
                Ok(m) => m
                    .model
                    .lm
                    .graphs()
                    .iter()
                    .map(|g| g.graph().clone())
                    .collect(),
                Err(_) => {
                    let e = encoder_with(&fixture(name), &o).unwrap().model;
                    vec![e.runner.plan().graph().clone()]
                }
            };
            for g in &graphs {
                let g = &legalize(g).unwrap();
                // Every size symbol bound to a small distinct value.
                let mut env = Bindings::new();
                let mut values = [2i64, 5, 3, 7, 4].into_iter().cycle();
                for (_, _, ty) in g.inputs() {
                    for d in &ty.shape {
                        for sym in d.symbols() {
                            if !env.contains_key(sym) {
                                env.insert(sym.to_string(), values.next().unwrap_or(2));
                            }
                        }
                    }
                }
                let plan = Plan::new(g);
                let list = kernels::generated(g, &plan, &env).unwrap();
                assert!(
                    !list.is_empty(),
                    "{name} {precision:?}: no generated kernels"
                );
                for (ew, _) in list {
                    if !seen.insert(ew.clone()) {
                        continue;
                    }
                    let mut fp8 = false;
                    ew.body.visit(&mut |e| {
                        fp8 |= e
                            .dtype(&ew.args)
                            .is_ok_and(|d| matches!(d, DType::F8E4M3 | DType::F8E5M2));
                    });
                    for arch in Arch::ALL {
                        if fp8 && !arch.has_fp8() {
                            continue;
                        }
                        let src = ew.source(arch).unwrap_or_else(|e| panic!("{name}: {e}"));
                        if let Err(e) = compile(&src, arch) {
                            panic!("{name} {precision:?} for {arch}: {e}\n{:?}", ew.body);
                        }
                    }
                }
            }
        }
    }
    eprintln!("{} distinct generated kernels compiled", seen.len());
}

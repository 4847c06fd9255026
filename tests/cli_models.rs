//! The model commands of the `kiln` CLI end to end, against transformers' outputs (fixtures from
//! `scripts/reference/hf_fixtures.py`), and their refusals of bad input: exit code 2, a message
//! on stderr naming the problem, never a panic.

mod common;

use common::{f32_tensor, kiln, reference_json as reference, refused};
use kiln_compiler::pipeline::{default_passes, lowered_passes};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A fixture directory as a command-line argument.
fn fixture(name: &str) -> String {
    common::fixture(name).display().to_string()
}

fn json_out(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn ids_text(v: &Value) -> String {
    let ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    ids.join(",")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-models-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of a fixture directory, to break on purpose.
fn copy_fixture(name: &str, to: &str) -> PathBuf {
    let dst = temp_dir(to);
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn forward_writes_transformers_logits() {
    let r = reference("llama");
    let out = temp_dir("forward").join("logits.safetensors");
    let o = kiln(&[
        "forward",
        "--model",
        &fixture("llama"),
        "--tokens",
        &ids_text(&r["prompt_ids"]),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("logits: f32[1, 34, 320]"));
    let (_, got) = f32_tensor(&out, "logits");
    let (_, want) = f32_tensor(
        &common::fixture("llama").join("reference.safetensors"),
        "logits",
    );
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err <= 1e-4, "logits max abs error {err:e}");
}

/// `--precision bf16` and `fp8` run on the CPU (`tests/precision.rs` checks their accuracy).
#[test]
fn forward_runs_in_reduced_precision() {
    let r = reference("llama");
    let (_, want) = f32_tensor(
        &common::fixture("llama").join("reference.safetensors"),
        "logits",
    );
    for (precision, bound) in [("bf16", 0.02), ("fp8", 0.07)] {
        let out = temp_dir(&format!("forward-{precision}")).join("logits.safetensors");
        let o = kiln(&[
            "forward",
            "--model",
            &fixture("llama"),
            "--tokens",
            &ids_text(&r["prompt_ids"]),
            "--precision",
            precision,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("logits: f32[1, 34, 320]"));
        let (_, got) = f32_tensor(&out, "logits");
        let sq = |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x).powi(2)).sum::<f64>();
        let rel = (sq(&mut got.iter().zip(&want).map(|(a, b)| a - b))
            / sq(&mut want.iter().copied()))
        .sqrt();
        assert!(rel <= bound, "{precision}: relative error {rel}");
    }
}

#[test]
fn generate_greedy_json_and_streaming_match_transformers() {
    let r = reference("llama");
    let prompt = r["prompt"].as_str().unwrap();
    let args = [
        "generate",
        "--model",
        &fixture("llama"),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
    ];
    let j = json_out(&kiln(&[&args[..], &["--json"]].concat()));
    assert_eq!(j["prompt_ids"], r["prompt_ids"]);
    assert_eq!(j["generated_ids"], r["greedy_ids"]);
    assert_eq!(j["text"], r["greedy_text"]);
    let o = kiln(&args);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", r["greedy_text"].as_str().unwrap())
    );
}

#[test]
fn generate_beam_search_and_stop_strings() {
    let r = reference("llama");
    let prompt = r["prompt"].as_str().unwrap();
    let m = fixture("llama");
    let j = json_out(&kiln(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
        "--num-beams",
        "4",
        "--json",
    ]));
    assert_eq!(j["generated_ids"], r["beam"][0]["new_ids"]);
    // The greedy text is " morning every sing. ..."; stopping at "every" keeps " morning ".
    let j = json_out(&kiln(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--stop",
        "every",
        "--json",
    ]));
    assert_eq!(j["text"], " morning ");
    assert!(j["generated_ids"].as_array().unwrap().len() < 24);
}

#[test]
fn encoder_commands_match_transformers() {
    let r = reference("bert");
    let j = json_out(&kiln(&[
        "fill-mask",
        "--model",
        &fixture("bert"),
        "--text",
        r["text"].as_str().unwrap(),
        "--json",
    ]));
    let got: Vec<&Value> = j["masks"][0]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["token_id"])
        .collect();
    let want: Vec<&Value> = r["fill_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["token_id"])
        .collect();
    assert_eq!(got, want);
    let r = reference("bert_cls");
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let j = json_out(&kiln(&[
        "classify",
        "--model",
        &fixture("bert_cls"),
        "--text",
        texts[0],
        "--text",
        texts[1],
        "--json",
    ]));
    for (row, want) in r["probs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(j["results"][row]["label"], r["labels"][row]);
        for (p, w) in j["results"][row]["probs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want.as_array().unwrap())
        {
            assert!((p.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-6);
        }
    }
    let j = json_out(&kiln(&[
        "embed",
        "--model",
        &fixture("bert"),
        "--text",
        "a cat",
        "--text",
        "the dog ran",
        "--json",
    ]));
    let e = j["embeddings"].as_array().unwrap();
    assert_eq!((e.len(), e[0].as_array().unwrap().len()), (2, 32));
}

#[test]
fn inspect_model_traces_without_weights() {
    let dir = temp_dir("inspect");
    std::fs::copy(
        format!("{}/config.json", fixture("mixtral")),
        dir.join("config.json"),
    )
    .unwrap();
    let o = kiln(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("# ==== prefill graph") && text.contains("# ==== decode graph"));
    assert!(
        text.contains("moe(") && text.contains("\"past.1.value\""),
        "{text}"
    );
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites `model.safetensors` of `dir` with `change` applied to the tensor list.
fn edit_weights(dir: &Path, change: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    change(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn bad_model_directories_are_refused_clearly() {
    let gen = |dir: &Path| -> Vec<String> {
        [
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "The cat",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>, fragments: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&a, fragments);
    };
    run(
        gen(Path::new("/no/such/model")),
        &["/no/such/model", "not a directory"],
    );
    let d = copy_fixture("llama", "no-config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    run(gen(&d), &["has no config.json"]);
    let d = copy_fixture("llama", "no-tokenizer");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    run(gen(&d), &["has no tokenizer.json"]);
    let d = copy_fixture("llama", "no-weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    run(gen(&d), &["model.safetensors", "weights are missing"]);
    let d = copy_fixture("llama", "unknown-type");
    edit_json(&d.join("config.json"), |c| {
        c.insert("model_type".into(), "falcon9".into());
    });
    run(
        gen(&d),
        &[
            "\"falcon9\" is not supported",
            "llama, mistral, qwen2, mixtral, gpt2, bert, distilbert",
        ],
    );
    let d = copy_fixture("llama", "missing-key");
    edit_json(&d.join("config.json"), |c| {
        c.remove("hidden_size");
    });
    run(
        gen(&d),
        &["config.json", "required key `hidden_size` is missing"],
    );
    let d = copy_fixture("llama", "missing-weight");
    edit_weights(&d, |t| t.retain(|(n, _, _)| n != "model.norm.weight"));
    run(gen(&d), &["model.norm.weight"]);
    let d = copy_fixture("llama", "wrong-shape");
    edit_weights(&d, |t| {
        let e = t
            .iter_mut()
            .find(|(n, _, _)| n == "lm_head.weight")
            .unwrap();
        e.1 = vec![32, 320];
    });
    run(gen(&d), &["lm_head.weight", "[32, 320]", "[320, 32]"]);
    let d = copy_fixture("llama", "truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    run(gen(&d), &["model.safetensors", "truncated"]);
}

#[test]
fn bad_flags_and_prompts_are_refused_clearly() {
    let llama = fixture("llama");
    let gen = |extra: &[&str], fragments: &[&str]| {
        let mut a = vec!["generate", "--model", &llama, "--prompt", "The cat"];
        a.extend_from_slice(extra);
        refused(&a, fragments);
    };
    gen(&["--top-p", "1.5"], &["--top-p must be in (0, 1], got 1.5"]);
    gen(&["--temperature", "-1"], &["--temperature"]);
    gen(&["--min-p", "2"], &["--min-p"]);
    gen(&["--num-beams", "0"], &["--num-beams"]);
    gen(&["--top-k", "5", "--temperature", "0"], &["greedy"]);
    gen(&["--device", "cuda"], &["CUDA"]);
    gen(
        &["--precision", "fp16"],
        &["--precision fp16", "cpu", "cuda-sm80, cuda-sm90"],
    );
    refused(
        &["generate", "--model", &llama, "--prompt", ""],
        &["--prompt is empty"],
    );
    let long = reference("gpt2")["too_long_prompt_ids"].clone();
    refused(
        &[
            "forward",
            "--model",
            &fixture("gpt2"),
            "--tokens",
            &ids_text(&long),
        ],
        &["40 tokens", "at most 32 positions"],
    );
    refused(
        &[
            "generate",
            "--model",
            &fixture("gpt2"),
            "--prompt",
            "The old man told the children",
            "--max-new-tokens",
            "30",
        ],
        &["at most 32 positions"],
    );
    refused(
        &["forward", "--model", &llama, "--tokens", "1,2,99999"],
        &["token id 99999 is outside the vocabulary"],
    );
    refused(
        &["forward", "--model", &llama, "--tokens", "1,x"],
        &["\"x\" is not a token id"],
    );
    refused(
        &[
            "fill-mask",
            "--model",
            &fixture("bert"),
            "--text",
            "no mask here",
        ],
        &["no [MASK] token"],
    );
    refused(
        &["classify", "--model", &fixture("bert"), "--text", "hi"],
        &["no classification head"],
    );
}

#[test]
fn inspect_passes_and_no_optimize() {
    let o = kiln(&[
        "inspect",
        "--model",
        &fixture("llama"),
        "--passes",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "prefill and decode");
    for g in &lines {
        // 2 layers × 2 norms + the final norm, each fused into one rmsnorm kernel; the prefill
        // graph's `last_logits` applies the final norm again, to the last position alone.
        let norms = if g["graph"] == "prefill" { 6 } else { 5 };
        assert_eq!(g["kernels"]["rmsnorm"], norms, "{g}");
        let names: Vec<&str> = g["passes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let pipeline: Vec<&str> = default_passes()
            .iter()
            .chain(&lowered_passes())
            .map(|p| p.name)
            .collect();
        assert_eq!(names, pipeline);
        assert_eq!(g["kernels"]["attention"], 2, "one per layer: {g}");
        // q, k and v (split into heads, q and k rotated) one `packed_linear` per layer (its
        // parts, slices selecting one projection's heads, are free); o_proj and down_proj with
        // their residual adds: two per layer; gate, up and SwiGLU one per layer.
        assert_eq!(g["kernels"]["packed_linear"], 2, "{g}");
        assert_eq!(g["kernels"]["linear"], 4, "{g}");
        assert_eq!(g["kernels"]["swiglu"], 2, "{g}");
        for gone in ["add", "softmax", "permute", "rotary", "fused_elementwise"] {
            assert!(g["kernels"].get(gone).is_none(), "{gone}: {g}");
        }
        // So a layer is 7 kernels: two norms, q/k/v, attention, o_proj, SwiGLU, down_proj.
        let per_layer = ["attention", "packed_linear", "linear", "swiglu"]
            .iter()
            .map(|k| g["kernels"][k].as_u64().unwrap())
            .sum::<u64>()
            + 2 * 2;
        assert_eq!(per_layer, 2 * 7, "{g}");
        let sum: u64 = g["kernels"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(g["total_kernels"].as_u64().unwrap(), sum);
    }
    let r = reference("llama");
    let j = json_out(&kiln(&[
        "generate",
        "--model",
        &fixture("llama"),
        "--prompt",
        r["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--no-optimize",
        "--json",
    ]));
    assert_eq!(j["generated_ids"], r["greedy_ids"]);
}

#[test]
fn inspect_prints_the_graphs_lowered_to_a_precision() {
    let o = kiln(&[
        "inspect",
        "--model",
        &fixture("llama"),
        "--precision",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // bf16 weights, and the decode graph's KV cache kept in bf16 (rounded once at append).
    assert!(
        text.contains("bf16[16, 32] = param \"model.layers.0.self_attn.k_proj.weight\""),
        "{text}"
    );
    assert!(
        text.contains("bf16[batch, 2, past, 8] = input \"past.0.key\""),
        "{text}"
    );
    let f32 = kiln(&["inspect", "--model", &fixture("llama")]);
    assert!(!String::from_utf8_lossy(&f32.stdout).contains("bf16"));
    refused(
        &[
            "inspect",
            "--model",
            &fixture("llama"),
            "--precision",
            "fp4",
        ],
        &["--precision", "f32, bf16, fp16, fp8"],
    );
}

#[test]
fn dump_ir_after_a_pass_parses_back() {
    let o = kiln(&["inspect", "--model", &fixture("gpt2"), "--dump-ir", "norm"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let graphs: Vec<&str> = text.split("# ==== ").filter(|s| !s.is_empty()).collect();
    assert_eq!(graphs.len(), 2, "prefill and decode");
    for g in graphs {
        let parsed = kiln::ir::text::parse(&format!("# {g}")).unwrap();
        let ops: Vec<&str> = parsed.nodes().iter().map(|n| n.op.name()).collect();
        // After `norm` the layer norms are fused but attention is not yet (the prefill graph
        // applies the final norm twice: to every position and to the last alone).
        let norms = if g.starts_with("prefill") { 6 } else { 5 };
        assert_eq!(ops.iter().filter(|o| **o == "layernorm").count(), norms);
        assert!(ops.contains(&"softmax") && !ops.contains(&"attention"));
    }
    // The last pass, after (f32) precision lowering: c_attn's bias add is its epilogue.
    let o = kiln(&[
        "inspect",
        "--model",
        &fixture("gpt2"),
        "--dump-ir",
        "epilogue",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for g in text.split("# ==== ").filter(|s| !s.is_empty()) {
        let parsed = kiln::ir::text::parse(&format!("# {g}")).unwrap();
        let linear = parsed.nodes().iter().filter(|n| n.op.name() == "linear");
        assert_eq!(linear.count(), 2, "one per layer");
    }
    refused(
        &["inspect", "--model", &fixture("gpt2"), "--dump-ir", "bogus"],
        &["no pass named \"bogus\"", "algebra, norm"],
    );
}

#[test]
fn emit_mlir_prints_each_kernel_or_says_the_build_lacks_mlir() {
    let model = fixture("llama");
    let args = ["inspect", "--model", &model, "--emit", "mlir"];
    if !cfg!(feature = "mlir") {
        refused(&args, &["built without MLIR support", "--features mlir"]);
        return;
    }
    let o = kiln(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("// ==== ").count(), 2, "prefill and decode");
    for op in ["rmsnorm", "matmul", "fused_elementwise"] {
        assert!(
            text.contains(&format!("// {op} [")),
            "no {op} kernel in\n{text}"
        );
    }
    assert!(text.contains("func.func @kernel") && text.contains("linalg.generic"));
    // Kernels MLIR does not lower say why.
    assert!(text.contains("not lowered to MLIR"), "{text}");
}

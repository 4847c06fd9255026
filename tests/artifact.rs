//! Ahead-of-time artifacts (`kiln compile`, `kiln_runtime::artifact`): every family compiled,
//! loaded and checked against transformers' outputs; byte-identical recompiles; bf16 weights
//! stored packed and used in place, exactly as from the directory; each bad file (bad packed
//! weights too) refused with its own message; and mutations of real artifacts (bit flips,
//! truncations, header fields overwritten with huge values, weight-index fields, packing
//! included, and recorded-plan and carried-MLIR fields set to other values), none of which may
//! panic or hang. The MLIR section (`--emit-mlir`) is opaque text to the runtime: its round
//! trip and its refusals are checked here with a record of made-up modules; the real ones (and
//! `--codegen mlir` using them) in `tests/cli_codegen.rs` and `compiler/tests/mlir_carry.rs`.
//!
//! The mutation test runs `KILN_FUZZ_CASES` cases (3,000 by default, enough for CI); the long
//! run sets it, in release and under a 4 GiB address-space limit so that a huge allocation would
//! abort it: `(ulimit -v 4194304; KILN_FUZZ_CASES=1000000 cargo test --release --test artifact
//! mutated_artifacts_never_panic -- --nocapture)`

mod common;
#[allow(dead_code)] // its `main` is for `cargo run --example deploy`
#[path = "../examples/deploy.rs"]
mod deploy;

use common::{fixture, ids, kiln, max_abs, reference, reference_json, refused};
use kiln::compile::{compile, CompileOptions};
use kiln::compiler::Precision;
use kiln::ir::DType;
use kiln::load::{self, LoadOptions};
use kiln::runtime::artifact::{reseal, write, Artifact, CarriedKernel, MlirRecord, SectionKind};
use kiln::runtime::cpu::CpuGraph;
use kiln::runtime::deploy::Model;
use kiln::runtime::Tensor;
use std::path::PathBuf;

const CAUSAL: [&str; 9] = [
    "llama",
    "llama_tied",
    "llama_rope_dynamic",
    "llama_rope_linear",
    "llama_rope_llama3",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
];

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-artifact-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn compiled(name: &str, precision: Precision) -> Vec<u8> {
    let opts = CompileOptions {
        load: LoadOptions {
            precision,
            ..Default::default()
        },
        ..Default::default()
    };
    compile(&fixture(name), &opts).unwrap().0
}

/// Compiles the fixture into a temporary file (named after the test `tag`, since tests run
/// concurrently) and returns its path.
fn compiled_file(name: &str, precision: Precision, tag: &str) -> PathBuf {
    let path = temp(&format!("{tag}-{name}-{}.kiln", precision.name()));
    std::fs::write(&path, compiled(name, precision)).unwrap();
    path
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// From the artifact: prompt logits against transformers' (within the tolerance of
/// `tests/hf_causal.rs`), and where transformers' greedy continuation is recorded, the same
/// tokens, text in (through the artifact's tokenizer) and tokens out.
#[test]
fn causal_artifacts_match_transformers() {
    for name in CAUSAL {
        let (r, tensors) = reference(name);
        let path = compiled_file(name, Precision::F32, "causal");
        let Model::Causal(mut m) = Model::open(&path).unwrap() else {
            panic!("{name}: not a causal LM")
        };
        let logits = m.forward(&ids(&r["prompt_ids"])).unwrap();
        let want = tensors.load("logits").unwrap();
        assert_eq!(logits.shape(), want.shape(), "{name}");
        let err = max_abs(logits.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(err <= 1e-4, "{name}: logits max abs error {err:e}");
        if r["greedy_ids"].is_null() {
            continue;
        }
        let mut cfg = m.generation_config().unwrap();
        cfg.do_sample = false;
        cfg.max_new_tokens = r["greedy"]["args"]["max_new_tokens"]
            .as_u64()
            .map(|n| n as usize);
        let out = m.generate(r["prompt"].as_str().unwrap(), &cfg, 0).unwrap();
        assert_eq!(out.prompt_ids, ids(&r["prompt_ids"]), "{name}: prompt ids");
        assert_eq!(out.ids, ids(&r["greedy_ids"]), "{name}: greedy ids");
    }
}

/// Encoders from artifacts: hidden states and head logits against transformers.
#[test]
fn encoder_artifacts_match_transformers() {
    for name in ["bert", "distilbert"] {
        let (r, tensors) = reference(name);
        let path = compiled_file(name, Precision::F32, "encoder");
        let Model::Encoder(m) = Model::open(&path).unwrap() else {
            panic!("{name}: not an encoder")
        };
        let input = ids(&r["input_ids"]);
        let out = m.run(&[input]).unwrap();
        let want = tensors.load("last_hidden_state").unwrap();
        assert_eq!(out.last_hidden_state.shape(), want.shape(), "{name}");
        let cos = cosine(
            out.last_hidden_state.as_f32().unwrap(),
            want.as_f32().unwrap(),
        );
        assert!(cos >= 0.9999, "{name}: last_hidden_state cosine {cos}");
        let logits = out.logits.expect("masked-LM logits");
        let want = tensors.load("mlm_logits").unwrap();
        let cos = cosine(logits.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(cos >= 0.9999, "{name}: masked-LM logits cosine {cos}");
        // Embeddings go through the artifact's tokenizer and pooling settings.
        let e = m.embed(&["a cat", "the dog ran"]).unwrap();
        assert_eq!((e.len(), e[0].len()), (2, 32));
    }
    for name in ["bert_cls", "distilbert_cls"] {
        let r = reference_json(name);
        let path = compiled_file(name, Precision::F32, "encoder");
        let enc = load::encoder(&path).unwrap().model;
        let texts: Vec<&str> = r["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let logits = enc.encode(&texts).unwrap().out.logits.unwrap();
        let got = logits.as_f32().unwrap();
        let want: Vec<f32> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err < 1e-4,
            "{name}: classifier logits max abs error {err:e}"
        );
        let id2label = r["id2label"].as_object().unwrap();
        assert_eq!(enc.info.labels.len(), id2label.len(), "{name}: id2label");
        assert_eq!(enc.info.labels[0], id2label["0"], "{name}: id2label");
    }
}

/// An artifact runs exactly what loading the directory with the same options runs: the same
/// logits bit for bit and the same greedy tokens, in every precision (weights converted, and
/// packed for the CPU, at compile time; both orientations of packed weights: gpt2 stores its
/// weights `[k, n]`; tied embeddings: `llama_tied`).
#[test]
fn artifacts_run_exactly_as_the_directory_does() {
    for (name, precision) in [
        ("llama", Precision::Bf16),
        ("llama", Precision::Fp8),
        ("llama_tied", Precision::Bf16),
        ("mixtral", Precision::Fp8),
        ("gpt2", Precision::F32),
        ("gpt2", Precision::Bf16),
    ] {
        let path = compiled_file(name, precision, "exact");
        let opts = LoadOptions {
            precision,
            ..Default::default()
        };
        let from_dir = load::causal_lm_with(&fixture(name), &opts).unwrap().model;
        let from_file = load::causal_lm_with(&path, &opts).unwrap().model;
        let prompt = ids(&reference_json(name)["prompt_ids"]);
        let a = from_dir.forward(&prompt).unwrap();
        let b = from_file.forward(&prompt).unwrap();
        assert_eq!(a, b, "{name} {precision:?}");
        let mut cfg = from_dir.generation_config().unwrap();
        cfg.do_sample = false;
        cfg.max_new_tokens = Some(6);
        let text = reference_json(name)["prompt"].as_str().unwrap().to_string();
        let (mut from_dir, mut from_file) = (from_dir, from_file);
        let a = from_dir.generate(&text, &cfg, 0).unwrap();
        let b = from_file.generate(&text, &cfg, 0).unwrap();
        assert_eq!(a.ids, b.ids, "{name} {precision:?}: greedy tokens");
        let art = Artifact::open(&path).unwrap();
        assert_eq!(art.manifest.precision, precision.name());
    }
}

#[test]
fn compiling_twice_gives_identical_bytes() {
    for (name, precision) in [
        ("llama", Precision::F32),
        ("bert", Precision::F32),
        ("llama", Precision::Bf16),
        ("gpt2", Precision::Bf16),
    ] {
        assert!(
            compiled(name, precision) == compiled(name, precision),
            "{name} {precision:?}"
        );
    }
    let (a, b) = (temp("twice-a.kiln"), temp("twice-b.kiln"));
    for out in [&a, &b] {
        let o = kiln(&[
            "compile",
            "--model",
            fixture("mixtral").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--precision",
            "bf16",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

/// The CLI commands take an artifact wherever they take a model directory.
#[test]
fn cli_commands_take_artifacts() {
    let r = reference_json("llama");
    let path = temp("cli-llama.kiln");
    let p = path.to_str().unwrap();
    let o = kiln(&[
        "compile",
        "--model",
        fixture("llama").to_str().unwrap(),
        "-o",
        p,
        "--max-seq",
        "40",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kiln(&[
        "generate",
        "--model",
        p,
        "--prompt",
        r["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&j["generated_ids"]), ids(&r["greedy_ids"])[..6]);
    // --max-seq 40 is enforced: 34 prompt tokens + 20 new ones do not fit.
    refused(
        &[
            "generate",
            "--model",
            p,
            "--prompt",
            r["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "20",
        ],
        &["at most 40 positions"],
    );
    let o = kiln(&["inspect", "--model", p]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for f in [
        "target: cpu",
        "precision: f32",
        "weight_data",
        "matmul×",
        "max seq 40",
    ] {
        assert!(s.contains(f), "inspect: {f:?} missing in {s}");
    }
    let o = kiln(&["forward", "--model", p, "--tokens", "1,2,3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    refused(
        &["embed", "--model", p, "--text", "x"],
        &["is a causal LM, not an encoder"],
    );
    refused(
        &[
            "generate",
            "--model",
            p,
            "--prompt",
            "x",
            "--precision",
            "bf16",
        ],
        &["compiled for f32"],
    );
    let bert = temp("cli-bert.kiln");
    let b = bert.to_str().unwrap();
    let o = kiln(&[
        "compile",
        "--model",
        fixture("bert").to_str().unwrap(),
        "-o",
        b,
    ]);
    assert!(o.status.success());
    let r = reference_json("bert");
    let o = kiln(&[
        "fill-mask",
        "--model",
        b,
        "--text",
        r["text"].as_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j["masks"][0]["top"][0]["token_id"],
        r["fill_mask"][0]["token_id"]
    );
    let o = kiln(&["embed", "--model", b, "--text", "a cat", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `kiln bench model` on an artifact reports the precision the artifact was compiled for (not
/// the `--precision` flag's default).
#[test]
fn bench_model_reports_an_artifacts_precision() {
    let path = compiled_file("llama", Precision::Bf16, "bench");
    let o = kiln(&[
        "bench",
        "model",
        "--model",
        path.to_str().unwrap(),
        "--prompt-len",
        "4",
        "--gen",
        "2",
        "--runs",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["precision"], "bf16", "{j}");
}

/// The llama artifact's bytes, and a function giving the byte range of field `at` (bytes) of
/// section-table entry `i`.
fn llama_bytes() -> Vec<u8> {
    compiled("llama", Precision::F32)
}

fn entry(i: usize, at: usize) -> std::ops::Range<usize> {
    64 + 32 * i + at..64 + 32 * i + at + 8
}

fn refusal(bytes: &[u8]) -> String {
    match Artifact::from_bytes(bytes, "t.kiln") {
        Ok(_) => panic!("accepted a bad artifact"),
        Err(e) => e.to_string(),
    }
}

fn edited(f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut b = llama_bytes();
    f(&mut b);
    refusal(&b)
}

fn edited_resealed(f: impl FnOnce(&mut Vec<u8>)) -> String {
    edited(|b| {
        f(b);
        reseal(b);
    })
}

/// A section's byte range, from the table.
fn section(b: &[u8], i: usize) -> std::ops::Range<usize> {
    let off = u64::from_le_bytes(b[entry(i, 8)].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(b[entry(i, 16)].try_into().unwrap()) as usize;
    off..off + len
}

#[test]
fn bad_files_are_refused_with_their_message() {
    let good = llama_bytes();
    let len = good.len();
    assert!(Artifact::from_bytes(&good, "t.kiln").is_ok());
    let cases: Vec<(String, &str)> = vec![
        (refusal(&good[..len - 100]), "is truncated"),
        (refusal(&good[..40]), "is truncated"),
        (refusal(b"{\"not\": 1}"), "not a kiln artifact"),
        (refusal(b""), "not a kiln artifact"),
        (edited(|b| b.extend([0; 64])), "trailing data"),
        (edited_resealed(|b| b[8] = 1), "format version 1"),
        (edited_resealed(|b| b[8] = 3), "format version 3"),
        (edited_resealed(|b| b[8] = 5), "format version 5"),
        (edited(|b| b[20] ^= 1), "header is corrupt"),
        (edited(|b| b[64 + 24] ^= 1), "section table is corrupt"),
        (
            edited(|b| {
                let s = section(b, 6);
                b[s.start + 100] ^= 0x10
            }),
            "section 6 (weight_data) is corrupt",
        ),
        (
            edited(|b| {
                let s = section(b, 0);
                b[s.start + 3] ^= 1
            }),
            "section 0 (manifest) is corrupt",
        ),
        (
            edited_resealed(|b| b[entry(6, 8)].copy_from_slice(&(1u64 << 60).to_le_bytes())),
            "past the end of the file",
        ),
        (
            edited_resealed(|b| b[entry(6, 16)].copy_from_slice(&u64::MAX.to_le_bytes())),
            "overflow",
        ),
        (
            edited_resealed(|b| b[12..16].copy_from_slice(&u32::MAX.to_le_bytes())),
            "at most 64",
        ),
        (
            edited_resealed(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
            "is truncated",
        ),
        (
            edited_resealed(|b| {
                let start = section(b, 1).start as u64;
                b[entry(2, 8)].copy_from_slice(&start.to_le_bytes())
            }),
            "overlaps",
        ),
        (
            edited_resealed(|b| b[entry(1, 0)][..4].copy_from_slice(&99u32.to_le_bytes())),
            "unknown kind 99",
        ),
        (
            edited_resealed(|b| b[entry(1, 0)][..4].copy_from_slice(&9u32.to_le_bytes())),
            "reads kinds 1–8, so a newer kiln may have written it; compile the model again",
        ),
        (
            edited_resealed(|b| {
                let s = section(b, 0);
                b[s.start] = b'[';
            }),
            "section 0 (manifest)",
        ),
        (
            edited_resealed(|b| {
                let s = section(b, 1);
                b[s.start + 1] = 0xff;
            }),
            "not UTF-8",
        ),
        (
            edited_resealed(|b| {
                let s = section(b, 2);
                b[s.start..s.start + 2].copy_from_slice(b"?!");
            }),
            "the decode graph",
        ),
    ];
    for (got, want) in &cases {
        assert!(got.contains(want), "expected {want:?} in: {got}");
    }
    // The weight index disagreeing with its bytes, and with the graphs.
    let mut art = Artifact::from_bytes(&good, "t.kiln").unwrap();
    let index = section(&good, 5);
    let text = String::from_utf8(good[index.clone()].to_vec()).unwrap();
    let mut grown = good.clone();
    let edited_index = text.replacen("\"shape\":[320,32]", "\"shape\":[321,32]", 1);
    assert_ne!(edited_index, text);
    assert_eq!(edited_index.len(), text.len());
    grown[index].copy_from_slice(edited_index.as_bytes());
    reseal(&mut grown);
    let e = refusal(&grown);
    assert!(e.contains("bytes do not hold"), "{e}");
    // A wrong target, written properly.
    art.manifest.target = "cuda-sm90".into();
    let cuda = write::to_bytes(&art.manifest, &art.graphs, &art.params, &art.assets, None).unwrap();
    let e = refusal(&cuda);
    assert!(
        e.contains("compiled for target cuda-sm90, but this runtime runs on cpu only"),
        "{e}"
    );
    // And through the CLI: exit code 2 and the message, for a command given the bad file.
    let bad = temp("truncated.kiln");
    std::fs::write(&bad, &good[..len / 2]).unwrap();
    refused(
        &[
            "generate",
            "--model",
            bad.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &["is truncated"],
    );
    let cuda_file = temp("cuda.kiln");
    let o = kiln(&[
        "compile",
        "--model",
        fixture("llama").to_str().unwrap(),
        "-o",
        cuda_file.to_str().unwrap(),
        "--target",
        "cuda:sm_90",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    refused(
        &[
            "forward",
            "--model",
            cuda_file.to_str().unwrap(),
            "--tokens",
            "1",
        ],
        &["compiled for target cuda-sm90"],
    );
    refused(
        &[
            "compile",
            "--model",
            fixture("llama").to_str().unwrap(),
            "-o",
            "x.kiln",
            "--target",
            "tpu",
        ],
        &["unknown target"],
    );
}

/// The recorded execution plan is checked against the one the runtime derives: a kernel
/// changed in the file (checksums resealed), a memory plan changed, or no plan at all is
/// refused with the first difference; `kiln inspect` prints the recorded plan.
#[test]
fn a_plan_this_runtime_does_not_derive_is_refused() {
    let good = llama_bytes();
    let with_plan =
        |f: &dyn Fn(&mut serde_json::Value)| with_json(&good, SectionKind::Plan, |p| f(p));
    let (_, bytes) = sections_of(&good)
        .into_iter()
        .find(|(k, _)| *k == SectionKind::Plan)
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let prefill = &plan["graphs"][0];
    assert_eq!(prefill["name"], "prefill");
    let kernels = prefill["kernels"].as_array().unwrap();
    let at = kernels
        .iter()
        .position(|k| k["kernel"].as_str().unwrap().starts_with("linear"))
        .unwrap();
    let node = kernels[at]["node"].as_u64().unwrap();
    // The step's parameters changed (the weight read as stored instead of transposed).
    let e = refusal(&with_plan(&|p| {
        let k = &mut p["graphs"][0]["kernels"][at]["step"];
        let s = k
            .as_str()
            .unwrap()
            .replacen("transposed: true", "transposed: false", 1);
        *k = s.into();
    }));
    assert!(
        e.contains("with an execution plan this runtime does not reproduce")
            && e.contains(&format!("in the prefill graph it runs %{node}: Linear("))
            && e.contains("recompile it with this kiln"),
        "{e}"
    );
    // Another kernel for the node.
    let e = refusal(&with_plan(&|p| {
        p["graphs"][0]["kernels"][at]["kernel"] = "reference".into()
    }));
    assert!(
        e.contains(&format!(
            "it runs %{node}: reference, this runtime would run %{node}: linear"
        )),
        "{e}"
    );
    // A node's buffer.
    let e = refusal(&with_plan(&|p| {
        let slot = &mut p["graphs"][1]["slots"][3][1];
        *slot = (slot.as_u64().unwrap() + 1).into();
    }));
    assert!(e.contains("the decode graph's memory plan differs"), "{e}");
    // No plan.
    let mut sections = sections_of(&good);
    sections.retain(|(k, _)| *k != SectionKind::Plan);
    let e = refusal(&write::assemble(&sections));
    assert!(e.contains("no plan section"), "{e}");
    // The recorded plan, printed.
    let file = temp("plan.kiln");
    std::fs::write(&file, &good).unwrap();
    let o = kiln(&["inspect", "--model", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let name = kernels[at]["kernel"].as_str().unwrap();
    assert!(
        out.contains("prefill CPU plan: ") && out.contains(&format!("  %{node}: {name}\n")),
        "{out}"
    );
}

/// The sections of artifact bytes, in table order.
fn sections_of(b: &[u8]) -> Vec<(SectionKind, Vec<u8>)> {
    let count = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| {
            let code = u32::from_le_bytes(b[entry(i, 0)][..4].try_into().unwrap());
            (
                SectionKind::from_code(code).unwrap(),
                b[section(b, i)].to_vec(),
            )
        })
        .collect()
}

/// `good` (well formed) with its JSON section of kind `kind` edited by `f`, laid out and sealed
/// again.
fn with_json(good: &[u8], kind: SectionKind, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut sections = sections_of(good);
    let (_, bytes) = sections.iter_mut().find(|(k, _)| *k == kind).unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    f(&mut value);
    *bytes = serde_json::to_vec(&value).unwrap();
    write::assemble(&sections)
}

/// `good` with its weight index's entries edited by `f`.
fn with_index(good: &[u8], f: impl FnOnce(&mut Vec<serde_json::Value>)) -> Vec<u8> {
    with_json(good, SectionKind::WeightIndex, |v| {
        if let Some(entries) = v.as_array_mut() {
            f(entries)
        }
    })
}

/// A record of made-up modules (the runtime never reads them as MLIR), sorted by key.
fn made_up_mlir() -> MlirRecord {
    let kernel = |key: &str| CarriedKernel {
        key: key.to_string(),
        target: "cpu".to_string(),
        mlir: format!("module {{\n  // {key}\n}}\n"),
    };
    MlirRecord::new(vec![
        kernel("softmax axis=1 | ?x7 split, ?x7 split | params "),
        kernel("rmsnorm eps=1e-6 | ?x32 split, 32, ?x32 split | params "),
    ])
}

/// `good` with an MLIR section holding `record` appended (as the writer places it).
fn with_mlir(good: &[u8], record: &MlirRecord) -> Vec<u8> {
    let mut sections = sections_of(good);
    sections.push((SectionKind::Mlir, serde_json::to_vec(record).unwrap()));
    write::assemble(&sections)
}

/// The MLIR section: absent in a default compile; written last and deterministically,
/// leaving every other section as it was, and read back equal; a corrupt, malformed,
/// duplicated or inconsistent one refused with its message, by the reader and the writer.
#[test]
fn carried_mlir_round_trips_and_bad_sections_are_refused() {
    let good = llama_bytes();
    let art = Artifact::from_bytes(&good, "t.kiln").unwrap();
    assert!(art.mlir().is_none());
    let record = made_up_mlir();
    let write = |r: &MlirRecord| {
        write::to_bytes(
            &art.manifest,
            &art.graphs,
            &art.params,
            &art.assets,
            Some(r),
        )
    };
    let with = write(&record).unwrap();
    assert_eq!(with, write(&record).unwrap(), "deterministic");
    assert_eq!(with, with_mlir(&good, &record), "appended after the others");
    let back = Artifact::from_bytes(&with, "t.kiln").unwrap();
    assert_eq!(back.mlir(), Some(&record));
    let key = &record.kernels[1].key;
    assert_eq!(
        back.mlir().unwrap().module(key),
        Some(&*record.kernels[1].mlir)
    );
    // Corrupt bytes, then malformed JSON resealed.
    let at = sections_of(&with).len() - 1;
    let mut flipped = with.clone();
    flipped[section(&with, at).start + 3] ^= 1;
    let e = refusal(&flipped);
    assert!(
        e.contains(&format!("section {at} (mlir) is corrupt")),
        "{e}"
    );
    reseal(&mut flipped);
    let e = refusal(&flipped);
    assert!(e.contains(&format!("section {at} (mlir): ")), "{e}");
    // Records the reader refuses.
    type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 5] = [
        (
            &|m| m["kernels"][1]["key"] = m["kernels"][0]["key"].clone(),
            "listed twice",
        ),
        (
            &|m| m["kernels"][0]["target"] = "cuda".into(),
            "target \"cuda\"",
        ),
        (
            &|m| m["kernels"][0]["mlir"] = "".into(),
            "empty key or module",
        ),
        (&|m| m["kernels"][0]["extra"] = 1.into(), "unknown field"),
        (&|m| m["kernels"] = "all".into(), "section"),
    ];
    for (edit, message) in cases {
        let e = refusal(&with_json(&with, SectionKind::Mlir, edit));
        assert!(e.contains(message), "{message}: {e}");
    }
    let mut twice = sections_of(&with);
    twice.push(twice[at].clone());
    let e = refusal(&write::assemble(&twice));
    assert!(e.contains("more than one mlir section"), "{e}");
    // The writer refuses a record it could not read back.
    let mut dup = record.clone();
    dup.kernels.push(dup.kernels[0].clone());
    let e = write(&dup).unwrap_err().to_string();
    assert!(
        e.contains("the MLIR section") && e.contains("listed twice"),
        "{e}"
    );
    // `kiln inspect` lists the section and prints its modules (in any build: they are text);
    // an artifact without one says so.
    let file = temp("mlir.kiln");
    std::fs::write(&file, &with).unwrap();
    let path = file.to_str().unwrap();
    let o = kiln(&["inspect", "--model", path]);
    let out = String::from_utf8_lossy(&o.stdout);
    let bytes = record.text_bytes();
    assert!(
        out.contains(&format!("mlir: 2 kernels, {bytes} bytes")),
        "{out}"
    );
    let o = kiln(&["inspect", "--model", path, "--emit", "mlir"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    for k in &record.kernels {
        assert!(
            out.contains(&format!("// {} (cpu)\n{}", k.key, k.mlir)),
            "{out}"
        );
    }
    let plain = temp("plain.kiln");
    std::fs::write(&plain, &good).unwrap();
    let plain = plain.to_str().unwrap();
    let o = kiln(&["inspect", "--model", plain]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("mlir: none"));
    refused(
        &["inspect", "--model", plain, "--emit", "mlir"],
        &["carries no MLIR", "--emit-mlir"],
    );
}

/// Packed weights whose layout, orientation, dtype, shape or padding disagree with what
/// packing makes are refused with their message; a weight listed plain and packed, too.
#[test]
fn bad_packed_weights_are_refused() {
    let good = compiled("llama", Precision::Bf16);
    let art = Artifact::from_bytes(&good, "t.kiln").unwrap();
    // k_proj is [16, 32], packed as stored: one panel of 32 columns, 16 of them padding.
    let name = "model.layers.0.self_attn.k_proj.weight";
    let at = art.weights.iter().position(|w| w.name == name).unwrap();
    let w = &art.weights[at];
    assert_eq!((w.shape.as_slice(), w.len), (&[16, 32][..], 16 * 32 * 4));
    assert!(w.packed.as_ref().unwrap().transposed);
    let rebuilt = with_index(&good, |_| {});
    assert!(
        Artifact::from_bytes(&rebuilt, "t.kiln").is_ok(),
        "an unedited index loads"
    );
    let edit = |f: &dyn Fn(&mut serde_json::Value)| refusal(&with_index(&good, |e| f(&mut e[at])));
    let cases = [
        (
            edit(&|e| e["packed"]["layout"] = "bf16-panels16".into()),
            "packed in layout \"bf16-panels16\"; this build packs",
        ),
        (
            edit(&|e| e["packed"]["transposed"] = false.into()),
            "2048 bytes do not hold a bf16 tensor of shape [16, 32], packed",
        ),
        (
            edit(&|e| e["dtype"] = "f32".into()),
            "only 2-D bf16 tensors are packed",
        ),
        (
            edit(&|e| e["shape"] = serde_json::json!([16, 32, 1])),
            "only 2-D bf16 tensors are packed",
        ),
        (
            edit(&|e| e["shape"] = serde_json::json!([64, 32])),
            "do not hold a bf16 tensor of shape [64, 32], packed",
        ),
        (
            // The same words (one panel), but not the graphs' shape.
            edit(&|e| e["shape"] = serde_json::json!([32, 32])),
            "is bf16 [32, 32], but the prefill graph declares bf16[16, 32]",
        ),
        (
            edit(&|e| e["packed"]["extra"] = 1.into()),
            "unknown field `extra`",
        ),
        (
            refusal(&with_index(&good, |e| {
                let mut plain = e[at].clone();
                plain.as_object_mut().unwrap().remove("packed");
                e.insert(at + 1, plain);
            })),
            "listed twice",
        ),
    ];
    for (got, want) in &cases {
        assert!(got.contains(want), "expected {want:?} in: {got}");
    }
    // A non-zero word in the padding columns (past n = 16) of the first k pair.
    let mut bad = good.clone();
    let data = art
        .sections
        .iter()
        .find(|s| s.kind == SectionKind::WeightData)
        .unwrap();
    let word = (data.offset + w.offset) as usize + 20 * 4;
    assert_eq!(bad[word..word + 4], [0; 4]);
    bad[word] = 1;
    reseal(&mut bad);
    let e = refusal(&bad);
    assert!(
        e.contains(&format!(
            "weight {name:?}: bad operand layout: a packed 16x32 bf16 matrix has non-zero padding"
        )),
        "{e}"
    );
}

/// `good` with one byte of its first weight tensor flipped (checksums left as they were), and
/// the index of the weight data section.
fn weight_byte_flipped(good: &[u8]) -> (Vec<u8>, usize) {
    let art = Artifact::from_bytes(good, "t.kiln").unwrap();
    let data = art
        .sections
        .iter()
        .position(|s| s.kind == SectionKind::WeightData)
        .unwrap();
    let w = &art.weights[0];
    assert!(w.len > 0, "{} is empty", w.name);
    let at = (art.sections[data].offset + w.offset + w.len / 2) as usize;
    let mut bad = good.to_vec();
    bad[at] ^= 0x04;
    (bad, data)
}

/// The weights of an opened artifact are used in place from the file (bool tensors, whose bytes
/// are checked, excepted), packed ones too, and equal the weights of the model it was compiled
/// from; the CPU backend makes no packed copy of them (where it does from the directory), and
/// running the model decodes or unpacks none.
#[test]
fn artifact_weights_are_used_in_place() {
    for (name, precision) in [
        ("llama", Precision::F32),
        ("llama", Precision::Bf16),
        ("llama", Precision::Fp8),
        ("llama_tied", Precision::Bf16),
        ("gpt2", Precision::Bf16),
        ("distilbert", Precision::F32),
    ] {
        let label = format!("{name} {}", precision.name());
        let path = compiled_file(name, precision, "in-place");
        let art = Artifact::open(&path).unwrap();
        art.verify().unwrap();
        let opts = LoadOptions {
            precision,
            ..Default::default()
        };
        let model = load::model_with(&fixture(name), &opts).unwrap().model;
        let source = match &model {
            Model::Causal(m) => m.lm.params(),
            Model::Encoder(e) => e.runner.parts().1,
        };
        assert_eq!(art.params.len(), source.len(), "{label}");
        let packed = |t: &Tensor| t.packed_form(true).or(t.packed_form(false)).is_some();
        let narrow = precision != Precision::F32;
        assert_eq!(
            art.params.values().any(packed),
            narrow,
            "{label}: packed weights"
        );
        let prepared = |params: &std::collections::HashMap<String, Tensor>| {
            let graphs = art.graphs.clone();
            CpuGraph::compile(graphs, params).unwrap()[0].prepared_weight_bytes()
        };
        assert_eq!(prepared(&art.params), 0, "{label}: packed at load");
        assert_eq!(prepared(source) > 0, narrow, "{label}: from the directory");
        for (pname, t) in &art.params {
            assert_eq!(
                t.is_borrowed(),
                t.dtype() != DType::Bool,
                "{label}: {pname}"
            );
            assert!(!t.has_decoded_copy(), "{label}: {pname} unpacked at load");
            assert!(source[pname] == *t, "{label}: {pname} differs");
        }
        // Running the model reads the weights where they are: no tensor decodes a copy.
        let model = Model::open(&path).unwrap();
        let params = match &model {
            Model::Causal(m) => {
                m.forward(&[1, 2, 3]).unwrap();
                m.lm.params()
            }
            Model::Encoder(e) => {
                e.run(&[vec![1, 2, 3]]).unwrap();
                e.runner.parts().1
            }
        };
        for (pname, t) in params {
            assert!(!t.has_decoded_copy(), "{label}: {pname} was copied to run");
        }
    }
}

/// One flipped weight byte: opening the file does not wait for the weights' checksum, but
/// nothing computed from them comes out — every output method, the streamed text and the CLI
/// report the corrupt section instead.
#[test]
fn a_flipped_weight_byte_is_reported_before_any_output() {
    let message = |data: usize| format!("section {data} (weight_data) is corrupt");
    // A causal LM.
    let (bad, data) = weight_byte_flipped(&llama_bytes());
    assert!(refusal(&bad).contains(&message(data)), "in memory");
    let path = temp("flipped-llama.kiln");
    std::fs::write(&path, &bad).unwrap();
    let Model::Causal(mut m) = Model::open(&path).unwrap() else {
        panic!("not a causal LM")
    };
    let e = m.forward(&[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains(&message(data)), "forward: {e}");
    let mut cfg = m.generation_config().unwrap();
    cfg.do_sample = false;
    cfg.max_new_tokens = Some(3);
    let mut streamed = String::new();
    let e = m
        .generate_streaming("Hello", &cfg, 0, &mut |t| streamed.push_str(t))
        .unwrap_err();
    assert!(e.to_string().contains(&message(data)), "generate: {e}");
    assert!(e.is_input(), "a bad file is the user's input");
    assert_eq!(streamed, "", "no text may leave before the check");
    assert!(m.verify().is_err());
    let o = kiln(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&message(data)), "{err}");
    assert!(
        String::from_utf8_lossy(&o.stdout).trim().is_empty(),
        "nothing generated may be printed"
    );
    refused(
        &[
            "forward",
            "--model",
            path.to_str().unwrap(),
            "--tokens",
            "1",
        ],
        &[&message(data)],
    );
    refused(
        &["inspect", "--model", path.to_str().unwrap()],
        &[&message(data)],
    );
    // An encoder.
    let (bad, data) = weight_byte_flipped(&compiled("distilbert", Precision::F32));
    let path = temp("flipped-distilbert.kiln");
    std::fs::write(&path, &bad).unwrap();
    let Model::Encoder(m) = Model::open(&path).unwrap() else {
        panic!("not an encoder")
    };
    let e = m.embed(&["a cat"]).unwrap_err().to_string();
    assert!(e.contains(&message(data)), "embed: {e}");
    let Err(e) = m.run(&[vec![1, 2]]) else {
        panic!("run gave outputs of corrupt weights")
    };
    assert!(e.to_string().contains(&message(data)), "run: {e}");
    refused(
        &[
            "embed",
            "--model",
            path.to_str().unwrap(),
            "--text",
            "a cat",
        ],
        &[&message(data)],
    );
}

/// A small deterministic generator (xorshift64*), so that a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `good`, chosen by `rng`.
fn mutate(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = good.to_vec();
    let huge = [
        0,
        1,
        63,
        64,
        u64::from(u32::MAX),
        u64::MAX,
        u64::MAX - 63,
        1 << 40,
        1 << 63,
        good.len() as u64,
        good.len() as u64 + 64,
    ];
    let mode = rng.below(9);
    match mode {
        // A field of a carried MLIR kernel set to another value (bases with the section).
        8 if sections_of(good)
            .iter()
            .any(|(k, _)| *k == SectionKind::Mlir) =>
        {
            let values = [
                serde_json::json!(null),
                serde_json::json!(""),
                serde_json::json!("cpu"),
                serde_json::json!("cuda"),
                serde_json::json!("softmax axis=1 | ?x7 split, ?x7 split | params "),
                serde_json::json!("module { garbage"),
                serde_json::json!([]),
                serde_json::json!(huge[rng.below(huge.len())]),
            ];
            let value = values[rng.below(values.len())].clone();
            let (pick, whole) = (rng.below(100), rng.below(8) == 0);
            let field = ["key", "target", "mlir"][rng.below(3)];
            return with_json(good, SectionKind::Mlir, |m| {
                if whole {
                    m["kernels"] = value;
                } else if let Some(items) = m["kernels"].as_array_mut().filter(|i| !i.is_empty()) {
                    let n = items.len();
                    items[pick % n][field] = value;
                }
            });
        }
        // A field of the recorded plan set to another value.
        7 => {
            let values = [
                serde_json::json!(null),
                serde_json::json!("linear x"),
                serde_json::json!("reference"),
                serde_json::json!([]),
                serde_json::json!([0, 0]),
                serde_json::json!([u64::MAX, u64::MAX]),
                serde_json::json!(huge[rng.below(huge.len())]),
                serde_json::json!(rng.below(1000)),
            ];
            let value = values[rng.below(values.len())].clone();
            let (graph, pick) = (rng.below(2), rng.below(10_000));
            let list = ["kernels", "slots"][rng.below(2)];
            let field = ["node", "kernel", "step"][rng.below(3)];
            let whole = rng.below(8) == 0;
            return with_json(good, SectionKind::Plan, |p| {
                let Some(g) = p["graphs"].get_mut(graph) else {
                    return;
                };
                if whole {
                    g["buffers"] = value;
                    return;
                }
                if let Some(items) = g[list].as_array_mut().filter(|i| !i.is_empty()) {
                    let n = items.len();
                    let item = &mut items[pick % n];
                    match item.get_mut(field) {
                        Some(f) => *f = value,
                        None => *item = value,
                    }
                }
            });
        }
        // A field of a weight index entry (packing included) set to another value.
        6 => {
            let values = [
                serde_json::json!(null),
                serde_json::json!(true),
                serde_json::json!(false),
                serde_json::json!("bf16"),
                serde_json::json!("f32"),
                serde_json::json!("bf16-panels32-kpairs"),
                serde_json::json!("model.embed_tokens.weight"),
                serde_json::json!([]),
                serde_json::json!([16, 32]),
                serde_json::json!([32, 16]),
                serde_json::json!([u64::MAX, 2]),
                serde_json::json!({"layout": "bf16-panels32-kpairs", "transposed": true}),
                serde_json::json!({"layout": "bf16-panels32-kpairs", "transposed": false}),
                serde_json::json!(huge[rng.below(huge.len())]),
                serde_json::json!(rng.below(1 << 20) * 64),
            ];
            let value = values[rng.below(values.len())].clone();
            let field = ["name", "dtype", "shape", "offset", "len", "packed"][rng.below(6)];
            let sub = ["layout", "transposed"][rng.below(2)];
            let pick = rng.below(1000);
            return with_index(good, |entries| {
                let at = pick % entries.len();
                let e = &mut entries[at];
                match e.get_mut("packed") {
                    Some(p) if p.is_object() && field == "packed" => p[sub] = value,
                    _ => e[field] = value,
                }
            });
        }
        // Bit flips anywhere.
        0 | 1 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        // Truncation.
        2 => b.truncate(rng.below(b.len())),
        // A header or table field overwritten with a huge or boundary value.
        3 => {
            let field = rng.below(64 + 32 * 8) / 4 * 4;
            let v = huge[rng.below(huge.len())].wrapping_add(rng.below(3) as u64);
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            let end = (field + width).min(b.len());
            b[field..end].copy_from_slice(&v.to_le_bytes()[..end - field]);
        }
        // Random bytes over a random stretch.
        4 => {
            let at = rng.below(b.len());
            for x in b.iter_mut().skip(at).take(1 + rng.below(16)) {
                *x = rng.next() as u8;
            }
        }
        // Appended bytes.
        _ => b.extend((0..1 + rng.below(100)).map(|_| rng.next() as u8)),
    }
    // Half the time, make the checksums agree again so that the deeper checks run.
    if rng.below(2) == 0 {
        reseal(&mut b);
    }
    b
}

/// Runs `cases` mutations of real artifacts (a causal LM, f32 and bf16 with packed weights,
/// and with an MLIR section, and an encoder) through the loader; every one must be refused with an error or load, never
/// panic.
fn fuzz(cases: u64) {
    let bases = [
        llama_bytes(),
        compiled("distilbert", Precision::F32),
        compiled("llama", Precision::Bf16),
        with_mlir(&llama_bytes(), &made_up_mlir()),
    ];
    let start = std::time::Instant::now();
    let mut refused = 0u64;
    for case in 0..cases {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ case.wrapping_mul(0x1000_0000_01B3));
        let good = &bases[(case % bases.len() as u64) as usize];
        let bytes = mutate(good, &mut rng);
        let result = std::panic::catch_unwind(|| {
            let art = Artifact::from_bytes(&bytes, "fuzz.kiln")?;
            // Also here (the model parses it on a thread of its own, where a panic would go
            // unnoticed): the tokenizer of a mutated file is refused, never a panic.
            let _ = art.assets.tokenizer();
            art.into_model(&kiln_runtime::deploy::cpu)
        });
        match result {
            Err(_) => panic!("case {case} panicked"),
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(Ok(_)) => {}
        }
    }
    eprintln!(
        "artifact fuzz: {cases} mutated artifacts in {:.1} s, {refused} refused, {} loaded, no panic",
        start.elapsed().as_secs_f64(),
        cases - refused
    );
}

/// `KILN_FUZZ_CASES` mutated artifacts (3,000 unless set; see the module docs for the long run).
#[test]
fn mutated_artifacts_never_panic() {
    let cases = std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    fuzz(cases);
}

#[test]
fn artifact_loading_needs_only_the_runtime() {
    // `cargo tree -p kiln-runtime` must not list the compiler, egg or the model families.
    let o = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "kiln-runtime",
            "--edges",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(common::ROOT)
        .output()
        .expect("run cargo tree");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tree = String::from_utf8_lossy(&o.stdout);
    assert!(tree.contains("kiln-runtime"), "{tree}");
    for banned in ["kiln-compiler", "egg ", "kiln-models", "melior"] {
        assert!(
            !tree.contains(banned),
            "kiln-runtime depends on {banned}:\n{tree}"
        );
    }
}

/// `examples/deploy.rs`, compiled into this test, generates from an artifact what
/// transformers generates, and refuses a bad file.
#[test]
fn the_deploy_example_runs() {
    let r = reference_json("llama");
    let path = compiled_file("llama", Precision::F32, "deploy");
    let mut out = Vec::new();
    let prompt = r["prompt"].as_str().unwrap().to_string();
    deploy::run(&path, &[prompt], &mut out).unwrap();
    let want: Vec<String> = ids(&r["greedy_ids"])[..20]
        .iter()
        .map(u32::to_string)
        .collect();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!("generated ids: [{}]", want.join(", "))),
        "{out}"
    );
    let e = deploy::run(
        &fixture("llama").join("config.json"),
        &["x".into()],
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        e.is_input() && e.to_string().contains("not a kiln artifact"),
        "{e}"
    );
}

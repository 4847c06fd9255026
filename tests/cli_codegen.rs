//! `--codegen native|mlir` on the command line: without the `mlir` feature, `mlir` is refused
//! (exit 2, saying how to get it); with it, `kiln forward --codegen mlir` writes transformers'
//! logits on the CPU and, with `--device cuda`, on a GPU (refused naming CUDA without one; the
//! families one by one are checked in `compiler/tests/mlir_models.rs`, the MLIR-PTX kernels
//! one by one in `compiler/tests/mlir_gpu.rs`); an artifact compiled with `--emit-mlir` runs
//! its carried kernels (edited ones lowered afresh) and matches transformers too.

mod common;

use common::{f32_tensor, fixture, ids, kiln, reference_json, refused};

fn ids_text(v: &serde_json::Value) -> String {
    let ids: Vec<String> = ids(v).iter().map(u32::to_string).collect();
    ids.join(",")
}

/// `kiln forward --codegen mlir --device DEVICE` on the llama fixture: its logits' largest
/// difference from transformers', or `None` after checking the refusal when the build lacks
/// MLIR or (on `cuda`) the machine lacks CUDA.
fn forward_mlir(device: &str) -> Option<f32> {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    let extra = ["--device", device];
    let why: Option<&[&str]> = if !cfg!(feature = "mlir") {
        Some(&["built without MLIR support", "--features mlir"])
    } else if device == "cuda" && kiln_cuda::device::device_count().is_err() {
        Some(&["--device cuda", "CUDA"])
    } else {
        None
    };
    if let Some(fragments) = why {
        let args = forward_args(model, &extra, "unused.safetensors");
        refused(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            fragments,
        );
        return None;
    }
    Some(forward_error(model, &extra, device).0)
}

/// `kiln forward --model MODEL --codegen mlir EXTRA --tokens (the llama prompt) --out OUT`.
fn forward_args(model: &str, extra: &[&str], out: &str) -> Vec<String> {
    let tokens = ids_text(&reference_json("llama")["prompt_ids"]);
    let mut args: Vec<String> = ["forward", "--model", model, "--codegen", "mlir"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    args.extend(["--tokens".into(), tokens, "--out".into(), out.into()]);
    args
}

/// Runs `kiln forward` on `model` (the llama fixture or an artifact of it) with `--codegen
/// mlir` and `extra` flags, `KILN_CODEGEN_LOG` set: the logits' largest difference from
/// transformers', and what it printed on stderr. `tag` names its output file.
fn forward_error(model: &str, extra: &[&str], tag: &str) -> (f32, String) {
    let out = temp(&format!("{tag}.safetensors"));
    let args = forward_args(model, extra, out.to_str().unwrap());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .env("KILN_CODEGEN_LOG", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    let (_, got) = f32_tensor(&out, "logits");
    let (_, want) = f32_tensor(&fixture("llama").join("reference.safetensors"), "logits");
    let _ = std::fs::remove_file(&out);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (err, stderr)
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-codegen-{}-{name}", std::process::id()))
}

#[test]
fn codegen_mlir_forward_matches_transformers_or_says_the_build_lacks_mlir() {
    if let Some(err) = forward_mlir("cpu") {
        assert!(err <= 1e-4, "logits max abs error {err:e}");
    }
}

/// MLIR's PTX kernels in the CUDA backend; on a machine without CUDA, the refusal naming it.
/// (The bound is the CUDA backend's own against transformers, `tests/cuda_models.rs`.)
#[test]
fn codegen_mlir_on_cuda_matches_transformers_or_is_refused_naming_why() {
    if let Some(err) = forward_mlir("cuda") {
        assert!(err <= 5e-4, "logits max abs error {err:e}");
    }
}

/// `kiln compile --emit-mlir` (refused naming the feature in a build without it, and for a
/// CUDA target) carries the kernels' MLIR, byte-identical when repeated; `--codegen mlir` on the artifact compiles every kernel it runs from there
/// (each says so with `KILN_CODEGEN_LOG`) and matches transformers. With the modules edited in
/// the file (resealed, so only the MLIR checks stand in the way), none is used: every kernel
/// is lowered afresh, saying why, and the logits still match.
#[test]
fn codegen_mlir_on_an_artifact_compiles_its_carried_mlir() {
    let model = fixture("llama");
    let art = temp("carried.kiln");
    let compile = [
        "compile",
        "--model",
        model.to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
        "--emit-mlir",
    ];
    if !cfg!(feature = "mlir") {
        refused(
            &compile,
            &[
                "--emit-mlir",
                "built without MLIR support",
                "--features mlir",
            ],
        );
        assert!(!art.exists());
        return;
    }
    let mut cuda = compile.to_vec();
    cuda.extend(["--target", "cuda:sm_90"]);
    refused(&cuda, &["--emit-mlir", "CPU", "cuda-sm90"]);
    let o = kiln(&compile);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = std::fs::read(&art).unwrap();
    assert!(kiln(&compile).status.success());
    assert!(
        first == std::fs::read(&art).unwrap(),
        "compiling twice gives the same bytes"
    );
    let path = art.to_str().unwrap();
    let (err, log) = forward_error(path, &[], "carried");
    assert!(err <= 1e-4, "logits max abs error {err:e}");
    let used = log.matches("compiled from the artifact's MLIR").count();
    assert!(used >= 4, "{log}");
    assert!(!log.contains("lowered afresh"), "{log}");
    // Every `arith.mulf` of every carried module made an `arith.addf` (same length, so the
    // section keeps its place), the checksums recomputed.
    let mut bytes = std::fs::read(&art).unwrap();
    let (from, to) = (b"arith.mulf", b"arith.addf");
    let mut edits = 0;
    for i in 0..bytes.len() - from.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + to.len()].copy_from_slice(to);
            edits += 1;
        }
    }
    assert!(edits > 0);
    kiln::runtime::artifact::reseal(&mut bytes);
    let edited = temp("edited.kiln");
    std::fs::write(&edited, &bytes).unwrap();
    let (err, log) = forward_error(edited.to_str().unwrap(), &[], "edited");
    assert!(err <= 1e-4, "logits max abs error {err:e}");
    assert!(
        log.contains("lowered afresh: the carried module is not this kiln's lowering"),
        "{log}"
    );
    let fresh = log.matches("lowered afresh").count();
    assert!(
        fresh >= 1 && fresh + log.matches("compiled from the artifact").count() == used,
        "{log}"
    );
    let _ = [std::fs::remove_file(&art), std::fs::remove_file(&edited)];
}

#[test]
fn codegen_rejects_an_unknown_backend() {
    let model = fixture("llama");
    let o = kiln(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--codegen",
        "bogus",
        "--tokens",
        "1,2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("native") && e.contains("mlir"), "{e}");
}

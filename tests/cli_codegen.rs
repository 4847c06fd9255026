//! `--codegen native|mlir` on the command line: without the `mlir` feature, `mlir` is refused
//! (exit 2, saying how to get it); with it, `kiln forward --codegen mlir` writes transformers'
//! logits on the CPU and, with `--device cuda`, on a GPU (refused naming CUDA without one; the
//! families one by one are checked in `compiler/tests/mlir_models.rs`, the MLIR-PTX kernels
//! one by one in `compiler/tests/mlir_gpu.rs`).

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
    let tokens = ids_text(&reference_json("llama")["prompt_ids"]);
    let out = std::env::temp_dir().join(format!(
        "kiln-codegen-{device}-{}.safetensors",
        std::process::id()
    ));
    let args = [
        "forward",
        "--model",
        model,
        "--device",
        device,
        "--codegen",
        "mlir",
        "--tokens",
        &tokens,
        "--out",
        out.to_str().unwrap(),
    ];
    if !cfg!(feature = "mlir") {
        refused(&args, &["built without MLIR support", "--features mlir"]);
        return None;
    }
    if device == "cuda" && kiln_cuda::device::device_count().is_err() {
        refused(&args, &["--device cuda", "CUDA"]);
        return None;
    }
    let o = kiln(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, got) = f32_tensor(&out, "logits");
    let (_, want) = f32_tensor(&fixture("llama").join("reference.safetensors"), "logits");
    let _ = std::fs::remove_file(&out);
    Some(
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max),
    )
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

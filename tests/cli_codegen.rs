//! `--codegen native|mlir` on the command line: without the `mlir` feature, `mlir` is refused
//! (exit 2, saying how to get it); with it, `kiln forward --codegen mlir` writes transformers'
//! logits (the families one by one are checked in `compiler/tests/mlir_models.rs`).

mod common;

use common::{f32_tensor, fixture, ids, kiln, reference_json, refused};

fn ids_text(v: &serde_json::Value) -> String {
    let ids: Vec<String> = ids(v).iter().map(u32::to_string).collect();
    ids.join(",")
}

#[test]
fn codegen_mlir_forward_matches_transformers_or_says_the_build_lacks_mlir() {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    let tokens = ids_text(&reference_json("llama")["prompt_ids"]);
    let out = std::env::temp_dir().join(format!("kiln-codegen-{}.safetensors", std::process::id()));
    let args = [
        "forward",
        "--model",
        model,
        "--device",
        "cpu",
        "--codegen",
        "mlir",
        "--tokens",
        &tokens,
        "--out",
        out.to_str().unwrap(),
    ];
    if !cfg!(feature = "mlir") {
        refused(&args, &["built without MLIR support", "--features mlir"]);
        return;
    }
    let o = kiln(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, got) = f32_tensor(&out, "logits");
    let (_, want) = f32_tensor(&fixture("llama").join("reference.safetensors"), "logits");
    let _ = std::fs::remove_file(&out);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err <= 1e-4, "logits max abs error {err:e}");
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

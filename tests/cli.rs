//! The `kiln` command line, end to end: running a traced Llama layer against transformers'
//! output, inspecting, and refusing bad input with exit code 2 and a clear message.

mod common;

use common::{f32_tensor, kiln, refused, ROOT};
use std::path::{Path, PathBuf};
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-cli-{}-{name}", std::process::id()))
}

const BLOCK: &str = "tests/fixtures/core/llama_block.safetensors";

#[test]
fn run_llama_block_matches_transformers() {
    let out = temp("block.safetensors");
    let o = kiln(&[
        "run",
        "--graph",
        "examples/llama_block.kir",
        "--weights",
        BLOCK,
        "--inputs",
        BLOCK,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.starts_with("output.hidden_states: f32[2, 7, 64]"),
        "{stdout}"
    );
    let (shape, got) = f32_tensor(&out, "output.hidden_states");
    let (want_shape, want) = f32_tensor(
        Path::new(&format!("{ROOT}/{BLOCK}")),
        "output.hidden_states",
    );
    assert_eq!(shape, want_shape);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Same tolerance as the library test: 1e-5 absolute.
    assert!(err <= 1e-5, "max abs error {err:e}");
    std::fs::remove_file(out).ok();
}

#[test]
fn inspect_prints_parseable_ir_and_summary() {
    let o = kiln(&["inspect", "--graph", "examples/llama_block.kir"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("# parameters: 9 ("), "{text}");
    assert!(
        text.contains("# ops:") && text.contains("matmul×"),
        "{text}"
    );
    let reparsed = kiln::ir::text::parse(&text).unwrap();
    let original = kiln::ir::text::parse(
        &std::fs::read_to_string(format!("{ROOT}/examples/llama_block.kir")).unwrap(),
    )
    .unwrap();
    assert_eq!(reparsed, original);
}

fn write_temp(name: &str, contents: &[u8]) -> PathBuf {
    let p = temp(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    refused(
        &["inspect", "--graph", "no/such/file.kir"],
        &["no/such/file.kir", "No such file"],
    );
    let syntax = write_temp(
        "syntax.kir",
        b"%0: f32[2] = input \"x\"\n%1: f32[2] = exq(%0)\n",
    );
    refused(
        &["inspect", "--graph", syntax.to_str().unwrap()],
        &["line 2, column", "exq"],
    );
    let invalid = write_temp(
        "invalid.kir",
        b"%0: f32[2] = input \"x\"\n%1: f32[3] = exp(%0)\noutput \"y\" = %1\n",
    );
    refused(
        &["inspect", "--graph", invalid.to_str().unwrap()],
        &["%1 (exp)", "declared type f32[3]"],
    );
    let truncated = std::fs::read(format!("{ROOT}/{BLOCK}")).unwrap();
    let truncated = write_temp("trunc.safetensors", &truncated[..truncated.len() / 2]);
    refused(
        &[
            "run",
            "--graph",
            "examples/llama_block.kir",
            "--weights",
            truncated.to_str().unwrap(),
        ],
        &["trunc.safetensors", "truncated"],
    );
    let no_params = write_temp("empty.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}");
    refused(
        &[
            "run",
            "--graph",
            "examples/llama_block.kir",
            "--weights",
            no_params.to_str().unwrap(),
        ],
        &["input_layernorm.weight"],
    );
    refused(
        &[
            "run",
            "--graph",
            "examples/llama_block.kir",
            "--weights",
            BLOCK,
        ],
        &["input.hidden_states"],
    );
    refused(&["run", "--bogus"], &["--bogus"]);
    for p in [syntax, invalid, truncated, no_params] {
        std::fs::remove_file(p).ok();
    }
}

/// Output piped into a reader that is gone (`kiln inspect ... | head` once `head` has exited)
/// ends the process quietly (SIGPIPE), without a panic message: here the reader closes the pipe
/// before kiln has written anything (it takes tens of milliseconds to trace the model).
#[test]
fn a_reader_that_stops_early_is_not_a_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["inspect", "--model", "tests/fixtures/hf/llama"])
        .current_dir(ROOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(!status.success(), "{status:?}");
}

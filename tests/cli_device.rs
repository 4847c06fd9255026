//! `--device` on a machine without CUDA (CI's): `cuda` fails with one message naming CUDA, and
//! `auto` runs on the CPU with output identical to `--device cpu`. (On a GPU machine,
//! `tests/cuda_models.rs` checks the CUDA runs.)

mod common;

use common::{fixture, kiln, refused};

fn llama() -> String {
    fixture("llama").display().to_string()
}

#[test]
fn device_cuda_is_refused_naming_cuda() {
    let m = llama();
    refused(
        &[
            "generate", "--model", &m, "--prompt", "The cat", "--device", "cuda",
        ],
        &["--device cuda", "CUDA"],
    );
    refused(
        &[
            "forward", "--model", &m, "--tokens", "1,2,3", "--device", "cuda",
        ],
        &["CUDA"],
    );
    refused(
        &["bench", "ceilings", "--device", "cuda"],
        &["--device cuda", "CUDA"],
    );
    refused(
        &[
            "bench", "kernel", "--op", "gemv", "--shape", "64x64", "--dtype", "bf16", "--device",
            "cuda",
        ],
        &["CUDA"],
    );
}

#[test]
fn device_auto_matches_cpu() {
    let m = llama();
    let run = |device: &str| {
        let o = kiln(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "The cat",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
            "--device",
            device,
        ]);
        assert!(
            o.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let cpu = run("cpu");
    assert!(!cpu.is_empty());
    assert_eq!(run("auto"), cpu);
}

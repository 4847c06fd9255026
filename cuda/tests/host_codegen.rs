//! The generated elementwise CUDA C run on the CPU: the kernel text (with kiln's real scalar
//! helpers, `cu/math.cuh`) compiled by the host C++ compiler against `tests/host/shim.h`, one
//! thread covering every element, on random inputs with broadcasting, compared with the
//! reference executor. This checks the code generator's semantics (op mapping, rounding to
//! each node's dtype, integer wrapping, casts, broadcast index math) without a GPU; the GPU
//! run (`tests/gpu.rs`) checks the same kernels with CUDA's own conversions and math.
//! fp8 bodies are left to the GPU (the host has no fp8 conversions of CUDA's).
//! Needs `c++`; without it the test prints a notice and returns, unless
//! `KILN_REQUIRE_NVRTC=1` (CI), which makes that a failure.

mod common;
mod gpu_support;

use common::generated_kernels;
use gpu_support::{assert_matches, elementwise_case, from_bytes, rng, to_bytes};
use kiln_cuda::codegen::elementwise::{ArgLayout, Elementwise, Plan};
use kiln_cuda::codegen::{c_type, MATH};
use kiln_cuda::Arch;
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op};
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use std::collections::HashMap;
use std::fmt::Write;
use std::process::Command;

fn c_array(name: &str, bytes: &[u8]) -> String {
    let mut s = format!("alignas(16) static const unsigned char {name}[] = {{");
    for b in bytes {
        let _ = write!(s, "{b},");
    }
    s + "0};\n"
}

/// Runs `ew` over `args` (broadcast by `plan`) through the host compiler, once with aligned
/// buffers (the kernel's vector path) and once with the output one element off 16-byte
/// alignment (its scalar path); each run's output bytes and error flag.
fn run_on_host(
    dir: &std::path::Path,
    ew: &Elementwise,
    args: &[Tensor],
    plan: &Plan,
) -> [(Vec<u8>, i32); 2] {
    let out_dt = ew.out_dtype().unwrap();
    let n: usize = plan.out.iter().product();
    let mut src = String::from(include_str!("host/shim.h"));
    src += MATH;
    src += &ew.kernel_text(Arch::Sm80).unwrap();
    for (i, a) in args.iter().enumerate() {
        src += &c_array(&format!("in{i}"), &to_bytes(a));
    }
    let meta: Vec<String> = plan.meta.iter().map(|m| format!("{m}LL")).collect();
    let _ = write!(
        src,
        "static const i64 meta[] = {{{}, 0}};\nalignas(16) static {} out_store[{}];\nint main(int argc, char**) {{\n    int err = 0;\n    auto* out = out_store + (argc > 1);\n    {}(out",
        meta.join(", "),
        c_type(out_dt),
        n + 1,
        ew.entry()
    );
    for (i, d) in ew.args.iter().enumerate() {
        let _ = write!(src, ", (const {}*)in{i}", c_type(*d));
    }
    let _ = write!(
        src,
        ", meta, {n}, &err);\n    fwrite(out, sizeof(out[0]), {n}, stdout);\n    return err;\n}}\n"
    );
    let file = dir.join(format!("{}.cpp", ew.entry()));
    let exe = dir.join(ew.entry());
    std::fs::write(&file, src).unwrap();
    let cc = Command::new("c++")
        .args(["-std=c++17", "-O1", "-ffp-contract=off", "-w", "-o"])
        .arg(&exe)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    [&[][..], &["misaligned"][..]].map(|a| {
        let o = Command::new(&exe).args(a).output().unwrap();
        (o.stdout, o.status.code().unwrap_or(-1))
    })
}

fn reference(ew: &Elementwise, args: &[Tensor]) -> Tensor {
    let t = Tracer::new();
    let xs: Vec<_> = args
        .iter()
        .enumerate()
        .map(|(i, a)| t.input(&format!("a{i}"), a.dtype(), a.shape().iter().copied()))
        .collect();
    let y = t
        .apply(
            Op::FusedElementwise {
                body: ew.body.clone(),
            },
            &xs.iter().collect::<Vec<_>>(),
        )
        .unwrap();
    t.output("y", &y);
    let inputs: HashMap<String, Tensor> = args
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("a{i}"), a.clone()))
        .collect();
    run(&t.finish().unwrap(), &inputs, &NoParams).unwrap()["y"].clone()
}

#[test]
fn generated_elementwise_runs_on_the_host_as_the_reference() {
    if Command::new("c++").arg("--version").output().is_err() {
        let msg = "generated_elementwise_runs_on_the_host: no C++ compiler (c++)";
        assert!(
            std::env::var("KILN_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("\n*** NOTICE: {msg}; the test did NOT run.\n");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-host-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = rng("host_codegen");
    for (label, ew) in generated_kernels(Arch::Sm80) {
        let (ew, args, plan) = elementwise_case(&mut rng, ew, 7, [3, 7, 11], 300);
        let want = reference(&ew, &args);
        let out_dt = ew.out_dtype().unwrap();
        for ((bytes, err), path) in run_on_host(&dir, &ew, &args, &plan)
            .iter()
            .zip(["vector", "scalar"])
        {
            assert_eq!(*err, 0, "{label} ({path} path): error flag");
            let got = from_bytes(out_dt, &plan.out, bytes);
            // f32 nodes round exactly as the reference; the transcendental ones go through the
            // same libm in f64. Allow one f32 rounding of slack for the f64 functions.
            let bound = if out_dt == DType::F32 { 1e-7 } else { 0.0 };
            assert_matches(&format!("host {label} ({path} path)"), &got, &want, bound);
        }
    }
    // Integer division by zero sets the flag.
    let div = Elementwise {
        body: "(div $0 $1)".parse().unwrap(),
        args: vec![DType::I32, DType::I32],
        layouts: vec![ArgLayout::Same, ArgLayout::Same],
        rank: 1,
    };
    let a = Tensor::new(vec![2], kiln_runtime::Storage::I32(vec![7, i32::MIN])).unwrap();
    let z = Tensor::new(vec![2], kiln_runtime::Storage::I32(vec![0, -1])).unwrap();
    let plan = Plan::new(&[&[2], &[2]]).unwrap();
    for (bytes, err) in run_on_host(&dir, &div, &[a, z], &plan) {
        assert_eq!(err, 1);
        // i32::MIN / -1 wraps to i32::MIN, as the reference's wrapping i64 division wrapped to
        // i32.
        assert_eq!(
            from_bytes(DType::I32, &[2], &bytes).to_f64_vec(),
            vec![0.0, f64::from(i32::MIN)]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The 16-bit transcendental nodes take an f32 evaluation when its rounding is certain and the
/// f64 one otherwise: on every bf16 and f16 input (all 2^16 bit patterns, NaNs and infinities
/// included), through both kernel paths, the result is the reference's, bit for bit.
#[test]
fn narrow_transcendentals_match_the_reference_on_every_input() {
    if Command::new("c++").arg("--version").output().is_err() {
        assert!(
            std::env::var("KILN_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "no C++ compiler (c++)"
        );
        eprintln!("\n*** NOTICE: no C++ compiler (c++); the test did NOT run.\n");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-host-narrow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = 1 << 16;
    for d in [DType::BF16, DType::F16] {
        let storage = match d {
            DType::BF16 => {
                kiln_runtime::Storage::BF16((0..=u16::MAX).map(half::bf16::from_bits).collect())
            }
            _ => kiln_runtime::Storage::F16((0..=u16::MAX).map(half::f16::from_bits).collect()),
        };
        let x = Tensor::new(vec![n], storage).unwrap();
        for op in ["exp", "tanh", "erf", "sigmoid", "silu", "gelu"] {
            let ew = Elementwise {
                body: format!("({op} $0)").parse().unwrap(),
                args: vec![d],
                layouts: vec![ArgLayout::Same],
                rank: 1,
            };
            let plan = Plan::new(&[&[n]]).unwrap();
            let want = reference(&ew, std::slice::from_ref(&x));
            for ((bytes, err), path) in run_on_host(&dir, &ew, std::slice::from_ref(&x), &plan)
                .iter()
                .zip(["vector", "scalar"])
            {
                assert_eq!(*err, 0);
                let got = from_bytes(d, &[n], bytes);
                assert_matches(&format!("host {op} {d} ({path} path)"), &got, &want, 0.0);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

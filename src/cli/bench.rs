//! `kiln bench`: this machine's ceilings, single-kernel measurements, and (`kiln bench model`,
//! [`super::bench_model`]) whole models.
//!
//! `kiln bench ceilings` measures the peak f32 FMA and bf16 dot-product rates (register-only
//! loops), the f32 and bf16 GEMM rates of the best kernels at 2048³, the bf16 GEMV rate at
//! 8192×8192, and streaming read and copy bandwidth. `kiln bench kernel` times one kernel
//! ([`super::bench_kernel`]: matmul, GEMV, attention, MoE, norms, softmax, fused SwiGLU; median
//! of `--runs` timed runs after warm-up) and reports it against the ceiling it is held to,
//! measured in the same process.
//! With `--device cuda` both run on the GPU ([`kiln_cuda::bench`]): copy bandwidth, cuBLAS bf16
//! and cuBLASLt fp8 GEMM rates, and kiln's CUDA kernels.

use super::bench_kernel::{self, median_secs, Gemv, KernelDtype, Matmul, MatmulBf16, Work};
use super::CliError;
use clap::{Args, Subcommand};
use kiln_kernels::{peak, Isa};

/// `kiln bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Measure this machine's ceilings: peak f32 FMA and bf16 dot rates, f32 and bf16 GEMM at
    /// 2048³, bf16 GEMV at 8192x8192, read and copy bandwidth.
    Ceilings {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Where to measure.
        #[arg(long, value_enum, default_value_t = super::opts::Device::Cpu)]
        device: super::opts::Device,
    },
    /// Time one kernel: median of --runs runs after warm-up, with GFLOP/s, GB/s and the share of
    /// the ceilings (measured in the same process).
    Kernel(KernelArgs),
    /// End-to-end model throughput on the CPU backend (random token ids): prefill and decode
    /// tokens/s and time to first token for causal LMs, sequences/s for encoders, peak RSS.
    Model(super::bench_model::ModelArgs),
}

/// `kiln bench kernel` flags.
#[derive(Debug, Args)]
pub struct KernelArgs {
    /// matmul | gemv | attention | moe | rmsnorm | layernorm | softmax | silu_mul | fused.
    #[arg(long)]
    op: String,
    /// `--op fused`: the elementwise expression, in the IR's `fused_elementwise` body syntax
    /// over operands $0, $1, ... of the shape, e.g. "(mul (silu $0) $1)".
    #[arg(long)]
    body: Option<String>,
    /// matmul: MxNxK; gemv: NxK (W is N×K); attention: BxHQxHKVxSQxSKxD (batch, query heads,
    /// kv heads, queries, keys, head dim; causal); moe: TxHxIxExK (tokens, hidden,
    /// intermediate, experts, experts per token); rmsnorm, layernorm, softmax: RxC (rows ×
    /// cols); silu_mul, fused: N or RxC (elements).
    #[arg(long)]
    shape: String,
    /// f32; bf16 (matmul and gemv: bf16 weights, activations rounded to bf16; moe: bf16
    /// experts); fp8 (gemv: e4m3 weights, per-tensor scale; moe: e4m3 experts, per-row scales).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs (after warm-up).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Where to run it (CUDA: also copy, attention; dtypes f32, bf16, f16, f8e4m3).
    #[arg(long, value_enum, default_value_t = super::opts::Device::Cpu)]
    device: super::opts::Device,
}

/// Runs a `kiln bench` command.
pub fn bench(cmd: &BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Ceilings { json, device } => {
            if let Some(b) = super::opts::backend(*device)? {
                return cuda_ceilings(&b, *json);
            }
            let c = Ceilings::measure();
            if *json {
                println!("{}", c.to_json());
            } else {
                c.print();
            }
            Ok(())
        }
        BenchCommand::Kernel(args) => kernel(args),
        BenchCommand::Model(args) => super::bench_model::bench_model(args),
    }
}

/// The machine's measured ceilings.
struct Ceilings {
    isa: Isa,
    threads: usize,
    fma_f32_gflops: Option<f64>,
    dot_bf16_gflops: Option<f64>,
    gemm_f32_2048_gflops: f64,
    gemm_bf16_2048_gflops: f64,
    gemv_bf16_gbps: f64,
    read_gbps: f64,
    copy_gbps: f64,
}

impl Ceilings {
    fn measure() -> Ceilings {
        let fma_f32_gflops = peak::fma_f32_gflops(5);
        let dot_bf16_gflops = peak::dot_bf16_gflops(5);
        let read_gbps = peak::read_gbps(peak::BANDWIDTH_BYTES, 7);
        let copy_gbps = peak::copy_gbps(peak::BANDWIDTH_BYTES, 7);
        let gemm_f32_2048_gflops = {
            let m = Matmul::new(2048, 2048, 2048);
            m.flops() / median_secs(5, || m.run()) / 1e9
        };
        let gemm_bf16_2048_gflops = {
            let m = MatmulBf16::new(2048, 2048, 2048);
            m.flops() / median_secs(5, || m.run()) / 1e9
        };
        let gemv_bf16_gbps = {
            let g = Gemv::new(8192, 8192, KernelDtype::Bf16);
            g.weight_bytes() / median_secs(7, || g.run()) / 1e9
        };
        Ceilings {
            isa: Isa::best(),
            threads: kiln_kernels::threads(),
            fma_f32_gflops,
            dot_bf16_gflops,
            gemm_f32_2048_gflops,
            gemm_bf16_2048_gflops,
            gemv_bf16_gbps,
            read_gbps,
            copy_gbps,
        }
    }

    fn print(&self) {
        let opt = |v: Option<f64>| v.map_or("unavailable".to_string(), |v| format!("{v:.1}"));
        println!("isa {} threads {}", self.isa.name(), self.threads);
        println!("peak f32 FMA          {} GFLOP/s", opt(self.fma_f32_gflops));
        println!(
            "peak bf16 dot         {} GFLOP/s",
            opt(self.dot_bf16_gflops)
        );
        println!(
            "f32 GEMM 2048^3       {:.1} GFLOP/s",
            self.gemm_f32_2048_gflops
        );
        println!(
            "bf16 GEMM 2048^3      {:.1} GFLOP/s",
            self.gemm_bf16_2048_gflops
        );
        println!(
            "bf16 GEMV 8192x8192   {:.1} GB/s of weights",
            self.gemv_bf16_gbps
        );
        println!("read bandwidth        {:.1} GB/s", self.read_gbps);
        println!(
            "copy bandwidth        {:.1} GB/s (read + write)",
            self.copy_gbps
        );
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "isa": self.isa.name(),
            "threads": self.threads,
            "fma_f32_gflops": self.fma_f32_gflops,
            "dot_bf16_gflops": self.dot_bf16_gflops,
            "gemm_f32_2048_gflops": self.gemm_f32_2048_gflops,
            "gemm_bf16_2048_gflops": self.gemm_bf16_2048_gflops,
            "gemv_bf16_8192_gbps": self.gemv_bf16_gbps,
            "read_gbps": self.read_gbps,
            "copy_gbps": self.copy_gbps,
        })
    }
}

/// `kiln bench ceilings --device cuda`.
fn cuda_ceilings(b: &kiln_cuda::exec::Backend, json: bool) -> Result<(), CliError> {
    let c = kiln_cuda::bench::ceilings(b.device(), b.blas())
        .map_err(|e| CliError::Input(format!("--device cuda: {e}")))?;
    if json {
        let v = serde_json::json!({
            "device": c.device,
            "copy_gbps": c.copy_gbps,
            "gemm_bf16_8192_tflops": c.gemm_bf16_tflops,
            "gemm_fp8_8192_tflops": c.gemm_fp8_tflops,
        });
        println!("{v}");
    } else {
        println!("device                {}", c.device);
        println!(
            "copy bandwidth        {:.0} GB/s (read + write)",
            c.copy_gbps
        );
        println!(
            "bf16 GEMM 8192^3      {:.1} TFLOP/s (cuBLAS)",
            c.gemm_bf16_tflops
        );
        match c.gemm_fp8_tflops {
            Some(t) => println!("fp8 GEMM 8192^3       {t:.1} TFLOP/s (cuBLASLt, e4m3)"),
            None => println!("fp8 GEMM 8192^3       unavailable (needs sm_89 or later)"),
        }
    }
    Ok(())
}

/// `kiln bench kernel --device cuda`: the timing against the device's ceilings.
fn cuda_kernel(b: &kiln_cuda::exec::Backend, args: &KernelArgs) -> Result<(), CliError> {
    let dtype: kiln::ir::DType = args
        .dtype
        .parse()
        .map_err(|_| CliError::Input(format!("--dtype {:?}: not a dtype", args.dtype)))?;
    let shape: Vec<usize> = args
        .shape
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            CliError::Input(format!("--shape {:?}: expected e.g. 4096x4096", args.shape))
        })?;
    if args.runs == 0 {
        return Err(CliError::Input("--runs must be at least 1".into()));
    }
    let cuda = |e: kiln_cuda::CudaError| CliError::Input(format!("--device cuda: {e}"));
    let t = kiln_cuda::bench::time(b.device(), &args.op, &shape, dtype, b.blas(), args.runs)
        .map_err(cuda)?;
    let c = kiln_cuda::bench::ceilings(b.device(), b.blas()).map_err(cuda)?;
    let (tflops, gbps) = (t.flops / t.ms / 1e9, t.bytes / t.ms / 1e6);
    let (ceiling, share) = if args.op == "matmul" || args.op == "attention" {
        ("bf16 GEMM 8192^3", tflops / c.gemm_bf16_tflops)
    } else {
        ("copy bandwidth", gbps / c.copy_gbps)
    };
    if args.json {
        let v = serde_json::json!({
            "kernel": t.label, "device": c.device, "median_ms": t.ms, "tflops": tflops,
            "gbps": gbps, "ceiling": ceiling, "share_of_ceiling": share,
        });
        println!("{v}");
    } else {
        println!(
            "{} on {}: {:.4} ms median of {}",
            t.label, c.device, t.ms, args.runs
        );
        println!(
            "{tflops:.2} TFLOP/s, {gbps:.0} GB/s = {:.0}% of the {ceiling}",
            share * 100.0
        );
    }
    Ok(())
}

fn kernel(args: &KernelArgs) -> Result<(), CliError> {
    if let Some(b) = super::opts::backend(args.device)? {
        return cuda_kernel(&b, args);
    }
    let op = args.op.as_str();
    let known = [
        "matmul",
        "gemv",
        "attention",
        "moe",
        "rmsnorm",
        "layernorm",
        "softmax",
        "silu_mul",
        "fused",
    ];
    if !known.contains(&op) {
        return Err(CliError::Input(format!(
            "--op {op:?}: expected one of {}",
            bench_kernel::OPS
        )));
    }
    let dtype = KernelDtype::parse(op, &args.dtype)?;
    if args.runs == 0 {
        return Err(CliError::Input("--runs must be at least 1".into()));
    }
    if args.body.is_some() && op != "fused" {
        return Err(CliError::Input(format!(
            "--body is the expression of --op fused; {op} takes none"
        )));
    }
    let (work, secs) =
        bench_kernel::measure(op, &args.shape, dtype, args.body.as_deref(), args.runs)?;
    report(args, op, &work, secs);
    Ok(())
}

/// Prints one measurement against ceilings measured now.
fn report(args: &KernelArgs, op: &str, work: &Work, secs: f64) {
    let runs = args.runs;
    let c = Ceilings::measure();
    let gflops = work.flops / secs / 1e9;
    let gbps = work.bytes / secs / 1e9;
    // The ceiling each kind of kernel is held to.
    let bf16 = args.dtype == "bf16";
    let (ceiling_name, share) = match op {
        "matmul" if bf16 => match c.dot_bf16_gflops {
            Some(p) => ("peak bf16 dot", gflops / p),
            None => ("f32 GEMM 2048^3", gflops / c.gemm_f32_2048_gflops),
        },
        "matmul" | "moe" => ("f32 GEMM 2048^3", gflops / c.gemm_f32_2048_gflops),
        // Decode attention streams the KV cache; prefill attention computes.
        "attention" if args.shape.split(['x', 'X']).nth(3).map(str::trim) == Some("1") => {
            ("read bandwidth", gbps / c.read_gbps)
        }
        "attention" => match c.fma_f32_gflops {
            Some(p) => ("peak f32 FMA", gflops / p),
            None => ("f32 GEMM 2048^3", gflops / c.gemm_f32_2048_gflops),
        },
        "gemv" => ("read bandwidth", gbps / c.read_gbps),
        _ => ("copy bandwidth", gbps / c.copy_gbps),
    };
    let peak_share = match op {
        "matmul" if !bf16 => c.fma_f32_gflops.map(|p| gflops / p),
        _ => None,
    };
    if args.json {
        let v = serde_json::json!({
            "kernel": work.label,
            "op": op,
            "shape": args.shape,
            "dtype": args.dtype,
            "runs": runs,
            "median_ms": secs * 1e3,
            "gflops": gflops,
            "gbps": gbps,
            "ceiling": ceiling_name,
            "share_of_ceiling": share,
            "share_of_fma_peak": peak_share,
            "ceilings": c.to_json(),
        });
        println!("{v}");
    } else {
        println!("{}: median {:.3} ms of {runs} runs", work.label, secs * 1e3);
        println!("  {gflops:.1} GFLOP/s, {gbps:.1} GB/s");
        println!("  {:.1}% of {ceiling_name}", share * 100.0);
        if let Some(p) = peak_share {
            println!("  {:.1}% of peak f32 FMA", p * 100.0);
        }
        println!("ceilings (this process):");
        c.print();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(op: &str, shape: &str, dtype: &str, runs: usize) -> KernelArgs {
        KernelArgs {
            op: op.into(),
            shape: shape.into(),
            dtype: dtype.into(),
            runs,
            json: false,
            device: crate::cli::opts::Device::Cpu,
            body: None,
        }
    }

    fn input_error(a: KernelArgs) -> String {
        match kernel(&a) {
            Err(e @ CliError::Input(_)) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn bad_flags_are_input_errors() {
        assert!(input_error(args("conv", "1x1", "f32", 1)).contains("matmul, gemv, attention"));
        assert!(input_error(args("matmul", "2x2", "f32", 1)).contains("MxNxK"));
        assert!(input_error(args("matmul", "2x0x2", "f32", 1)).contains("positive"));
        assert!(input_error(args("gemv", "axb", "f32", 1)).contains("NxK"));
        assert!(input_error(args("softmax", "1x2x3", "f32", 1)).contains("RxC"));
        assert!(input_error(args("softmax", "2x2", "bf16", 1)).contains("f32 kernels only"));
        assert!(input_error(args("gemv", "2x2", "f16", 1)).contains("f32, bf16 or fp8"));
        assert!(input_error(args("gemv", "2x2", "f32", 0)).contains("--runs"));
    }
}

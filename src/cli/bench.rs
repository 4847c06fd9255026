//! `kiln bench`: this machine's ceilings, single-kernel measurements, and (`kiln bench model`,
//! [`super::bench_model`]) whole models.
//!
//! `kiln bench ceilings` measures the peak f32 FMA and bf16 dot-product rates (register-only
//! loops), the f32 and bf16 GEMM rates of the best kernels at 2048³, the bf16 GEMV rate at
//! 8192×8192, and streaming read and copy bandwidth. `kiln bench kernel` times one kernel (median of `--runs`
//! timed runs after warm-up) and reports it against ceilings measured in the same process.
//! With `--device cuda` both run on the GPU ([`kiln_cuda::bench`]): copy bandwidth, cuBLAS bf16
//! and cuBLASLt fp8 GEMM rates, and kiln's CUDA kernels.

use super::CliError;
use clap::{Args, Subcommand};
use half::bf16;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::gemm_bf16::{matmul_bf16, PackedBf16};
use kiln_kernels::{elementwise, gemv, peak, rowwise, Isa};
use std::time::Instant;

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
    /// matmul | gemv | rmsnorm | softmax | silu_mul.
    #[arg(long)]
    op: String,
    /// matmul: MxNxK; gemv: NxK (W is N×K); rmsnorm, softmax: RxC (rows × cols); silu_mul: N
    /// or RxC (elements).
    #[arg(long)]
    shape: String,
    /// f32, or bf16 (matmul and gemv: bf16 weights, activations rounded to bf16).
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
            let g = Gemv::new(8192, 8192, true);
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

/// Median wall time of `runs` calls of `f` after two warm-up calls, in seconds.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Deterministic data in [-0.5, 0.5).
fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5)
        .collect()
}

struct Matmul {
    p: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: std::cell::RefCell<Vec<f32>>,
}

impl Matmul {
    fn new(m: usize, n: usize, k: usize) -> Matmul {
        Matmul {
            p: Gemm::dense(m, n, k, false, false),
            a: data(m * k, 0.0),
            b: data(k * n, 1.0),
            c: std::cell::RefCell::new(vec![0.0; m * n]),
        }
    }
    fn flops(&self) -> f64 {
        self.p.flops()
    }
    fn run(&self) {
        matmul_f32(&self.p, &self.a, &self.b, &mut self.c.borrow_mut()).expect("dense layout");
    }
}

/// `C = bf16(A) · Wᵀ` with prepacked bf16 weights (packing is not timed).
struct MatmulBf16 {
    m: usize,
    a: Vec<f32>,
    w: PackedBf16,
    c: std::cell::RefCell<Vec<f32>>,
}

impl MatmulBf16 {
    fn new(m: usize, n: usize, k: usize) -> MatmulBf16 {
        let w: Vec<bf16> = data(n * k, 1.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        MatmulBf16 {
            m,
            a: data(m * k, 0.0),
            w: PackedBf16::pack(n, k, &w).expect("dense layout"),
            c: std::cell::RefCell::new(vec![0.0; m * n]),
        }
    }
    fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.w.n() as f64 * self.w.k() as f64
    }
    fn run(&self) {
        matmul_bf16(self.m, &self.a, &self.w, &mut self.c.borrow_mut()).expect("dense layout");
    }
}

struct Gemv {
    n: usize,
    k: usize,
    w: Vec<f32>,
    wb: Vec<bf16>,
    x: Vec<f32>,
    y: std::cell::RefCell<Vec<f32>>,
    bf16: bool,
}

impl Gemv {
    fn new(n: usize, k: usize, bf16: bool) -> Gemv {
        let w = data(n * k, 0.0);
        let (w, wb) = if bf16 {
            (
                Vec::new(),
                w.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            )
        } else {
            (w, Vec::new())
        };
        Gemv {
            n,
            k,
            w,
            wb,
            x: data(k, 2.0),
            y: std::cell::RefCell::new(vec![0.0; n]),
            bf16,
        }
    }
    fn weight_bytes(&self) -> f64 {
        (self.n * self.k * if self.bf16 { 2 } else { 4 }) as f64
    }
    fn run(&self) {
        let y = &mut self.y.borrow_mut();
        if self.bf16 {
            gemv::gemv_bf16(self.n, self.k, &self.wb, &self.x, y).expect("dense layout");
        } else {
            gemv::gemv_f32(self.n, self.k, &self.w, &self.x, y).expect("dense layout");
        }
    }
}

fn parse_shape(op: &str, shape: &str, arity: &[usize]) -> Result<Vec<usize>, CliError> {
    let dims: Result<Vec<usize>, _> = shape
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>())
        .collect();
    match dims {
        Ok(d) if arity.contains(&d.len()) && d.iter().all(|&v| v > 0) => Ok(d),
        _ => {
            let want = match op {
                "matmul" => "MxNxK, e.g. 2048x2048x2048",
                "gemv" => "NxK, e.g. 4096x4096",
                "silu_mul" => "N or RxC, e.g. 4194304 or 1024x4096",
                _ => "RxC, e.g. 1024x4096",
            };
            Err(CliError::Input(format!(
                "--shape {shape:?}: {op} takes {want} (positive integers)"
            )))
        }
    }
}

/// What one kernel measurement moves and computes.
struct Work {
    label: String,
    flops: f64,
    bytes: f64,
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
    const OPS: &str = "matmul, gemv, rmsnorm, softmax, silu_mul";
    let op = args.op.as_str();
    if !matches!(op, "matmul" | "gemv" | "rmsnorm" | "softmax" | "silu_mul") {
        return Err(CliError::Input(format!(
            "--op {op:?}: expected one of {OPS}"
        )));
    }
    let bf16 = match args.dtype.as_str() {
        "f32" => false,
        "bf16" if matches!(op, "gemv" | "matmul") => true,
        "bf16" => {
            return Err(CliError::Input(format!(
                "--dtype bf16: only matmul and gemv have bf16 kernels yet; {op} takes --dtype f32"
            )))
        }
        d => {
            return Err(CliError::Input(format!(
                "--dtype {d:?}: expected f32 or bf16"
            )))
        }
    };
    if args.runs == 0 {
        return Err(CliError::Input("--runs must be at least 1".into()));
    }
    let (work, secs) = measure(op, &args.shape, bf16, args.runs)?;
    report(args, op, &work, secs);
    Ok(())
}

/// Times `op` on `shape` (validated here): what it computes and moves, and the median seconds.
fn measure(op: &str, shape: &str, bf16: bool, runs: usize) -> Result<(Work, f64), CliError> {
    Ok(match op {
        "matmul" => {
            let d = parse_shape(op, shape, &[3])?;
            if bf16 {
                let m = MatmulBf16::new(d[0], d[1], d[2]);
                let w = Work {
                    label: format!("matmul bf16 weights {}x{}x{}", d[0], d[1], d[2]),
                    flops: m.flops(),
                    bytes: (4 * d[0] * d[2] + 2 * d[2] * d[1] + 4 * d[0] * d[1]) as f64,
                };
                (w, median_secs(runs, || m.run()))
            } else {
                let m = Matmul::new(d[0], d[1], d[2]);
                let w = Work {
                    label: format!("matmul f32 {}x{}x{}", d[0], d[1], d[2]),
                    flops: m.flops(),
                    bytes: 4.0 * (d[0] * d[2] + d[2] * d[1] + d[0] * d[1]) as f64,
                };
                (w, median_secs(runs, || m.run()))
            }
        }
        "gemv" => {
            let d = parse_shape(op, shape, &[2])?;
            let g = Gemv::new(d[0], d[1], bf16);
            let w = Work {
                label: format!(
                    "gemv {} weights {}x{}",
                    if bf16 { "bf16" } else { "f32" },
                    d[0],
                    d[1]
                ),
                flops: 2.0 * (d[0] * d[1]) as f64,
                bytes: g.weight_bytes(),
            };
            (w, median_secs(runs, || g.run()))
        }
        "rmsnorm" | "softmax" => {
            let d = parse_shape(op, shape, &[2])?;
            let (rows, cols) = (d[0], d[1]);
            let x = data(rows * cols, 0.0);
            let g = data(cols, 3.0);
            let mut y = vec![0.0; rows * cols];
            let n = (rows * cols) as f64;
            let w = Work {
                label: format!("{op} f32 {rows}x{cols}"),
                flops: if op == "rmsnorm" { 4.0 * n } else { 20.0 * n },
                bytes: 8.0 * n
                    + if op == "rmsnorm" {
                        4.0 * cols as f64
                    } else {
                        0.0
                    },
            };
            let secs = if op == "rmsnorm" {
                median_secs(runs, || {
                    rowwise::rmsnorm(rows, cols, &x, &g, 1e-6, &mut y).expect("layout")
                })
            } else {
                median_secs(runs, || {
                    rowwise::softmax(rows, cols, &x, &mut y).expect("layout")
                })
            };
            (w, secs)
        }
        _ => {
            let d = parse_shape(op, shape, &[1, 2])?;
            let n: usize = d.iter().product();
            let a = data(n, 0.0);
            let b = data(n, 1.0);
            let mut y = vec![0.0; n];
            let w = Work {
                label: format!("silu_mul f32 {n}"),
                flops: 20.0 * n as f64,
                bytes: 12.0 * n as f64,
            };
            (
                w,
                median_secs(runs, || {
                    elementwise::silu_mul(&a, &b, &mut y).expect("layout")
                }),
            )
        }
    })
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
        "matmul" => ("f32 GEMM 2048^3", gflops / c.gemm_f32_2048_gflops),
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
        assert!(input_error(args("conv", "1x1", "f32", 1)).contains("matmul, gemv"));
        assert!(input_error(args("matmul", "2x2", "f32", 1)).contains("MxNxK"));
        assert!(input_error(args("matmul", "2x0x2", "f32", 1)).contains("positive"));
        assert!(input_error(args("gemv", "axb", "f32", 1)).contains("NxK"));
        assert!(input_error(args("softmax", "1x2x3", "f32", 1)).contains("RxC"));
        assert!(input_error(args("softmax", "2x2", "bf16", 1)).contains("only matmul and gemv"));
        assert!(input_error(args("gemv", "2x2", "f16", 1)).contains("f32 or bf16"));
        assert!(input_error(args("gemv", "2x2", "f32", 0)).contains("--runs"));
    }

    #[test]
    fn every_op_measures_small_shapes() {
        for (op, shape, bf16) in [
            ("matmul", "7x33x5", false),
            ("matmul", "7x33x5", true),
            ("gemv", "33x7", true),
            ("gemv", "33x7", false),
            ("rmsnorm", "3x33", false),
            ("softmax", "3x33", false),
            ("silu_mul", "33", false),
            ("silu_mul", "3x7", false),
        ] {
            let (work, secs) = measure(op, shape, bf16, 2).unwrap();
            assert!(work.flops > 0.0 && work.bytes > 0.0 && secs >= 0.0, "{op}");
        }
    }
}

//! Device ceilings and single-kernel timings for `kiln bench ceilings|kernel --device cuda`:
//! the measured device-to-device copy bandwidth (bytes read plus written), cuBLAS's bf16 GEMM
//! rate and cuBLASLt's fp8 rate at 8192³, and any kiln kernel on any shape, each the median of
//! device-event timings after warm-up on random (never zero) data.

use crate::alloc::Buffer;
use crate::blas::{Blas, GemmShape};
use crate::codegen::elementwise::{Elementwise, Plan};
use crate::device::Device;
use crate::launch::{self, Attention, Rowwise};
use crate::CudaError;
use kiln_ir::{BinaryOp, DType, Expr, UnaryOp};

/// A device's measured ceilings.
#[derive(Debug, Clone)]
pub struct Ceilings {
    /// The device's name.
    pub device: String,
    /// Device-to-device copy, GB/s (read + written).
    pub copy_gbps: f64,
    /// cuBLAS bf16 GEMM (f32 accumulation and result) at 8192³, TFLOP/s.
    pub gemm_bf16_tflops: f64,
    /// cuBLASLt fp8 e4m3 GEMM (bf16 result) at 8192³, TFLOP/s, on sm_89 and later.
    pub gemm_fp8_tflops: Option<f64>,
}

/// One kernel's timing and what it computes and moves.
#[derive(Debug, Clone)]
pub struct Timing {
    /// What ran, e.g. `gemv bf16 16384x4096`.
    pub label: String,
    /// Median milliseconds.
    pub ms: f64,
    /// Floating-point operations.
    pub flops: f64,
    /// Fewest bytes moved through device memory.
    pub bytes: f64,
}

/// Pseudo-random bytes of `n` elements of `dtype` with values in ±1 (no zeros).
fn random(dev: &Device, dtype: DType, n: usize, seed: u64) -> Result<Buffer, CudaError> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 1.9 - 0.95
    };
    let nonzero = |v: f32| if v.abs() < 1e-3 { 0.5 } else { v };
    let bytes: Vec<u8> = match dtype {
        DType::F32 => (0..n).flat_map(|_| nonzero(next()).to_le_bytes()).collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(nonzero(next())).to_le_bytes())
            .collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(nonzero(next())).to_le_bytes())
            .collect(),
        DType::F8E4M3 => (0..n)
            .map(|_| kiln_ir::f8::f32_to_f8e4m3(nonzero(next())))
            .collect(),
        other => {
            return Err(CudaError::Args(format!(
                "no random data of {other} for benchmarks"
            )))
        }
    };
    dev.upload(&bytes)
}

fn gemm_shape(m: usize, n: usize, k: usize) -> GemmShape {
    GemmShape {
        m,
        n,
        k,
        ta: false,
        tb: true,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
    }
}

/// Measures `dev`'s ceilings.
pub fn ceilings(dev: &Device, blas: &Blas) -> Result<Ceilings, CudaError> {
    let copy = time(dev, "copy", &[1 << 30], DType::F32, blas, 20)?;
    let gemm = time(dev, "matmul", &[8192, 8192, 8192], DType::BF16, blas, 10)?;
    let fp8 = if dev.arch().has_fp8() {
        Some(time(
            dev,
            "matmul",
            &[8192, 8192, 8192],
            DType::F8E4M3,
            blas,
            10,
        )?)
    } else {
        None
    };
    Ok(Ceilings {
        device: dev.name().to_string(),
        copy_gbps: copy.bytes / copy.ms / 1e6,
        gemm_bf16_tflops: gemm.flops / gemm.ms / 1e9,
        gemm_fp8_tflops: fp8.map(|t| t.flops / t.ms / 1e9),
    })
}

/// Times kernel `op` on `shape` in `dtype` (median of `runs` after 3 warm-ups):
/// `copy` N (bytes), `matmul` MxNxK (f32, bf16: cuBLAS; f8e4m3: cuBLASLt), `gemv` NxK (bf16 or
/// f8e4m3 weights), `rmsnorm` / `softmax` RxC, `silu_mul` N (generated elementwise), and
/// `attention` BxHxSxD (flash prefill, causal, bf16).
pub fn time(
    dev: &Device,
    op: &str,
    shape: &[usize],
    dtype: DType,
    blas: &Blas,
    runs: usize,
) -> Result<Timing, CudaError> {
    let bad = |want: &str| {
        CudaError::Args(format!(
            "{op} on CUDA takes {want}; got shape {shape:?} in {dtype}"
        ))
    };
    let timed = |f: &mut dyn FnMut() -> Result<(), CudaError>| dev.time_ms(3, runs.max(1), f);
    let sz = dtype.size_bytes() as f64;
    Ok(match (op, shape) {
        ("copy", &[n]) => {
            let src = dev.filled(n, 0x3c)?;
            let mut dst = dev.allocator().alloc(n)?;
            let ms = timed(&mut || dev.copy(&src, &mut dst))?;
            Timing {
                label: format!("copy {n} bytes"),
                ms,
                flops: 0.0,
                bytes: 2.0 * n as f64,
            }
        }
        ("matmul", &[m, n, k]) => {
            let (a, b) = (random(dev, dtype, m * k, 1)?, random(dev, dtype, n * k, 2)?);
            let flops = 2.0 * (m * n * k) as f64;
            let (ms, out_bytes) = match dtype {
                DType::F32 | DType::BF16 | DType::F16 => {
                    let c = dev.allocator().alloc(m * n * 4)?;
                    let s = gemm_shape(m, n, k);
                    let ms =
                        timed(&mut || blas.gemm(&s, dtype, DType::F32, (&a, 0), (&b, 0), (&c, 0)))?;
                    (ms, 4.0)
                }
                DType::F8E4M3 => {
                    let one = dev.upload(&1.0f32.to_le_bytes())?;
                    let d = dev.allocator().alloc(m * n * 2)?;
                    let ms = timed(&mut || blas.gemm_fp8([m, n, k], &a, &b, &one, &one, &d))?;
                    (ms, 2.0)
                }
                _ => return Err(bad("f32, bf16, f16 or f8e4m3")),
            };
            Timing {
                label: format!("matmul {dtype} {m}x{n}x{k}"),
                ms,
                flops,
                bytes: sz * (m * k + n * k) as f64 + out_bytes * (m * n) as f64,
            }
        }
        ("gemv", &[n, k]) if matches!(dtype, DType::BF16 | DType::F8E4M3) => {
            let w = random(dev, dtype, n * k, 3)?;
            let x = random(dev, DType::F32, k, 4)?;
            let y = dev.allocator().alloc(n * 4)?;
            let ms = timed(&mut || launch::gemv(dev, dtype, &w, &x, &y, n, k, 1.0))?;
            Timing {
                label: format!("gemv {dtype} weights {n}x{k}"),
                ms,
                flops: 2.0 * (n * k) as f64,
                bytes: sz * (n * k) as f64 + 4.0 * (n + k) as f64,
            }
        }
        ("rmsnorm" | "softmax", &[r, c]) => {
            let x = random(dev, dtype, r * c, 5)?;
            let w = random(dev, dtype, c, 6)?;
            let y = dev.allocator().alloc(r * c * dtype.size_bytes())?;
            let kind = if op == "rmsnorm" {
                Rowwise::RmsNorm { w: &w, eps: 1e-6 }
            } else {
                Rowwise::Softmax
            };
            let ms = timed(&mut || launch::rowwise(dev, dtype, kind, &x, &y, r, c))?;
            Timing {
                label: format!("{op} {dtype} {r}x{c}"),
                ms,
                flops: 5.0 * (r * c) as f64,
                bytes: 2.0 * sz * (r * c) as f64,
            }
        }
        ("silu_mul", &[n]) => {
            let (a, b) = (random(dev, dtype, n, 7)?, random(dev, dtype, n, 8)?);
            let out = dev.allocator().alloc(n * dtype.size_bytes())?;
            let body = Expr::Binary(
                BinaryOp::Mul,
                Box::new(Expr::Unary(UnaryOp::Silu, Box::new(Expr::Arg(0)))),
                Box::new(Expr::Arg(1)),
            );
            let plan = Plan::new(&[&[n], &[n]])?;
            let ew = Elementwise {
                body,
                args: vec![dtype, dtype],
                layouts: plan.layouts,
                rank: 1,
            };
            let ms = timed(&mut || launch::elementwise(dev, &ew, &out, &[&a, &b], &plan.meta, n))?;
            Timing {
                label: format!("silu_mul {dtype} {n}"),
                ms,
                flops: 6.0 * n as f64,
                bytes: 3.0 * sz * n as f64,
            }
        }
        ("attention", &[b, h, s, d]) if dtype == DType::BF16 => {
            let (q, k, v) = (
                random(dev, dtype, b * h * s * d, 9)?,
                random(dev, dtype, b * h * s * d, 10)?,
                random(dev, dtype, b * h * s * d, 11)?,
            );
            let out = dev.allocator().alloc(b * h * s * d * 2)?;
            let a = Attention::causal(b, h, s, d);
            let ms = timed(&mut || launch::attention_prefill(dev, &a, &q, &k, &v, None, &out))?;
            Timing {
                label: format!("attention prefill causal bf16 b{b} h{h} s{s} d{d}"),
                ms,
                flops: 4.0 * (b * h * s * s * d) as f64 / 2.0,
                bytes: 4.0 * 2.0 * (b * h * s * d) as f64,
            }
        }
        ("copy", _) => return Err(bad("N (bytes)")),
        ("matmul", _) => return Err(bad("MxNxK")),
        ("gemv", _) => return Err(bad("NxK with --dtype bf16 or f8e4m3")),
        ("rmsnorm" | "softmax", _) => return Err(bad("RxC")),
        ("silu_mul", _) => return Err(bad("N")),
        ("attention", _) => return Err(bad("BxHxSxD with --dtype bf16")),
        _ => {
            return Err(CudaError::Args(format!(
                "--op {op:?}: on CUDA expected one of copy, matmul, gemv, rmsnorm, softmax, \
                 silu_mul, attention"
            )))
        }
    })
}

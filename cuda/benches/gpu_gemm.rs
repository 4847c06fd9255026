//! cuBLAS GEMM rates through [`kiln_cuda::blas`] (run by `scripts/gpu-check` beside PyTorch's
//! bf16 GEMM): bf16 operands with f32 results and fp8 e4m3 with per-tensor scales (bf16
//! result) at 8192³, in TFLOP/s, median of device-event timings after warm-up on random data,
//! and the fp8 ÷ bf16 ratio. Without a GPU it prints "no CUDA device" and exits 0.

use kiln_cuda::blas::{Blas, GemmShape};
use kiln_cuda::{CudaError, Device};
use kiln_ir::DType;
use rand::{Rng, SeedableRng};

fn main() -> Result<(), CudaError> {
    let dev = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("gpu_gemm: no CUDA device ({e})");
            return Ok(());
        }
    };
    let blas = Blas::new(&dev)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
    let s = 8192usize;
    let flops = 2.0 * (s as f64).powi(3);
    let bf16: Vec<u8> = (0..s * s)
        .flat_map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
        .collect();
    let (a, b) = (dev.upload(&bf16)?, dev.upload(&bf16)?);
    let c = dev.allocator().alloc(s * s * 4)?;
    let shape = GemmShape {
        m: s,
        n: s,
        k: s,
        ta: false,
        tb: true,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
    };
    let ms_bf16 = dev.time_ms(3, 20, || {
        blas.gemm(&shape, DType::BF16, DType::F32, (&a, 0), (&b, 0), (&c, 0))
    })?;
    drop((a, b, c));
    // e4m3 bytes of values in ±1 (bit patterns below 0x38 | sign: magnitudes under 1).
    let f8: Vec<u8> = (0..s * s)
        .map(|_| rng.random_range(0x08u8..0x38) | if rng.random() { 0x80 } else { 0 })
        .collect();
    let (a8, b8) = (dev.upload(&f8)?, dev.upload(&f8)?);
    let one = dev.upload(&1.0f32.to_le_bytes())?;
    let d = dev.allocator().alloc(s * s * 2)?;
    let ms_fp8 = dev.time_ms(3, 20, || blas.gemm_fp8([s, s, s], &a8, &b8, &one, &one, &d))?;
    let (r16, r8) = (flops / ms_bf16 / 1e9, flops / ms_fp8 / 1e9);
    println!("| cuBLAS bf16 GEMM (f32 out) | 8192^3 | {ms_bf16:.3} | {r16:.1} | | |");
    println!("| cuBLASLt fp8 e4m3 GEMM (bf16 out) | 8192^3 | {ms_fp8:.3} | {r8:.1} | | |");
    println!("fp8 / bf16 GEMM rate: {:.2}x (target >= 1.5x)", r8 / r16);
    Ok(())
}

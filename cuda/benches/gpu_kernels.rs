//! GPU kernel benchmarks (run by `scripts/gpu-check` beside PyTorch's numbers): flash attention
//! prefill (bf16, head dim 128, sequence 4096, causal) in TFLOP/s, and the memory-bound kernels
//! (decode attention, GEMV, rmsnorm, a fused elementwise `silu(a) * b`) in GB/s against the
//! measured device-to-device copy bandwidth. Median of device-event timings after warm-up, on
//! random data; the kernels under 0.1 ms are timed over 20 back-to-back calls per sample (time
//! per call), so that the host's launch cost overlaps the device's work instead of being timed.
//! Without a GPU it prints "no CUDA device" and exits 0.

use kiln_cuda::alloc::Buffer;
use kiln_cuda::codegen::elementwise::{Elementwise, Plan};
use kiln_cuda::launch::{self, Attention, PrefillTiles, Rowwise};
use kiln_cuda::{CudaError, Device};
use kiln_ir::DType;
use rand::{Rng, SeedableRng};

/// A buffer of `n` random bf16 values in ±1 (never zeros: they can time faster).
fn random_bf16(dev: &Device, rng: &mut impl Rng, n: usize) -> Result<Buffer, CudaError> {
    let bytes: Vec<u8> = (0..n)
        .flat_map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
        .collect();
    dev.upload(&bytes)
}

fn random_f32(dev: &Device, rng: &mut impl Rng, n: usize) -> Result<Buffer, CudaError> {
    let bytes: Vec<u8> = (0..n)
        .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
        .collect();
    dev.upload(&bytes)
}

/// Median milliseconds per call of `f`, timed over `inner` back-to-back calls per sample.
fn per_call_ms(
    dev: &Device,
    inner: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    let ms = dev.time_ms(2, 20, || (0..inner).try_for_each(|_| f()))?;
    Ok(ms / inner as f64)
}

fn row(kernel: &str, shape: &str, ms: f64, tflops: Option<f64>, gbs: Option<f64>, copy: f64) {
    let t = tflops.map_or("".into(), |t| format!("{t:.1}"));
    let (g, pct) = gbs.map_or(("".into(), "".into()), |g| {
        (format!("{g:.0}"), format!("{:.0}%", 100.0 * g / copy))
    });
    println!("| {kernel} | {shape} | {ms:.3} | {t} | {g} | {pct} |");
}

fn main() -> Result<(), CudaError> {
    let dev = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("gpu_kernels: no CUDA device ({e})");
            return Ok(());
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
    println!("device: {} ({})", dev.name(), dev.arch());
    println!("| kernel | shape | median ms | TFLOP/s | GB/s | % of copy |");
    println!("|---|---|---|---|---|---|");

    // Copy ceiling: bytes read plus bytes written.
    let n = 1 << 30;
    let src = dev.filled(n, 0x3c)?;
    let mut dst = dev.allocator().alloc(n)?;
    let ms = dev.time_ms(3, 20, || dev.copy(&src, &mut dst))?;
    let copy = 2.0 * n as f64 / ms / 1e6;
    row("copy (d2d)", "1 GiB", ms, None, Some(copy), copy);
    drop((src, dst));

    // Flash attention prefill: 4 · b · h · s² · d / 2 FLOPs with the causal mask.
    let (b, h, s, d) = (4, 32, 4096, 128);
    let a = Attention::causal(b, h, s, d);
    let q = random_bf16(&dev, &mut rng, b * h * s * d)?;
    let k = random_bf16(&dev, &mut rng, b * h * s * d)?;
    let v = random_bf16(&dev, &mut rng, b * h * s * d)?;
    let o = dev.allocator().alloc(b * h * s * d * 2)?;
    let flops = 4.0 * (b * h * s * s * d) as f64 / 2.0;
    for tiles in PrefillTiles::ALL {
        let ms = dev.time_ms(3, 20, || {
            launch::attention_prefill_tiled(&dev, &a, &q, &k, &v, None, &o, tiles)
        })?;
        let label = match tiles {
            PrefillTiles::Rows16 => "attention prefill bf16 causal",
            PrefillTiles::Rows32 => "attention prefill bf16 causal, 32 rows/warp",
        };
        row(
            label,
            &format!("b{b} h{h} s{s} d{d}"),
            ms,
            Some(flops / ms / 1e9),
            None,
            copy,
        );
    }
    drop((q, k, v, o));
    let d64 = Attention {
        d: 64,
        scale: 0.125,
        ..a
    };
    let q = random_bf16(&dev, &mut rng, b * h * s * 64)?;
    let k = random_bf16(&dev, &mut rng, b * h * s * 64)?;
    let v = random_bf16(&dev, &mut rng, b * h * s * 64)?;
    let o = dev.allocator().alloc(b * h * s * 64 * 2)?;
    let ms = dev.time_ms(3, 20, || {
        launch::attention_prefill(&dev, &d64, &q, &k, &v, None, &o)
    })?;
    row(
        "attention d64 prefill bf16 causal",
        &format!("b{b} h{h} s{s} d64"),
        ms,
        Some(flops / 2.0 / ms / 1e9),
        None,
        copy,
    );
    drop((q, k, v, o));

    // Decode attention over a 4096-token cache, GQA 32/8: bytes of K and V.
    let (hq, hkv, sk) = (32, 8, 4096);
    let a = Attention {
        batch: 1,
        hq,
        hkv,
        sq: 1,
        sk,
        d,
        scale: 1.0 / (d as f32).sqrt(),
        causal: true,
        window: 0,
    };
    let q = random_bf16(&dev, &mut rng, hq * d)?;
    // 8 caches of 16.8 MB in turn (134 MB, over the L2), as a model's layers would.
    let caches = (0..8)
        .map(|_| {
            Ok((
                random_bf16(&dev, &mut rng, hkv * sk * d)?,
                random_bf16(&dev, &mut rng, hkv * sk * d)?,
            ))
        })
        .collect::<Result<Vec<_>, CudaError>>()?;
    let o = dev.allocator().alloc(hq * d * 2)?;
    let bytes = 2.0 * (hkv * sk * d * 2) as f64;
    for splits in [16, launch::decode_splits(&dev, &a)?] {
        let mut turn = 0;
        let ms = per_call_ms(&dev, 24, || {
            let (k, v) = &caches[turn % caches.len()];
            turn += 1;
            launch::attention_decode(&dev, &a, &q, k, v, None, &o, splits)
        })?;
        row(
            &format!("attention decode bf16 ({splits} splits)"),
            &format!("hq{hq} hkv{hkv} sk{sk} d{d}"),
            ms,
            None,
            Some(bytes / ms / 1e6),
            copy,
        );
    }

    // GEMV: a 134 MB bf16 weight, larger than L2.
    let (n_rows, kdim) = (16384, 4096);
    let w = random_bf16(&dev, &mut rng, n_rows * kdim)?;
    let x = random_f32(&dev, &mut rng, kdim)?;
    let y = dev.allocator().alloc(n_rows * 4)?;
    let ms = per_call_ms(&dev, 20, || {
        launch::gemv(&dev, DType::BF16, &w, &x, &y, n_rows, kdim, 1.0)
    })?;
    row(
        "gemv bf16",
        &format!("{n_rows}x{kdim}"),
        ms,
        None,
        Some((n_rows * kdim * 2) as f64 / ms / 1e6),
        copy,
    );
    drop(w);

    // Rowwise and fused elementwise over 2^27 bf16 elements (256 MiB).
    let (rows, width) = (32768, 4096);
    let xa = random_bf16(&dev, &mut rng, rows * width)?;
    let xb = random_bf16(&dev, &mut rng, rows * width)?;
    let wn = random_bf16(&dev, &mut rng, width)?;
    let out = dev.allocator().alloc(rows * width * 2)?;
    let ms = dev.time_ms(3, 20, || {
        launch::rowwise(
            &dev,
            DType::BF16,
            Rowwise::RmsNorm { w: &wn, eps: 1e-6 },
            &xa,
            &out,
            rows,
            width,
        )
    })?;
    let bytes = 2.0 * (rows * width * 2) as f64;
    row(
        "rmsnorm bf16",
        &format!("{rows}x{width}"),
        ms,
        None,
        Some(bytes / ms / 1e6),
        copy,
    );
    let ms = dev.time_ms(3, 20, || {
        launch::rowwise(
            &dev,
            DType::BF16,
            Rowwise::LayerNorm {
                w: &wn,
                b: &xb,
                eps: 1e-5,
            },
            &xa,
            &out,
            rows,
            width,
        )
    })?;
    row(
        "layernorm bf16",
        &format!("{rows}x{width}"),
        ms,
        None,
        Some(bytes / ms / 1e6),
        copy,
    );
    let ms = dev.time_ms(3, 20, || {
        launch::rowwise(&dev, DType::BF16, Rowwise::Softmax, &xa, &out, rows, width)
    })?;
    row(
        "softmax bf16",
        &format!("{rows}x{width}"),
        ms,
        None,
        Some(bytes / ms / 1e6),
        copy,
    );
    let shape = [rows, width];
    let plan = Plan::new(&[&shape, &shape]).map_err(|e| CudaError::Args(e.to_string()))?;
    let ew = Elementwise {
        body: "(mul (silu $0) $1)"
            .parse()
            .map_err(|e| CudaError::Codegen(format!("{e}")))?,
        args: vec![DType::BF16, DType::BF16],
        layouts: plan.layouts.clone(),
        rank: 2,
    };
    let ms = dev.time_ms(3, 20, || {
        launch::elementwise(&dev, &ew, &out, &[&xa, &xb], &plan.meta, rows * width)
    })?;
    let bytes = 3.0 * (rows * width * 2) as f64;
    row(
        "fused silu(a)*b bf16",
        &format!("{rows}x{width}"),
        ms,
        None,
        Some(bytes / ms / 1e6),
        copy,
    );
    Ok(())
}

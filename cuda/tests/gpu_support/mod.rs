//! Helpers for the GPU tests and benchmarks: opening the device (or reporting "no CUDA device"
//! and skipping; `KILN_REQUIRE_GPU=1`, set by `scripts/gpu-check`, makes that a failure), fresh
//! random inputs, host tensors to and from device bytes, and comparisons with the reference.

#![allow(dead_code)]

use kiln_cuda::alloc::Buffer;
use kiln_cuda::Device;
use kiln_ir::scalar::Scalar;
use kiln_ir::DType;
use kiln_runtime::{Storage, Tensor};
use rand::{Rng, SeedableRng};

/// The device, or `None` after printing why there is none.
pub fn device_or_skip(test: &str) -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("{test}: KILN_REQUIRE_GPU=1 but {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped, no CUDA device ({e})");
            None
        }
    }
}

/// A generator with a fresh seed, printed so that a failure can be replayed (`KILN_SEED`).
pub fn rng(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("KILN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("{test}: seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random values of `dtype`: floats in ±`scale` (in (`scale`/20, `scale`) when `nonzero`, so
/// that log, sqrt and pow stay finite), integers in ±50 (without 0 when `nonzero`), bools
/// half true.
pub fn random(
    rng: &mut impl Rng,
    dtype: DType,
    shape: &[usize],
    scale: f64,
    nonzero: bool,
) -> Tensor {
    let n: usize = shape.iter().product();
    let values = (0..n).map(|_| match dtype {
        DType::Bool => Scalar::Bool(rng.random::<bool>()),
        DType::U8 => Scalar::Int(rng.random_range(i64::from(nonzero)..200)),
        d if d.is_int() => {
            let v = rng.random_range(1..=50);
            Scalar::Int(if nonzero || rng.random::<bool>() {
                if rng.random() {
                    v
                } else {
                    -v
                }
            } else {
                0
            })
        }
        _ if nonzero => Scalar::Float(rng.random_range(scale / 20.0..scale)),
        _ => Scalar::Float(rng.random_range(-scale..scale)),
    });
    Tensor::new(shape.to_vec(), Storage::from_scalars(dtype, values)).expect("shape")
}

pub use kiln_cuda::exec::host::to_bytes;

/// A tensor of `dtype` and `shape` from device bytes.
pub fn from_bytes(dtype: DType, shape: &[usize], b: &[u8]) -> Tensor {
    kiln_cuda::exec::host::from_bytes(dtype, shape, b).expect("shape")
}

/// Uploads `t`.
pub fn upload(dev: &Device, t: &Tensor) -> Buffer {
    dev.upload(&to_bytes(t)).expect("upload")
}

/// An output buffer for `n` elements of `dtype`, poisoned (all bits set: NaN for floats, -1
/// for integers) so that unwritten elements show.
pub fn poisoned(dev: &Device, dtype: DType, n: usize) -> Buffer {
    dev.filled(n * dtype.size_bytes(), 0xff).expect("alloc")
}

/// Downloads `b` as a tensor.
pub fn download(dev: &Device, b: &Buffer, dtype: DType, shape: &[usize]) -> Tensor {
    from_bytes(dtype, shape, &dev.download(b).expect("download"))
}

/// Asserts `got` equals `want` within `rel` of ‖want‖ (floats; NaN exactly where the
/// reference has NaN), or exactly (integers, bools).
pub fn assert_matches(what: &str, got: &Tensor, want: &Tensor, rel: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    if !want.dtype().is_float() {
        let bad = g.iter().zip(&w).position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "{what}: element {bad:?} differs: {:?} vs {:?}",
            bad.map(|i| g[i]),
            bad.map(|i| w[i])
        );
        return;
    }
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(
            a.is_nan(),
            b.is_nan(),
            "{what}: element {i}: got {a}, want {b}"
        );
        if b.is_infinite() {
            assert_eq!(a, b, "{what}: element {i}");
        }
    }
    let finite = |x: &&(&f64, &f64)| x.1.is_finite();
    let pairs: Vec<(&f64, &f64)> = g.iter().zip(&w).collect();
    let diff: f64 = pairs
        .iter()
        .filter(finite)
        .map(|(a, b)| (*a - *b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = pairs
        .iter()
        .filter(finite)
        .map(|(_, b)| b.powi(2))
        .sum::<f64>()
        .sqrt();
    let err = diff / norm.max(f64::MIN_POSITIVE);
    eprintln!("{what}: relative error {err:.2e} (bound {rel:.0e})");
    assert!(err <= rel, "{what}: relative error {err:.3e} > {rel:.0e}");
}

/// Random operands for a generated elementwise kernel, each read as the output (`Same`: `same3`
/// for rank-3 kernels, `[same1]` otherwise), through one element (`Scalar`) or broadcast along
/// two of three axes (`Strided`: `[rows, 1]`); the kernel re-planned for those shapes.
pub fn elementwise_case(
    rng: &mut rand::rngs::StdRng,
    ew: kiln_cuda::codegen::elementwise::Elementwise,
    rows: usize,
    same3: [usize; 3],
    same1: usize,
) -> (
    kiln_cuda::codegen::elementwise::Elementwise,
    Vec<Tensor>,
    kiln_cuda::codegen::elementwise::Plan,
) {
    use kiln_cuda::codegen::elementwise::{ArgLayout, Elementwise, Plan};
    let shapes: Vec<Vec<usize>> = ew
        .layouts
        .iter()
        .map(|l| match (l, ew.rank) {
            (ArgLayout::Scalar, _) => vec![1],
            (ArgLayout::Strided, _) => vec![rows, 1],
            (ArgLayout::Same, 3) => same3.to_vec(),
            (ArgLayout::Same, _) => vec![same1],
        })
        .collect();
    let args: Vec<Tensor> = ew
        .args
        .iter()
        .zip(&shapes)
        .map(|(&d, s)| random(rng, d, s, 3.0, true))
        .collect();
    let plan = Plan::new(&shapes.iter().map(Vec::as_slice).collect::<Vec<_>>())
        .expect("the shapes broadcast");
    let ew = Elementwise {
        layouts: plan.layouts.clone(),
        rank: plan.out.len(),
        ..ew
    };
    (ew, args, plan)
}

/// The reference executor's result of `op` on `args`.
pub fn reference(op: kiln_ir::Op, args: &[&Tensor]) -> Tensor {
    let t = kiln_ir::trace::Tracer::new();
    let mut inputs = std::collections::HashMap::new();
    let xs: Vec<_> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let name = format!("a{i}");
            inputs.insert(name.clone(), (*a).clone());
            t.input(&name, a.dtype(), a.shape().iter().copied())
        })
        .collect();
    let y = t.apply(op, &xs.iter().collect::<Vec<_>>()).expect("op");
    t.output("y", &y);
    let g = t.finish().expect("graph");
    kiln_runtime::reference::run(&g, &inputs, &kiln_runtime::reference::NoParams)
        .expect("reference")["y"]
        .clone()
}

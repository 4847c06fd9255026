//! The fp8 e4m3 GEMV against the reference executor running the fp8 precision's graph,
//! `matmul(cast(cast(x, bf16), f32), cast(W_e4m3, f32)ᵀ) * scale`, on random data, odd sizes,
//! every non-NaN e4m3 byte pattern, and batches of 1 to 11 rows of x (more than
//! `MAX_BATCH`); at every instruction-set level.
//!
//! Tolerance: |got − want| ≤ 1e-5 · Σ_j |bf16(x_j)|·|w_ij| · |scale| + 2e-7 · |want| (f32
//! accumulation against the reference's f64, then the same rounding of the product by the
//! scale).

mod common;

use common::{isas, random, rng};
use kiln_ir::f8::{f32_to_f8e4m3, f8e4m3_to_f32};
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op};
use kiln_kernels::gemv::{gemv_f8e4m3_batch_with, gemv_f8e4m3_with};
use kiln_kernels::KernelError;
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::{Storage, Tensor};
use std::collections::HashMap;

/// The reference result `[m, n]` of the fp8 matmul pattern.
fn reference(m: usize, n: usize, k: usize, x: &[f32], w: &[u8], scale: f32) -> Vec<f32> {
    let t = Tracer::new();
    let xi = t.input("x", DType::F32, [m, k]);
    let wi = t.input("w", DType::F8E4M3, [n, k]);
    let si = t.input("s", DType::F32, Vec::<usize>::new());
    let xr = xi.cast(DType::BF16).unwrap().cast(DType::F32).unwrap();
    let wf = wi.cast(DType::F32).unwrap();
    let p = xr.matmul_t(&wf, false, true).unwrap();
    let y = t
        .apply(Op::Binary(kiln_ir::BinaryOp::Mul), &[&p, &si])
        .unwrap();
    t.output("y", &y);
    let g = t.finish().unwrap();
    let inputs: HashMap<String, Tensor> = [
        ("x", Tensor::from_f32(vec![m, k], x.to_vec()).unwrap()),
        (
            "w",
            Tensor::new(vec![n, k], Storage::F8E4M3(w.to_vec())).unwrap(),
        ),
        ("s", Tensor::from_f32(vec![], vec![scale]).unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    run(&g, &inputs, &NoParams).unwrap()["y"]
        .as_f32()
        .unwrap()
        .to_vec()
}

fn check(seed: u64, m: usize, n: usize, k: usize, w: Option<Vec<u8>>) {
    let mut r = rng(seed);
    let x = random(&mut r, m * k, -2.0, 2.0);
    let w = w.unwrap_or_else(|| {
        random(&mut r, n * k, -448.0, 448.0)
            .into_iter()
            .map(f32_to_f8e4m3)
            .collect()
    });
    let scale = 0.003_f32;
    let want = reference(m, n, k, &x, &w, scale);
    let xb: Vec<f64> = x
        .iter()
        .map(|&v| f64::from(half::bf16::from_f32(v).to_f32()))
        .collect();
    for isa in isas() {
        let mut y = vec![f32::NAN; m * n];
        if m == 1 {
            gemv_f8e4m3_with(isa, n, k, &w, scale, &x, &mut y).unwrap();
        } else {
            gemv_f8e4m3_batch_with(isa, m, n, k, &w, scale, &x, &mut y).unwrap();
        }
        for r in 0..m {
            for i in 0..n {
                let bound: f64 = (0..k)
                    .map(|j| (xb[r * k + j] * f64::from(f8e4m3_to_f32(w[i * k + j]))).abs())
                    .sum::<f64>()
                    * f64::from(scale);
                let (g, v) = (f64::from(y[r * n + i]), f64::from(want[r * n + i]));
                assert!(
                    (g - v).abs() <= 1e-5 * bound + 2e-7 * v.abs(),
                    "{m}x{n}x{k} at {}: y[{r}, {i}] = {g}, want {v}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn single_row_matches_reference() {
    for (i, &(n, k)) in [(1, 1), (7, 33), (33, 7), (8, 32), (65, 4097), (130, 96)]
        .iter()
        .enumerate()
    {
        check(i as u64, 1, n, k, None);
    }
}

#[test]
fn batches_match_reference() {
    for (i, &m) in [2usize, 3, 8, 11].iter().enumerate() {
        check(10 + i as u64, m, 33, 65, None);
        check(20 + i as u64, m, 129, 1024, None);
    }
}

#[test]
fn every_e4m3_value_widens_exactly() {
    // Rows of all 254 non-NaN bytes (0x7f and 0xff are NaN), in two orders.
    let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
    let mut w = bytes.clone();
    w.extend(bytes.iter().rev());
    check(30, 1, 2, 254, Some(w.clone()));
    check(31, 3, 2, 254, Some(w));
}

#[test]
fn nan_bytes_make_nan_rows() {
    // 0x7f and 0xff are e4m3's NaNs; a row holding one sums to NaN at every level.
    let k = 19;
    for (at, nan) in [(0, 0x7fu8), (9, 0xff), (18, 0x7f)] {
        let mut w = vec![0x38u8; 2 * k];
        w[at] = nan;
        for isa in isas() {
            let mut y = [0.0f32; 2];
            gemv_f8e4m3_with(isa, 2, k, &w, 1.0, &[0.5; 19], &mut y).unwrap();
            assert!(
                y[0].is_nan() && y[1] == 9.5,
                "{} at {}: {y:?}",
                at,
                isa.name()
            );
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    let w = [0u8; 12];
    let mut y = [0.0f32; 3];
    let best = kiln_kernels::Isa::best();
    for e in [
        gemv_f8e4m3_with(best, 3, 4, &w[..11], 1.0, &[0.0; 4], &mut y),
        gemv_f8e4m3_with(best, 3, 4, &w, 1.0, &[0.0; 3], &mut y),
        gemv_f8e4m3_batch_with(best, 2, 3, 4, &w, 1.0, &[0.0; 8], &mut y),
    ] {
        assert!(matches!(e, Err(KernelError::Layout(_))), "{e:?}");
    }
}

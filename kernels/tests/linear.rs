//! Linear-layer groups with epilogues against the reference executor: one call computing
//! layers of every weight kind (f32 `[n, k]` and `[k, n]`, packed bf16, fp8 e4m3) over the same
//! x, each with a different epilogue (none, per-column scale, residual `[m, n]`, bias `[n]`),
//! at odd sizes (n, k ∈ {1, 7, 33}, k also 4097), one row of x (the decode region) and seven
//! (one GEMM per layer), at every instruction-set level.
//!
//! The reference is the graph precision lowering builds: `(x' · Wᵀ) * s + r` with `x'` = x
//! rounded to bf16 for bf16/fp8 weights. Tolerance per element: 1e-5 · (Σ_j |x'_j·w_ij|·|s_i|
//! + |r_i|) (f32 accumulation against the reference's f64).

mod common;

use common::{isas, random, rng};
use half::bf16;
use kiln_ir::f8::{f32_to_f8e4m3, f8e4m3_to_f32};
use kiln_ir::trace::Tracer;
use kiln_ir::DType;
use kiln_kernels::gemm_bf16::PackedBf16;
use kiln_kernels::linear::{linear_with, Layer, Weight};
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use std::collections::HashMap;

/// The weight kinds of the test group.
#[derive(Clone, Copy, Debug)]
enum Kind {
    F32,
    F32Kn,
    Bf16,
    F8,
}

/// One layer: weights `[n, k]` as exact f32 values of the stored dtype, its epilogue.
struct Case {
    kind: Kind,
    n: usize,
    w: Vec<f32>,
    scale: Option<Vec<f32>>,
    add: Option<Vec<f32>>,
}

/// `(x' · Wᵀ) * s + r` on the reference executor, and the tolerance of each element.
fn reference(m: usize, k: usize, x: &[f32], c: &Case) -> (Vec<f32>, Vec<f64>) {
    let t = Tracer::new();
    let xi = t.input("x", DType::F32, [m, k]);
    let wi = t.input("w", DType::F32, [c.n, k]);
    let narrow = matches!(c.kind, Kind::Bf16 | Kind::F8);
    let xr = if narrow {
        xi.cast(DType::BF16).unwrap().cast(DType::F32).unwrap()
    } else {
        xi
    };
    let mut y = xr.matmul_t(&wi, false, true).unwrap();
    let mut inputs = HashMap::from([
        (
            "x".to_string(),
            Tensor::from_f32(vec![m, k], x.to_vec()).unwrap(),
        ),
        (
            "w".to_string(),
            Tensor::from_f32(vec![c.n, k], c.w.clone()).unwrap(),
        ),
    ]);
    if let Some(s) = &c.scale {
        let si = t.input("s", DType::F32, [c.n]);
        y = y.mul(&si).unwrap();
        inputs.insert("s".into(), Tensor::from_f32(vec![c.n], s.clone()).unwrap());
    }
    if let Some(a) = &c.add {
        let shape = if a.len() == c.n {
            vec![c.n]
        } else {
            vec![m, c.n]
        };
        let ai = t.input("a", DType::F32, shape.clone());
        y = y.add(&ai).unwrap();
        inputs.insert("a".into(), Tensor::from_f32(shape, a.clone()).unwrap());
    }
    t.output("y", &y);
    let out = run(&t.finish().unwrap(), &inputs, &NoParams).unwrap();
    let want = out["y"].as_f32().unwrap().to_vec();
    let xv: Vec<f64> = x
        .iter()
        .map(|&v| {
            f64::from(if narrow {
                bf16::from_f32(v).to_f32()
            } else {
                v
            })
        })
        .collect();
    let mut tol = vec![0.0; m * c.n];
    for r in 0..m {
        for i in 0..c.n {
            let dot: f64 = (0..k)
                .map(|j| (xv[r * k + j] * f64::from(c.w[i * k + j])).abs())
                .sum();
            let s = c.scale.as_ref().map_or(1.0, |s| f64::from(s[i]).abs());
            let a = c.add.as_ref().map_or(0.0, |a| {
                f64::from(if a.len() == c.n { a[i] } else { a[r * c.n + i] }).abs()
            });
            tol[r * c.n + i] = 1e-5 * (dot * s + a) + 1e-30;
        }
    }
    (want, tol)
}

#[test]
fn a_group_of_every_weight_kind_and_epilogue_matches_the_reference() {
    let mut r = rng(11);
    for isa in isas() {
        for m in [1usize, 3, 7] {
            for k in [1usize, 7, 33, 4097] {
                let kinds = [Kind::F32, Kind::F32Kn, Kind::Bf16, Kind::F8];
                let cases: Vec<Case> = kinds
                    .iter()
                    .zip([1usize, 7, 33, 33])
                    .enumerate()
                    .map(|(j, (&kind, n))| {
                        let raw = random(&mut r, n * k, -1.0, 1.0);
                        let w = match kind {
                            Kind::F32 | Kind::F32Kn => raw,
                            Kind::Bf16 => raw.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                            Kind::F8 => raw
                                .iter()
                                .map(|&v| f8e4m3_to_f32(f32_to_f8e4m3(v * 300.0)))
                                .collect(),
                        };
                        // Epilogues: none, scale, residual, scale + bias.
                        let scale = (j % 2 == 1).then(|| random(&mut r, n, -2.0, 2.0));
                        let add = match j {
                            2 => Some(random(&mut r, m * n, -1.0, 1.0)),
                            3 => Some(random(&mut r, n, -1.0, 1.0)),
                            _ => None,
                        };
                        Case {
                            kind,
                            n,
                            w,
                            scale,
                            add,
                        }
                    })
                    .collect();
                let x = random(&mut r, m * k, -1.0, 1.0);
                // The stored forms.
                let kn: Vec<Vec<f32>> = cases
                    .iter()
                    .map(|c| {
                        let mut t = vec![0.0; c.n * k];
                        for i in 0..c.n {
                            for j in 0..k {
                                t[j * c.n + i] = c.w[i * k + j];
                            }
                        }
                        t
                    })
                    .collect();
                let packed: Vec<PackedBf16> = cases
                    .iter()
                    .map(|c| {
                        let b: Vec<bf16> = c.w.iter().map(|&v| bf16::from_f32(v)).collect();
                        PackedBf16::pack(c.n, k, &b).unwrap()
                    })
                    .collect();
                let bytes: Vec<Vec<u8>> = cases
                    .iter()
                    .map(|c| c.w.iter().map(|&v| f32_to_f8e4m3(v)).collect())
                    .collect();
                let mut outs: Vec<Vec<f32>> =
                    cases.iter().map(|c| vec![f32::NAN; m * c.n]).collect();
                let mut layers: Vec<Layer<'_>> = cases
                    .iter()
                    .zip(outs.iter_mut())
                    .enumerate()
                    .map(|(j, (c, out))| Layer {
                        weight: match c.kind {
                            Kind::F32 => Weight::F32(&c.w),
                            Kind::F32Kn => Weight::F32Kn(&kn[j]),
                            Kind::Bf16 => Weight::Bf16(&packed[j]),
                            Kind::F8 => Weight::F8E4M3(&bytes[j]),
                        },
                        scale: c.scale.as_deref(),
                        add: c.add.as_deref(),
                        out,
                    })
                    .collect();
                linear_with(isa, m, k, &x, &mut layers).unwrap();
                for (c, got) in cases.iter().zip(&outs) {
                    let (want, tol) = reference(m, k, &x, c);
                    for (i, ((g, w), t)) in got.iter().zip(&want).zip(&tol).enumerate() {
                        let d = (f64::from(*g) - f64::from(*w)).abs();
                        assert!(
                            d <= *t,
                            "{isa:?} {:?} m={m} n={} k={k} [{i}]: {g} vs {w}",
                            c.kind,
                            c.n
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn mismatched_lengths_are_errors() {
    let w = vec![0.0f32; 6];
    let x = vec![0.0f32; 3];
    let mut out = vec![0.0f32; 2];
    let scale = vec![1.0f32; 3];
    let layer = |out| Layer {
        weight: Weight::F32(&w),
        scale: Some(&scale),
        add: None,
        out,
    };
    // n = 2 from the weight; a scale of 3 does not fit.
    let e = linear_with(kiln_kernels::Isa::best(), 1, 3, &x, &mut [layer(&mut out)]);
    assert!(e.is_err());
    // x of 3 elements is not 2 rows of 3.
    let mut out4 = vec![0.0f32; 4];
    let ok = Layer {
        weight: Weight::F32(&w),
        scale: None,
        add: None,
        out: &mut out4,
    };
    assert!(linear_with(kiln_kernels::Isa::best(), 2, 3, &x, &mut [ok]).is_err());
}

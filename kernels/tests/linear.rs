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

use common::{eval, f32t, isas, random, rng};
use half::bf16;
use kiln_ir::f8::{f32_to_f8e4m3, f8e4m3_to_f32};
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op, UnaryOp};
use kiln_kernels::gemm_bf16::PackedBf16;
use kiln_kernels::linear::{linear_with, Activation, Layer, Weight};
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
    bias: Option<Vec<f32>>,
    add: Option<Vec<f32>>,
    activation: Option<Activation>,
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
    if let Some(b) = &c.bias {
        y = y.add(&t.input("b", DType::F32, [c.n])).unwrap();
        inputs.insert("b".into(), Tensor::from_f32(vec![c.n], b.clone()).unwrap());
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
    let unary = match c.activation {
        Some(Activation::Gelu) => Some(UnaryOp::Gelu),
        Some(Activation::GeluTanh) => Some(UnaryOp::GeluTanh),
        None => None,
    };
    if let Some(u) = unary {
        y = t.apply(Op::Unary(u), &[&y]).unwrap();
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
            let b = c.bias.as_ref().map_or(0.0, |b| f64::from(b[i]).abs());
            let e = 1e-5 * (dot * s + a + b) + 1e-30;
            // GELU's slope is below 1.13; the kernels' GELU is within 2e-6 (relative or
            // absolute) of the reference's.
            let w = f64::from(want[r * c.n + i]).abs();
            tol[r * c.n + i] = match c.activation {
                Some(_) => 1.13 * e + 2e-6 * w.max(1.0),
                None => e,
            };
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
                            bias: None,
                            add,
                            activation: None,
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
                        bias: c.bias.as_deref(),
                        add: c.add.as_deref(),
                        activation: c.activation,
                        gate: None,
                        rope: None,
                        round_bf16: false,
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

/// Bias `[n]`, residual `[m, n]` and GELU (erf and tanh forms) after the product, as BERT and
/// GPT-2 layers trace them (`act(x'·Wᵀ + b + r)`): bf16 weights over several GEMM tasks (which
/// finish their blocks) and in one row (the decode region), f32 and fp8 weights.
#[test]
fn bias_residual_and_gelu_epilogues_match_the_reference() {
    let mut r = rng(13);
    for isa in isas() {
        for (m, n, k, kind) in [
            (130, 300, 65, Kind::Bf16),
            (1, 300, 65, Kind::Bf16),
            (7, 33, 7, Kind::F32),
            (3, 33, 7, Kind::F8),
            (1, 33, 7, Kind::F8),
        ] {
            for activation in [None, Some(Activation::Gelu), Some(Activation::GeluTanh)] {
                let raw = random(&mut r, n * k, -1.0, 1.0);
                let w: Vec<f32> = match kind {
                    Kind::F8 => raw
                        .iter()
                        .map(|&v| f8e4m3_to_f32(f32_to_f8e4m3(v)))
                        .collect(),
                    _ => raw.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                };
                let c = Case {
                    kind,
                    n,
                    w,
                    scale: None,
                    bias: Some(random(&mut r, n, -1.0, 1.0)),
                    add: Some(random(&mut r, m * n, -1.0, 1.0)),
                    activation,
                };
                let x = random(&mut r, m * k, -2.0, 2.0);
                let b: Vec<bf16> = c.w.iter().map(|&v| bf16::from_f32(v)).collect();
                let packed = PackedBf16::pack(n, k, &b).unwrap();
                let bytes: Vec<u8> = c.w.iter().map(|&v| f32_to_f8e4m3(v)).collect();
                let mut out = vec![f32::NAN; m * n];
                let mut layer = Layer::new(
                    match kind {
                        Kind::Bf16 => Weight::Bf16(&packed),
                        Kind::F8 => Weight::F8E4M3(&bytes),
                        _ => Weight::F32(&c.w),
                    },
                    &mut out,
                );
                layer.bias = c.bias.as_deref();
                layer.add = c.add.as_deref();
                layer.activation = activation;
                linear_with(isa, m, k, &x, &mut [layer]).unwrap();
                let (want, tol) = reference(m, k, &x, &c);
                for (i, ((g, w), t)) in out.iter().zip(&want).zip(&tol).enumerate() {
                    let d = (f64::from(*g) - f64::from(*w)).abs();
                    assert!(
                        d <= *t,
                        "{isa:?} {kind:?} {activation:?} m={m} n={n} k={k} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
    // A bias must be [n].
    let (w, x, bias) = (vec![0.0f32; 6], vec![0.0f32; 3], vec![0.0f32; 3]);
    let mut out = vec![0.0f32; 2];
    let mut layer = Layer::new(Weight::F32(&w), &mut out);
    layer.bias = Some(&bias);
    assert!(linear_with(kiln_kernels::Isa::best(), 1, 3, &x, &mut [layer]).is_err());
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
        bias: None,
        add: None,
        activation: None,
        gate: None,
        rope: None,
        round_bf16: false,
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
        bias: None,
        add: None,
        activation: None,
        gate: None,
        rope: None,
        round_bf16: false,
        out: &mut out4,
    };
    assert!(linear_with(kiln_kernels::Isa::best(), 2, 3, &x, &mut [ok]).is_err());
}

/// Values `j/8` with `|j| ≤ 8`: exact in bf16 and e4m3, and their products and short sums
/// exact in f32, so a result rounded to bf16 rounds the same on both sides.
fn eighths(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| r.random_range(-8i32..=8) as f32 / 8.0)
        .collect()
}

/// The epilogues after scale and add: a SwiGLU gate (any weight kind, scaled or not), and RoPE
/// over heads with bf16 rounding, at every instruction-set level, one row (decode region) and
/// several, head sizes 2, 8 and 34 (blocks of whole heads: BLOCK is 32), against the reference
/// executor on the graphs precision lowering and the tracer emit: `silu(x·Gᵀ ⊙ s_g) · (x·Wᵀ)`,
/// and `x·Wᵀ` reshaped to heads, `y·cos + cat(-y[.., d/2..], y[.., ..d/2])·sin`, cast to bf16.
#[test]
fn gate_rope_and_rounding_epilogues_match_the_reference() {
    use kiln_kernels::linear::{Gate, Rope};
    let mut r = rng(12);
    for isa in isas() {
        for m in [1usize, 3, 7] {
            for k in [1usize, 7, 33] {
                // SwiGLU with each gate weight kind (the layer's own weight bf16, fp8 or f32).
                for (j, (wk, gk)) in [
                    (Kind::Bf16, Kind::F32),
                    (Kind::F8, Kind::Bf16),
                    (Kind::F32, Kind::F8),
                ]
                .into_iter()
                .enumerate()
                {
                    let n = [1usize, 7, 33][j];
                    let (w, g) = (eighths(&mut r, n * k), eighths(&mut r, n * k));
                    let x = random(&mut r, m * k, -1.0, 1.0);
                    let scale = (j != 0).then(|| random(&mut r, n, -2.0, 2.0));
                    let stored = |kind: Kind, v: &[f32]| -> (Option<PackedBf16>, Vec<u8>) {
                        let b: Vec<bf16> = v.iter().map(|&v| bf16::from_f32(v)).collect();
                        match kind {
                            Kind::Bf16 => (Some(PackedBf16::pack(n, k, &b).unwrap()), Vec::new()),
                            _ => (None, v.iter().map(|&v| f32_to_f8e4m3(v)).collect()),
                        }
                    };
                    let (wp, wb) = stored(wk, &w);
                    let (gp, gb) = stored(gk, &g);
                    let mut out = vec![f32::NAN; m * n];
                    let mut layer = Layer::new(as_weight(wk, &w, &wp, &wb), &mut out);
                    layer.gate = Some(Gate {
                        weight: as_weight(gk, &g, &gp, &gb),
                        scale: scale.as_deref(),
                    });
                    linear_with(isa, m, k, &x, &mut [layer]).unwrap();
                    let narrow = |kind: Kind| !matches!(kind, Kind::F32);
                    let t = Tracer::new();
                    let xi = t.input("x", DType::F32, [m, k]);
                    let xr = |kind: Kind| {
                        if narrow(kind) {
                            xi.cast(DType::BF16).unwrap().cast(DType::F32).unwrap()
                        } else {
                            xi.clone()
                        }
                    };
                    let wi = t.input("w", DType::F32, [n, k]);
                    let gi = t.input("g", DType::F32, [n, k]);
                    let up = xr(wk).matmul_t(&wi, false, true).unwrap();
                    let mut gate = xr(gk).matmul_t(&gi, false, true).unwrap();
                    let mut inputs = vec![
                        ("x", f32t(&[m, k], &x)),
                        ("w", f32t(&[n, k], &w)),
                        ("g", f32t(&[n, k], &g)),
                    ];
                    if let Some(s) = &scale {
                        gate = gate.mul(&t.input("s", DType::F32, [n])).unwrap();
                        inputs.push(("s", f32t(&[n], s)));
                    }
                    let body = "(mul (silu $0) $1)".parse().unwrap();
                    let y = t
                        .apply(Op::FusedElementwise { body }, &[&gate, &up])
                        .unwrap();
                    t.output("y", &y);
                    let want = eval(&t, inputs);
                    assert_rel_scaled(
                        &format!("{isa:?} swiglu {wk:?}/{gk:?} m={m} k={k} n={n}"),
                        &out,
                        &want,
                    );
                }
                // RoPE + bf16 rounding on heads of d columns, 1 and 3 heads.
                for (d, heads, kind) in [
                    (2usize, 3usize, Kind::F32),
                    (8, 1, Kind::Bf16),
                    (34, 3, Kind::F8),
                ] {
                    rope_case(&mut r, isa, m, k, d, heads, kind);
                }
            }
        }
        // Rows and columns over several GEMM tasks (128 rows × 256 columns each): heads that
        // divide a task's columns are rotated in the tasks, others after the GEMM.
        for (d, heads) in [(64usize, 5usize), (80, 4)] {
            rope_case(&mut r, isa, 130, 33, d, heads, Kind::Bf16);
        }
    }
    // A gated layer cannot also take RoPE, and RoPE rows must be [m, d] with d dividing n.
    let w = vec![0.0f32; 12];
    let x = vec![0.0f32; 3];
    let (c, s) = (vec![0.0f32; 3], vec![0.0f32; 3]);
    let mut out = vec![0.0f32; 4];
    let mut odd = Layer::new(Weight::F32(&w), &mut out);
    odd.rope = Some(Rope { cos: &c, sin: &s });
    assert!(linear_with(kiln_kernels::Isa::best(), 1, 3, &x, &mut [odd]).is_err());
    let mut out = vec![0.0f32; 4];
    let mut roped = Layer::new(Weight::F32(&w), &mut out);
    roped.rope = Some(Rope {
        cos: &c[..2],
        sin: &s[..2],
    });
    assert!(linear_with(kiln_kernels::Isa::best(), 1, 3, &x, &mut [roped]).is_ok());
    let mut out = vec![0.0f32; 4];
    let mut gated = Layer::new(Weight::F32(&w), &mut out);
    gated.rope = Some(Rope {
        cos: &c[..2],
        sin: &s[..2],
    });
    gated.gate = Some(Gate {
        weight: Weight::F32(&w),
        scale: None,
    });
    assert!(linear_with(kiln_kernels::Isa::best(), 1, 3, &x, &mut [gated]).is_err());
}

/// `x·Wᵀ` (weight `kind`, `m × k` by `n = d · heads`) with RoPE on heads of `d` and bf16
/// rounding, against the reference executor (exact: eighths keep every step exact in f32).
#[allow(clippy::too_many_arguments)]
fn rope_case(
    r: &mut rand_chacha::ChaCha8Rng,
    isa: kiln_kernels::Isa,
    m: usize,
    k: usize,
    d: usize,
    heads: usize,
    kind: Kind,
) {
    use kiln_ir::Dim;
    use kiln_kernels::linear::Rope;
    let n = d * heads;
    let w = eighths(r, n * k);
    let x = eighths(r, m * k);
    let (cos, sin) = (eighths(r, m * d), eighths(r, m * d));
    let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let packed = PackedBf16::pack(n, k, &b).unwrap();
    let bytes: Vec<u8> = w.iter().map(|&v| f32_to_f8e4m3(v)).collect();
    let mut out = vec![f32::NAN; m * n];
    let weight = match kind {
        Kind::Bf16 => Weight::Bf16(&packed),
        Kind::F8 => Weight::F8E4M3(&bytes),
        _ => Weight::F32(&w),
    };
    let mut layer = Layer::new(weight, &mut out);
    layer.rope = Some(Rope {
        cos: &cos,
        sin: &sin,
    });
    layer.round_bf16 = true;
    linear_with(isa, m, k, &x, &mut [layer]).unwrap();
    let t = Tracer::new();
    let fix = |v: usize| Dim::fixed(v as i64);
    let xi = t.input("x", DType::F32, [m, k]);
    let wi = t.input("w", DType::F32, [n, k]);
    let y = xi.matmul_t(&wi, false, true).unwrap();
    let y = y.reshape(&[fix(m), fix(heads), fix(d)]).unwrap();
    let c = t.input("cos", DType::F32, [m, 1, d]);
    let s = t.input("sin", DType::F32, [m, 1, d]);
    let h = d as i64 / 2;
    let rot = kiln_ir::trace::Tensor::cat(
        &[
            &y.slice(-1, h, d as i64).unwrap().neg().unwrap(),
            &y.slice(-1, 0, h).unwrap(),
        ],
        -1,
    )
    .unwrap();
    let y = y.mul(&c).unwrap().add(&rot.mul(&s).unwrap()).unwrap();
    let y = y.reshape(&[fix(m), fix(n)]).unwrap();
    t.output("y", &y.cast(DType::BF16).unwrap().cast(DType::F32).unwrap());
    let want = eval(
        &t,
        vec![
            ("x", f32t(&[m, k], &x)),
            ("w", f32t(&[n, k], &w)),
            ("cos", f32t(&[m, 1, d], &cos)),
            ("sin", f32t(&[m, 1, d], &sin)),
        ],
    );
    assert_eq!(
        out, want,
        "{isa:?} rope {kind:?} m={m} k={k} d={d} heads={heads}"
    );
}

/// Each element within 1e-5 of the largest magnitude of `want` (the exp of silu is a few ulp
/// off f64's).
fn assert_rel_scaled(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want
        .iter()
        .fold(1e-30f64, |a, &v| a.max(f64::from(v).abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (f64::from(*g) - f64::from(*w)).abs();
        assert!(d <= 1e-5 * scale, "{what}: [{i}] got {g}, want {w}");
    }
}

/// `kind`'s weight from its f32 values, packed bf16 or e4m3 bytes.
fn as_weight<'a>(kind: Kind, v: &'a [f32], p: &'a Option<PackedBf16>, b: &'a [u8]) -> Weight<'a> {
    match kind {
        Kind::Bf16 => Weight::Bf16(p.as_ref().unwrap()),
        Kind::F8 => Weight::F8E4M3(b),
        _ => Weight::F32(v),
    }
}

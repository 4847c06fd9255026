//! Compiled fused elementwise programs against the reference executor's `fused_elementwise` op:
//! every unary, binary and comparison op, where, casts between every float dtype and bool,
//! constants, arithmetic in bf16/f16/fp8, and broadcasting (scalar, row, column, middle axis,
//! strided gathers), on odd shapes and one large enough to run in parallel; at every
//! instruction-set level.
//!
//! Tolerance: bit-exact (NaN matching NaN) except for bodies using exp, sigmoid or silu, which
//! use a vectorized f32 exponential: |got − want| ≤ 1e-6·|want| + 1e-30, and tanh, erf, gelu
//! and gelu_tanh (vectorized f32 approximations): ≤ 2e-6·|want| + 2e-6; widened to one ulp of
//! the result dtype when that is narrower than f32 (a few-ulp f32 difference can move its
//! rounding).

mod common;

use common::{isas, random, rng};
use kiln_ir::trace::Tracer;
use kiln_ir::{BinaryOp, CmpOp, DType, Expr, Literal, Op, UnaryOp};
use kiln_kernels::fused::Program;
use kiln_kernels::KernelError;
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use std::collections::HashMap;

/// The numpy broadcast of `shapes`.
fn broadcast(shapes: &[&[usize]]) -> Vec<usize> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|ax| {
            shapes
                .iter()
                .filter_map(|s| (ax + s.len()).checked_sub(rank).map(|i| s[i]))
                .max()
                .unwrap_or(1)
        })
        .collect()
}

/// Element strides of a dense tensor of `shape` read at `out` shape (0 where broadcast).
fn strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut st = vec![0; out.len()];
    let mut acc = 1;
    for (i, &d) in shape.iter().enumerate().rev() {
        let ax = out.len() - shape.len() + i;
        st[ax] = if d == 1 { 0 } else { acc };
        acc *= d;
    }
    st
}

/// Runs `body` on the reference executor and on the kernel at every level; compares with
/// relative tolerance `rel` (0 = bit-exact).
fn check(body: &str, args: &[Tensor], rel: f64) {
    let body: Expr = body.parse().unwrap();
    check_expr(&body, args, rel);
}

fn check_expr(body: &Expr, args: &[Tensor], rel: f64) {
    check_expr_abs(body, args, rel, 1e-30);
}

/// As [`check_expr`] with an absolute tolerance `abs` beside the relative one.
fn check_expr_abs(body: &Expr, args: &[Tensor], rel: f64, abs: f64) {
    let t = Tracer::new();
    let names: Vec<String> = (0..args.len()).map(|i| format!("a{i}")).collect();
    let ins: Vec<_> = args
        .iter()
        .zip(&names)
        .map(|(a, n)| t.input(n, a.dtype(), a.shape().to_vec()))
        .collect();
    let y = t
        .apply(
            Op::FusedElementwise { body: body.clone() },
            &ins.iter().collect::<Vec<_>>(),
        )
        .unwrap();
    t.output("y", &y);
    let g = t.finish().unwrap();
    let inputs: HashMap<String, Tensor> = names.iter().cloned().zip(args.iter().cloned()).collect();
    let want_t = run(&g, &inputs, &NoParams).unwrap().remove("y").unwrap();
    let want = want_t.to_f64_vec();
    let ulp = match want_t.dtype() {
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        DType::F8E4M3 => 2f64.powi(-3),
        DType::F8E5M2 => 2f64.powi(-2),
        _ => 0.0,
    };
    let tol = if rel > 0.0 { rel.max(ulp) } else { 0.0 };

    let dtypes: Vec<DType> = args.iter().map(Tensor::dtype).collect();
    let prog = Program::compile(body, &dtypes).unwrap();
    let shapes: Vec<&[usize]> = args.iter().map(Tensor::shape).collect();
    let out_shape = broadcast(&shapes);
    let data: Vec<Vec<f32>> = args
        .iter()
        .map(|a| a.to_f64_vec().iter().map(|&v| v as f32).collect())
        .collect();
    let st: Vec<Vec<usize>> = shapes.iter().map(|s| strides(s, &out_shape)).collect();
    let views: Vec<(&[f32], &[usize])> = data
        .iter()
        .zip(&st)
        .map(|(d, s)| (d.as_slice(), s.as_slice()))
        .collect();
    for isa in isas() {
        let mut out = vec![f32::NAN; want.len()];
        prog.run_with(isa, &out_shape, &views, &mut out).unwrap();
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            let g = f64::from(*g);
            let ok = g == *w
                || g.is_nan() && w.is_nan()
                || tol > 0.0 && (g - w).abs() <= tol * w.abs() + abs;
            assert!(
                ok,
                "{body} over {shapes:?} at {}: element {i}: got {g}, want {w}",
                isa.name()
            );
        }
    }
}

fn f32s(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    let mut v = random(&mut rng(seed), n, lo, hi);
    // Special values where there is room.
    for (slot, s) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0]
        .into_iter()
        .enumerate()
    {
        if n > 40 {
            v[slot * 7] = s;
        }
    }
    Tensor::from_f32(shape.to_vec(), v).unwrap()
}

fn bools(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    let v = random(&mut rng(seed), n, 0.0, 1.0);
    Tensor::from_bool(shape.to_vec(), v.iter().map(|&x| x < 0.5).collect()).unwrap()
}

/// The relative and absolute tolerance of a unary op (see the module docs).
fn tolerance(u: UnaryOp) -> (f64, f64) {
    match u {
        UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Silu => (1e-6, 1e-30),
        UnaryOp::Tanh | UnaryOp::Erf | UnaryOp::Gelu | UnaryOp::GeluTanh => (2e-6, 2e-6),
        _ => (0.0, 1e-30),
    }
}

#[test]
fn every_unary_op() {
    let x = f32s(&[33, 7], 1, -4.0, 4.0);
    for u in UnaryOp::ALL {
        if u == UnaryOp::Not {
            check_expr(
                &Expr::Unary(u, Box::new(Expr::Arg(0))),
                &[bools(&[33, 7], 2)],
                0.0,
            );
            continue;
        }
        let (rel, abs) = tolerance(u);
        check_expr_abs(
            &Expr::Unary(u, Box::new(Expr::Arg(0))),
            std::slice::from_ref(&x),
            rel,
            abs,
        );
        // Large magnitudes (exp overflow/underflow, sigmoid saturation).
        let big = f32s(&[4097], 3, -120.0, 120.0);
        check_expr_abs(&Expr::Unary(u, Box::new(Expr::Arg(0))), &[big], rel, abs);
    }
}

#[test]
fn every_binary_and_comparison_op_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 6] = [
        (&[5, 7, 9], &[5, 7, 9]), // same shape
        (&[5, 7, 9], &[]),        // scalar
        (&[5, 7, 9], &[9]),       // row
        (&[5, 7, 9], &[5, 7, 1]), // column
        (&[5, 7, 9], &[7, 1]),    // middle axis
        (&[1, 7, 1], &[5, 1, 9]), // both broadcast
    ];
    for (i, (sa, sb)) in shapes.into_iter().enumerate() {
        let a = f32s(sa, 10 + i as u64, -3.0, 3.0);
        let b = f32s(sb, 20 + i as u64, -3.0, 3.0);
        for op in BinaryOp::ALL {
            let body = Expr::Binary(op, Box::new(Expr::Arg(0)), Box::new(Expr::Arg(1)));
            if matches!(op, BinaryOp::And | BinaryOp::Or) {
                check_expr(&body, &[bools(sa, 1), bools(sb, 2)], 0.0);
            } else {
                check_expr(&body, &[a.clone(), b.clone()], 0.0);
                // Reversed operand order: the broadcast one first.
                let body = Expr::Binary(op, Box::new(Expr::Arg(1)), Box::new(Expr::Arg(0)));
                check_expr(&body, &[a.clone(), b.clone()], 0.0);
            }
        }
        for op in CmpOp::ALL {
            let body = Expr::Compare(op, Box::new(Expr::Arg(0)), Box::new(Expr::Arg(1)));
            check_expr(&body, &[a.clone(), b.clone()], 0.0);
        }
    }
}

#[test]
fn where_casts_and_constants() {
    let x = f32s(&[33, 7], 30, -600.0, 600.0);
    let y = f32s(&[7], 31, -2.0, 2.0);
    check(
        "(where (gt $0 $1) $0 (neg $1))",
        &[x.clone(), y.clone()],
        0.0,
    );
    check(
        "(where $2 $0 $1)",
        &[x.clone(), y.clone(), bools(&[33, 1], 32)],
        0.0,
    );
    for to in ["f32", "bf16", "f16", "f8e4m3", "f8e5m2", "bool"] {
        check(&format!("(cast {to} $0)"), std::slice::from_ref(&x), 0.0);
        check(
            &format!("(cast f32 (cast {to} $0))"),
            std::slice::from_ref(&x),
            0.0,
        );
    }
    check("(cast f32 $0)", &[bools(&[33, 7], 33)], 0.0);
    check("(mul $0 (const f32 0.5))", std::slice::from_ref(&x), 0.0);
    check("$0", &[x], 0.0);
}

#[test]
fn arithmetic_in_narrow_dtypes_rounds_every_node() {
    for (seed, dt) in [
        (40, DType::BF16),
        (41, DType::F16),
        (42, DType::F8E4M3),
        (43, DType::F8E5M2),
    ] {
        let a = f32s(&[7, 33], seed, -8.0, 8.0).cast(dt);
        let b = f32s(&[33], seed + 10, -8.0, 8.0).cast(dt);
        let c = f32s(&[7, 1], seed + 20, -8.0, 8.0).cast(dt);
        check(
            "(add (mul $0 $1) (div $2 $1))",
            &[a.clone(), b.clone(), c.clone()],
            0.0,
        );
        check(
            "(max (sqrt (abs $0)) (min $1 $2))",
            &[a.clone(), b.clone(), c.clone()],
            0.0,
        );
        check("(mul (silu $0) $1)", &[a.clone(), b.clone()], 1e-6);
        check("(cast f32 (sub $0 $1))", &[a, b], 0.0);
    }
}

#[test]
fn model_activations_large_and_parallel() {
    // BERT's gelu chain, GPT-2's tanh gelu, the gated MLP, rmsnorm's scale, over 3 × 40000
    // elements (parallel) and 4097 (odd).
    for (shape, seed) in [
        (&[3usize, 40000][..], 50),
        (&[4097][..], 51),
        (&[1][..], 52),
    ] {
        let a = f32s(shape, seed, -5.0, 5.0);
        let b = f32s(shape, seed + 1, -5.0, 5.0);
        let (rel, abs) = tolerance(UnaryOp::Erf);
        for body in [
            "(mul (mul $0 (const f32 0.5)) (add (const f32 1) (erf (mul $0 (const f32 0.70710677)))))",
            "(gelu_tanh $0)",
        ] {
            check_expr_abs(&body.parse().unwrap(), std::slice::from_ref(&a), rel, abs);
        }
        check("(mul (silu $0) $1)", &[a.clone(), b.clone()], 1e-6);
        check("(mul $0 (rsqrt (add $1 (const f32 1e-6))))", &[a, b], 0.0);
    }
}

#[test]
fn strided_operands_are_gathered() {
    // A transposed operand: out[i, j] = a[j, i] + b[i, j].
    let a = random(&mut rng(60), 33 * 7, -1.0, 1.0);
    let b = random(&mut rng(61), 7 * 33, -1.0, 1.0);
    let prog = Program::compile(&"(add $0 $1)".parse().unwrap(), &[DType::F32; 2]).unwrap();
    for isa in isas() {
        let mut out = vec![0.0; 7 * 33];
        prog.run_with(isa, &[7, 33], &[(&a, &[1, 7]), (&b, &[33, 1])], &mut out)
            .unwrap();
        for i in 0..7 {
            for j in 0..33 {
                assert_eq!(out[i * 33 + j], a[j * 7 + i] + b[i * 33 + j], "{i},{j}");
            }
        }
    }
}

#[test]
fn integer_nodes_and_bad_layouts_are_errors() {
    let int = Expr::Cast(
        DType::F32,
        Box::new(Expr::Const(Literal::scalar_int(DType::I64, 3))),
    );
    assert!(matches!(
        Program::compile(&int, &[]),
        Err(KernelError::Layout(_))
    ));
    assert!(Program::compile(&"(neg $0)".parse().unwrap(), &[DType::I32]).is_err());
    let prog = Program::compile(&"(add $0 $1)".parse().unwrap(), &[DType::F32; 2]).unwrap();
    let a = [0.0f32; 6];
    let mut out = vec![0.0; 6];
    for (args, shape) in [
        (
            vec![(&a[..], &[4usize, 1][..]), (&a[..], &[3, 1][..])],
            &[2usize, 3][..],
        ), // too short
        (vec![(&a[..], &[3, 1][..])], &[2, 3][..]), // one operand
        (vec![(&a[..], &[3][..]), (&a[..], &[3][..])], &[2, 3][..]), // rank
        (
            vec![(&a[..], &[3, 1][..]), (&a[..], &[3, 1][..])],
            &[3, 3][..],
        ), // out size
    ] {
        let e = prog.run(shape, &args, &mut out);
        assert!(matches!(e, Err(KernelError::Layout(_))), "{shape:?}: {e:?}");
    }
}

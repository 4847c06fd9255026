//! Helpers shared by kiln-cuda's integration tests: locating NVRTC (or skipping loudly) and the
//! generated elementwise kernels that cover every op and cast.

// Each test crate uses a subset of these.
#![allow(dead_code)]

use kiln_cuda::codegen::elementwise::{ArgLayout, Elementwise};
use kiln_cuda::toolkit::{preload_nvrtc, Toolkit};
use kiln_cuda::Arch;
use kiln_ir::{BinaryOp, CmpOp, DType, Expr, Literal, UnaryOp};

/// The CUDA tools, or `None` after a loud notice; with `KILN_REQUIRE_NVRTC=1` (CI) their
/// absence fails the test instead.
pub fn toolkit_or_skip(test: &str) -> Option<&'static Toolkit> {
    match preload_nvrtc() {
        Ok(tk) => Some(tk),
        Err(e) if std::env::var("KILN_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("{test}: KILN_REQUIRE_NVRTC=1 but {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** NOTICE: {test} did NOT run: {e}.\n*** Run scripts/fetch-cuda-tools (CI sets KILN_REQUIRE_NVRTC=1, which makes this a failure).\n"
            );
            None
        }
    }
}

fn b(e: Expr) -> Box<Expr> {
    Box::new(e)
}

fn constant(d: DType, v: f64) -> Expr {
    Expr::Const(match d {
        DType::Bool => Literal::scalar_int(d, 1),
        _ if d.is_float() => Literal::scalar(d, v),
        _ => Literal::scalar_int(d, v as i64),
    })
}

/// A body over `$0`, `$1` of dtype `d` using every unary, binary and comparison op that the
/// IR's typing rules define on `d`, plus `where` and a constant.
pub fn every_op_body(d: DType) -> Expr {
    let (x, y) = (Expr::Arg(0), Expr::Arg(1));
    let typed = |e: &Expr| e.dtype(&[d, d]).is_ok();
    let unaries: Vec<Expr> = UnaryOp::ALL
        .into_iter()
        .map(|u| Expr::Unary(u, b(x.clone())))
        .filter(typed)
        .collect();
    let binaries: Vec<Expr> = BinaryOp::ALL
        .into_iter()
        .map(|op| Expr::Binary(op, b(x.clone()), b(y.clone())))
        .filter(typed)
        .collect();
    // Terms are summed (bools: xor'ed, as `ne`), so that every node reaches the result.
    let combine = |a: Expr, e: Expr| {
        if d == DType::Bool {
            Expr::Compare(CmpOp::Ne, b(a), b(e))
        } else {
            Expr::Binary(BinaryOp::Add, b(a), b(e))
        }
    };
    let mut acc = combine(x.clone(), constant(d, 0.5));
    for e in unaries.into_iter().chain(binaries) {
        acc = combine(acc, e);
    }
    for c in CmpOp::ALL {
        let pick = Expr::Where(
            b(Expr::Compare(c, b(x.clone()), b(y.clone()))),
            b(x.clone()),
            b(y.clone()),
        );
        acc = combine(acc, pick);
    }
    acc
}

/// A body over `$0` of dtype `ds[0]` whose nested casts pass every ordered pair of `ds` (a
/// de Bruijn sequence of order 2), ending in `ds[0]`.
pub fn every_cast_body(ds: &[DType]) -> Expr {
    let n = ds.len();
    // de Bruijn B(n, 2) by the standard Lyndon-word construction.
    fn db(t: usize, p: usize, n: usize, a: &mut [usize], seq: &mut Vec<usize>) {
        if t > 2 {
            if 2 % p == 0 {
                seq.extend_from_slice(&a[1..=p]);
            }
        } else {
            a[t] = a[t - p];
            db(t + 1, p, n, a, seq);
            for j in a[t - p] + 1..n {
                a[t] = j;
                db(t + 1, t, n, a, seq);
            }
        }
    }
    let mut seq = vec![];
    db(1, 1, n, &mut [0; 3], &mut seq);
    seq.push(seq[0]);
    let mut e = Expr::Arg(0);
    for &i in &seq[1..] {
        e = Expr::Cast(ds[i], b(e));
    }
    e
}

/// Every generated kernel the tests compile for `arch`, with a label: all ops per dtype, all
/// casts, and constants of every dtype, with every operand layout.
pub fn generated_kernels(arch: Arch) -> Vec<(String, Elementwise)> {
    let dtypes: Vec<DType> = DType::ALL
        .into_iter()
        .filter(|d| arch.has_fp8() || !matches!(d, DType::F8E4M3 | DType::F8E5M2))
        .collect();
    let mut v = vec![];
    for &d in &dtypes {
        v.push((
            format!("fused: every {d} op, broadcast"),
            Elementwise {
                body: every_op_body(d),
                args: vec![d, d],
                layouts: vec![ArgLayout::Same, ArgLayout::Strided],
                rank: 3,
            },
        ));
        let c = match constant(d, -1.5) {
            Expr::Const(l) => l,
            _ => unreachable!(),
        };
        v.push((
            format!("fused: where with a {d} constant"),
            Elementwise {
                body: Expr::Where(b(Expr::Arg(0)), b(Expr::Const(c)), b(Expr::Arg(1))),
                args: vec![DType::Bool, d],
                layouts: vec![ArgLayout::Scalar, ArgLayout::Same],
                rank: 1,
            },
        ));
    }
    v.push((
        "fused: silu(a)*b bf16".to_string(),
        Elementwise {
            body: "(mul (silu $0) $1)".parse().expect("body"),
            args: vec![DType::BF16, DType::BF16],
            layouts: vec![ArgLayout::Same, ArgLayout::Same],
            rank: 1,
        },
    ));
    v.push((
        "fused: every cast".to_string(),
        Elementwise {
            body: every_cast_body(&dtypes),
            args: vec![dtypes[0]],
            layouts: vec![ArgLayout::Same],
            rank: 1,
        },
    ));
    v
}

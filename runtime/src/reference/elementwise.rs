//! Elementwise ops: constants, unary and binary functions, comparisons and `where`, with numpy
//! broadcasting by stride-0 views. Floats compute in f64 ([`UnaryOp::eval`],
//! [`BinaryOp::eval`]) and round once to the dtype; integers compute in wrapping i64.

use super::index::{broadcast_shape, broadcast_strides, pick, Strided};
use super::{bools, floats, from_floats, from_ints, ints, Ctx, ExecError};
use crate::{Storage, Tensor};
use kiln_ir::{BinaryOp, CmpOp, DType, Expr, Literal, UnaryOp};
use std::borrow::Cow;

/// A constant's tensor.
pub(crate) fn constant(ctx: &Ctx<'_>, value: &Literal) -> Result<Tensor, ExecError> {
    let storage = Storage::from_scalars(value.dtype(), value.values().into_iter());
    ctx.tensor(value.shape().to_vec(), storage)
}

/// The broadcast result shape of `shapes` and, per operand, its source positions in the
/// result's row-major order.
fn broadcast(ctx: &Ctx<'_>, shapes: &[&[usize]]) -> Result<(Vec<usize>, Vec<Strided>), ExecError> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = broadcast_shape(&out, s)
            .ok_or_else(|| ctx.mismatch(format!("shapes {shapes:?} do not broadcast")))?;
    }
    let views = shapes
        .iter()
        .map(|s| {
            let st = broadcast_strides(s, &out)
                .ok_or_else(|| ctx.mismatch(format!("shapes {shapes:?} do not broadcast")))?;
            Ok(Strided::new(&out, &st, 0))
        })
        .collect::<Result<_, ExecError>>()?;
    Ok((out, views))
}

fn same_dtype(ctx: &Ctx<'_>, a: &Tensor, b: &Tensor) -> Result<DType, ExecError> {
    if a.dtype() != b.dtype() {
        return Err(ctx.mismatch(format!(
            "operand dtypes differ: {} vs {}",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(a.dtype())
}

/// `u(x)` elementwise.
pub(crate) fn unary(ctx: &Ctx<'_>, u: UnaryOp, x: &Tensor) -> Result<Tensor, ExecError> {
    let dt = x.dtype();
    let storage = match dt {
        DType::Bool if u == UnaryOp::Not => {
            Storage::Bool(bools(x).into_iter().map(|b| !b).collect())
        }
        DType::Bool => return Err(ctx.unsupported(dt)),
        _ if u == UnaryOp::Not => return Err(ctx.unsupported(dt)),
        _ if dt.is_float() => from_floats(dt, floats(x).into_iter().map(|v| u.eval(v))),
        _ => {
            let f: fn(i64) -> i64 = match u {
                UnaryOp::Neg => i64::wrapping_neg,
                UnaryOp::Abs => i64::wrapping_abs,
                UnaryOp::Relu => |v| v.max(0),
                _ => return Err(ctx.unsupported(dt)),
            };
            from_ints(dt, ints(x).into_iter().map(f))
        }
    };
    ctx.tensor(x.shape().to_vec(), storage)
}

/// `x op y` elementwise with broadcasting.
pub(crate) fn binary(
    ctx: &Ctx<'_>,
    op: BinaryOp,
    x: &Tensor,
    y: &Tensor,
) -> Result<Tensor, ExecError> {
    let dt = same_dtype(ctx, x, y)?;
    let (shape, views) = broadcast(ctx, &[x.shape(), y.shape()])?;
    let [ia, ib] = <[Strided; 2]>::try_from(views).map_err(|_| ctx.mismatch("two views"))?;
    let pairs = ia.zip(ib);
    let storage = if dt.is_float() {
        if matches!(op, BinaryOp::And | BinaryOp::Or) {
            return Err(ctx.unsupported(dt));
        }
        let (a, b) = (floats(x), floats(y));
        from_floats(dt, pairs.map(|(i, j)| op.eval(a[i], b[j])))
    } else if dt == DType::Bool {
        let f: fn(bool, bool) -> bool = match op {
            BinaryOp::And => |p, q| p && q,
            BinaryOp::Or => |p, q| p || q,
            _ => return Err(ctx.unsupported(dt)),
        };
        let (a, b) = (bools(x), bools(y));
        Storage::Bool(pairs.map(|(i, j)| f(a[i], b[j])).collect())
    } else {
        let (a, b) = (ints(x), ints(y));
        let values = pairs
            .map(|(i, j)| int_binary(ctx, op, a[i], b[j]))
            .collect::<Result<Vec<i64>, _>>()?;
        from_ints(dt, values.into_iter())
    };
    ctx.tensor(shape, storage)
}

/// One integer binary op in wrapping i64 (wrapped to the dtype afterwards, which for i32 and
/// u8 equals wrapping in that dtype).
fn int_binary(ctx: &Ctx<'_>, op: BinaryOp, a: i64, b: i64) -> Result<i64, ExecError> {
    Ok(match op {
        BinaryOp::Add => a.wrapping_add(b),
        BinaryOp::Sub => a.wrapping_sub(b),
        BinaryOp::Mul => a.wrapping_mul(b),
        BinaryOp::Div if b == 0 => return Err(ExecError::DivisionByZero { node: ctx.node }),
        BinaryOp::Div => a.wrapping_div(b),
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow | BinaryOp::And | BinaryOp::Or => return Err(ctx.unsupported(DType::I64)),
    })
}

/// `x cmp y` elementwise with broadcasting; bool result.
pub(crate) fn compare(
    ctx: &Ctx<'_>,
    op: CmpOp,
    x: &Tensor,
    y: &Tensor,
) -> Result<Tensor, ExecError> {
    let dt = same_dtype(ctx, x, y)?;
    let (shape, views) = broadcast(ctx, &[x.shape(), y.shape()])?;
    let [ia, ib] = <[Strided; 2]>::try_from(views).map_err(|_| ctx.mismatch("two views"))?;
    let pairs = ia.zip(ib);
    let out: Vec<bool> = if dt.is_float() {
        let (a, b) = (floats(x), floats(y));
        pairs.map(|(i, j)| op.eval(a[i], b[j])).collect()
    } else if dt == DType::Bool {
        let (a, b) = (bools(x), bools(y));
        pairs.map(|(i, j)| op.eval(a[i], b[j])).collect()
    } else {
        let (a, b) = (ints(x), ints(y));
        pairs.map(|(i, j)| op.eval(a[i], b[j])).collect()
    };
    ctx.tensor(shape, Storage::Bool(out))
}

/// `where(cond, a, b)` with all three broadcast together; elements copied bit for bit.
pub(crate) fn select(
    ctx: &Ctx<'_>,
    cond: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor, ExecError> {
    same_dtype(ctx, a, b)?;
    if cond.dtype() != DType::Bool {
        return Err(ctx.unsupported(cond.dtype()));
    }
    let (shape, views) = broadcast(ctx, &[cond.shape(), a.shape(), b.shape()])?;
    let [ic, ia, ib] = <[Strided; 3]>::try_from(views).map_err(|_| ctx.mismatch("three views"))?;
    let c = bools(cond);
    let picks = ic
        .zip(ia.zip(ib))
        .map(|(k, (i, j))| if c[k] { (0, i) } else { (1, j) });
    let storage = pick(&[a.storage(), b.storage()], picks)
        .ok_or_else(|| ctx.mismatch("operand dtypes differ"))?;
    ctx.tensor(shape, storage)
}

/// `fused_elementwise`: the body evaluated node by node with the primitive ops above, so
/// every node is rounded to its dtype exactly as the unfused chain rounds it. Computing one
/// whole node at a time (each broadcasting its operands) gives every element the same value as
/// evaluating the tree per element on the operands broadcast to the result shape; the result
/// is then broadcast to the shape of all operands together (a body that only uses some of a
/// dimension's operands still has the op's result shape).
pub(crate) fn fused(ctx: &Ctx<'_>, body: &Expr, args: &[&Tensor]) -> Result<Tensor, ExecError> {
    let out = fused_node(ctx, body, args)?;
    let shapes: Vec<&[usize]> = args.iter().map(|t| t.shape()).collect();
    let (shape, _) = broadcast(ctx, &shapes)?;
    if out.shape() == shape.as_slice() {
        return Ok(out.into_owned());
    }
    let (_, views) = broadcast(ctx, &[out.shape(), &shape])?;
    let view = views
        .into_iter()
        .next()
        .ok_or_else(|| ctx.mismatch("one view"))?;
    let storage =
        pick(&[out.storage()], view.map(|i| (0, i))).ok_or_else(|| ctx.mismatch("one operand"))?;
    ctx.tensor(shape, storage)
}

fn fused_node<'t>(
    ctx: &Ctx<'_>,
    e: &Expr,
    args: &[&'t Tensor],
) -> Result<Cow<'t, Tensor>, ExecError> {
    let sub = |c: &Expr| fused_node(ctx, c, args);
    Ok(Cow::Owned(match e {
        Expr::Arg(i) => {
            let t = args
                .get(*i)
                .ok_or_else(|| ctx.mismatch(format!("body uses ${i} of {}", args.len())))?;
            return Ok(Cow::Borrowed(*t));
        }
        Expr::Const(value) => constant(ctx, value)?,
        Expr::Unary(u, a) => unary(ctx, *u, &*sub(a)?)?,
        Expr::Binary(b, x, y) => binary(ctx, *b, &*sub(x)?, &*sub(y)?)?,
        Expr::Compare(c, x, y) => compare(ctx, *c, &*sub(x)?, &*sub(y)?)?,
        Expr::Where(c, x, y) => select(ctx, &*sub(c)?, &*sub(x)?, &*sub(y)?)?,
        Expr::Cast(to, a) => sub(a)?.cast(*to),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::ExecError;
    use super::*;
    use kiln_ir::scalar::Scalar;
    use kiln_ir::{Op, ValueId};

    const NAN: f32 = f32::NAN;
    const INF: f32 = f32::INFINITY;

    #[test]
    fn constants() {
        let lit = Literal::from_scalars(
            DType::BF16,
            vec![2],
            &[Scalar::Float(1.5), Scalar::Float(-0.25)],
        )
        .unwrap();
        let t = eval_op(Op::Const { value: lit }, NO_ARGS);
        assert_eq!(t.dtype(), DType::BF16);
        assert_close(&t, &[2], &[1.5, -0.25], 0.0);
        let t = eval_op(
            Op::Const {
                value: Literal::scalar_int(DType::I64, -7),
            },
            NO_ARGS,
        );
        assert_eq!(t.shape(), &[] as &[usize]);
        assert_eq!(t.as_i64().unwrap(), &[-7]);
    }

    #[test]
    fn unary_floats() {
        let x = f32t(&[5], &[-2.0, 0.0, 1.0, NAN, INF]);
        let relu = eval_op(Op::Unary(UnaryOp::Relu), &[&x]);
        assert_close(&relu, &[5], &[0.0, 0.0, 1.0, f64::NAN, f64::INFINITY], 0.0);
        let exp = eval_op(Op::Unary(UnaryOp::Exp), &[&x]);
        let e = std::f64::consts::E;
        assert_close(
            &exp,
            &[5],
            &[(-2f64).exp(), 1.0, e, f64::NAN, f64::INFINITY],
            1e-7,
        );
        let rs = eval_op(Op::Unary(UnaryOp::Rsqrt), &[f32t(&[3], &[4.0, 0.0, -1.0])]);
        assert_close(&rs, &[3], &[0.5, f64::INFINITY, f64::NAN], 0.0);
        let sg = eval_op(Op::Unary(UnaryOp::Sigmoid), &[f32t(&[2], &[0.0, -INF])]);
        assert_close(&sg, &[2], &[0.5, 0.0], 0.0);
        let gelu = eval_op(Op::Unary(UnaryOp::Gelu), &[f32t(&[1], &[1.0])]);
        assert_close(&gelu, &[1], &[0.841_344_75], 1e-7);
        // The f16 result is exp(1) rounded once: 2.71875.
        let h = f32t(&[1], &[1.0]).cast(DType::F16);
        let eh = eval_op(Op::Unary(UnaryOp::Exp), &[h]);
        assert_eq!(eh.dtype(), DType::F16);
        assert_close(&eh, &[1], &[2.71875], 0.0);
    }

    #[test]
    fn unary_integers_and_bools() {
        let x = i64t(&[4], &[-3, 0, 5, i64::MIN]);
        let neg = eval_op(Op::Unary(UnaryOp::Neg), &[&x]);
        assert_eq!(neg.as_i64().unwrap(), &[3, 0, -5, i64::MIN]);
        let abs = eval_op(Op::Unary(UnaryOp::Abs), &[&x]);
        assert_eq!(abs.as_i64().unwrap(), &[3, 0, 5, i64::MIN]);
        let relu = eval_op(Op::Unary(UnaryOp::Relu), &[x]);
        assert_eq!(relu.as_i64().unwrap(), &[0, 0, 5, 0]);
        let not = eval_op(Op::Unary(UnaryOp::Not), &[boolt(&[2], &[true, false])]);
        assert_eq!(not, boolt(&[2], &[false, true]));
    }

    #[test]
    fn binary_broadcasting() {
        // [3, 1] + [4] -> [3, 4].
        let a = f32t(&[3, 1], &[0.0, 10.0, 20.0]);
        let b = f32t(&[4], &[1.0, 2.0, 3.0, 4.0]);
        let s = eval_op(Op::Binary(BinaryOp::Add), &[a, b]);
        let want: Vec<f64> = (0..3)
            .flat_map(|i| (1..=4).map(move |j| f64::from(10 * i + j)))
            .collect();
        assert_close(&s, &[3, 4], &want, 0.0);
        // [2, 1, 3] * [2, 1] -> [2, 2, 3].
        let a = f32t(&[2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = f32t(&[2, 1], &[1.0, -1.0]);
        let m = eval_op(Op::Binary(BinaryOp::Mul), &[a, b]);
        let want = [1., 2., 3., -1., -2., -3., 4., 5., 6., -4., -5., -6.];
        assert_close(&m, &[2, 2, 3], &want, 0.0);
        // Scalar - matrix, and float division by zero.
        let d = eval_op(
            Op::Binary(BinaryOp::Div),
            &[f32t(&[], &[1.0]), f32t(&[2, 2], &[2.0, 0.0, -0.0, -4.0])],
        );
        assert_close(
            &d,
            &[2, 2],
            &[0.5, f64::INFINITY, f64::NEG_INFINITY, -0.25],
            0.0,
        );
        let mx = eval_op(
            Op::Binary(BinaryOp::Max),
            &[f32t(&[3], &[1.0, NAN, -1.0]), f32t(&[3], &[2.0, 0.0, -3.0])],
        );
        assert_close(&mx, &[3], &[2.0, f64::NAN, -1.0], 0.0);
        let mn = eval_op(
            Op::Binary(BinaryOp::Min),
            &[f32t(&[2], &[1.0, 5.0]), f32t(&[2], &[NAN, 3.0])],
        );
        assert_close(&mn, &[2], &[f64::NAN, 3.0], 0.0);
        let p = eval_op(
            Op::Binary(BinaryOp::Pow),
            &[
                f32t(&[3], &[-2.0, -2.0, 0.0]),
                f32t(&[3], &[3.0, 0.5, -1.0]),
            ],
        );
        assert_close(&p, &[3], &[-8.0, f64::NAN, f64::INFINITY], 0.0);
    }

    #[test]
    fn binary_integers_wrap_and_truncate() {
        let a = i64t(&[4], &[-7, 7, i64::MAX, 9]);
        let b = i64t(&[4], &[2, -2, 1, 3]);
        let d = eval_op(Op::Binary(BinaryOp::Div), &[a.clone(), b.clone()]);
        assert_eq!(d.as_i64().unwrap(), &[-3, -3, i64::MAX, 3]);
        let s = eval_op(Op::Binary(BinaryOp::Add), &[a.clone(), b.clone()]);
        assert_eq!(s.as_i64().unwrap(), &[-5, 5, i64::MIN, 12]);
        let mx = eval_op(Op::Binary(BinaryOp::Max), &[a, b]);
        assert_eq!(mx.as_i64().unwrap(), &[2, 7, i64::MAX, 9]);
        let i32s = |v: Vec<i32>| Tensor::new(vec![v.len()], Storage::I32(v)).unwrap();
        let s = eval_op(
            Op::Binary(BinaryOp::Add),
            &[i32s(vec![i32::MAX, 1]), i32s(vec![1, 1])],
        );
        assert_eq!(s.storage(), &Storage::I32(vec![i32::MIN, 2]));
        let q = eval_op(
            Op::Binary(BinaryOp::Div),
            &[i32s(vec![i32::MIN]), i32s(vec![-1])],
        );
        assert_eq!(q.storage(), &Storage::I32(vec![i32::MIN]));
        let u8s = |v: Vec<u8>| Tensor::new(vec![v.len()], Storage::U8(v)).unwrap();
        let s = eval_op(
            Op::Binary(BinaryOp::Sub),
            &[u8s(vec![3, 200]), u8s(vec![5, 100])],
        );
        assert_eq!(s.storage(), &Storage::U8(vec![254, 100]));
    }

    #[test]
    fn integer_division_by_zero_is_an_error() {
        let e = try_op(
            Op::Binary(BinaryOp::Div),
            &[i64t(&[2], &[1, 2]), i64t(&[2], &[1, 0])],
        )
        .unwrap_err();
        assert_eq!(e, ExecError::DivisionByZero { node: ValueId(2) });
        assert_eq!(e.to_string(), "%2 (div): integer division by zero");
    }

    #[test]
    fn bool_logic() {
        let a = boolt(&[2, 1], &[true, false]);
        let b = boolt(&[2], &[true, false]);
        let and = eval_op(Op::Binary(BinaryOp::And), &[a.clone(), b.clone()]);
        assert_eq!(and, boolt(&[2, 2], &[true, false, false, false]));
        let or = eval_op(Op::Binary(BinaryOp::Or), &[a, b]);
        assert_eq!(or, boolt(&[2, 2], &[true, true, true, false]));
    }

    #[test]
    fn comparisons() {
        let a = f32t(&[4], &[1.0, NAN, 2.0, -0.0]);
        let b = f32t(&[4], &[1.0, NAN, 3.0, 0.0]);
        let cases = [
            (CmpOp::Eq, [true, false, false, true]),
            (CmpOp::Ne, [false, true, true, false]),
            (CmpOp::Lt, [false, false, true, false]),
            (CmpOp::Le, [true, false, true, true]),
            (CmpOp::Gt, [false, false, false, false]),
            (CmpOp::Ge, [true, false, false, true]),
        ];
        for (op, want) in cases {
            let got = eval_op(Op::Compare(op), &[a.clone(), b.clone()]);
            assert_eq!(got, boolt(&[4], &want), "{}", op.name());
        }
        // Integers beyond 2^53 compare exactly; broadcasting [2, 1] vs [3].
        let big = i64t(&[2, 1], &[(1 << 53) + 1, 0]);
        let other = i64t(&[3], &[1 << 53, (1 << 53) + 1, 0]);
        let gt = eval_op(Op::Compare(CmpOp::Gt), &[big, other]);
        assert_eq!(
            gt,
            boolt(&[2, 3], &[true, false, true, false, false, false])
        );
        let lt = eval_op(
            Op::Compare(CmpOp::Lt),
            &[boolt(&[2], &[false, true]), boolt(&[2], &[true, true])],
        );
        assert_eq!(lt, boolt(&[2], &[true, false]));
    }

    #[test]
    fn where_broadcasts_and_copies_bits() {
        let c = boolt(&[2, 1], &[true, false]);
        let a = f32t(&[3], &[-0.0, NAN, 1.0]);
        let b = f32t(&[], &[7.5]);
        let w = eval_op(Op::Where, &[c, a, b]);
        assert_eq!(w.shape(), &[2, 3]);
        let v = w.as_f32().unwrap();
        assert_eq!(v[0].to_bits(), (-0.0f32).to_bits());
        assert!(v[1].is_nan());
        assert_eq!(&v[2..], &[1.0, 7.5, 7.5, 7.5]);
    }

    fn tensor_of(dtype: DType, values: &[f64]) -> Tensor {
        Tensor::from_scalars(
            dtype,
            vec![values.len()],
            values.iter().map(|&v| Scalar::Float(v)),
        )
        .unwrap()
    }

    #[test]
    fn cast_between_all_dtypes() {
        // Values every dtype represents exactly survive any cast; bool maps non-zero to 1.
        let values = [0.0, 1.0, 2.0, 3.0];
        for from in DType::ALL {
            for to in DType::ALL {
                let x = tensor_of(from, &values);
                let y = eval_op(Op::Cast { to }, &[x]);
                assert_eq!(y.dtype(), to);
                let want: Vec<f64> = values
                    .iter()
                    .map(|&v| {
                        if from == DType::Bool || to == DType::Bool {
                            f64::from(u8::from(v != 0.0))
                        } else {
                            v
                        }
                    })
                    .collect();
                assert_close(&y, &[4], &want, 0.0);
            }
        }
    }

    #[test]
    fn cast_edge_cases() {
        let x = f32t(&[6], &[-2.7, 2.7, NAN, -0.0, 300.5, 1e10]);
        let i = eval_op(Op::Cast { to: DType::I64 }, &[&x]);
        assert_eq!(i.as_i64().unwrap(), &[-2, 2, 0, 0, 300, 10_000_000_000]);
        let u = eval_op(Op::Cast { to: DType::U8 }, &[&x]);
        assert_eq!(u.storage(), &Storage::U8(vec![254, 2, 0, 0, 44, 0]));
        let b = eval_op(Op::Cast { to: DType::Bool }, &[&x]);
        assert_eq!(b, boolt(&[6], &[true, true, true, false, true, true]));
        let h = eval_op(Op::Cast { to: DType::F16 }, &[&x]);
        assert_close(
            &h,
            &[6],
            &[
                -2.69921875,
                2.69921875,
                f64::NAN,
                -0.0,
                300.5,
                f64::INFINITY,
            ],
            0.0,
        );
        let bf = eval_op(Op::Cast { to: DType::BF16 }, &[&x]);
        assert_close(
            &bf,
            &[6],
            &[-2.703125, 2.703125, f64::NAN, 0.0, 300.0, 9_999_220_736.0],
            0.0,
        );
        let e4 = eval_op(Op::Cast { to: DType::F8E4M3 }, &[&x]);
        assert_close(&e4, &[6], &[-2.75, 2.75, f64::NAN, 0.0, 288.0, 448.0], 0.0);
        let e5 = eval_op(Op::Cast { to: DType::F8E5M2 }, &[x]);
        assert_close(
            &e5,
            &[6],
            &[-2.5, 2.5, f64::NAN, 0.0, 320.0, f64::INFINITY],
            0.0,
        );
        let big = i64t(&[2], &[(1 << 24) + 1, -70000]);
        let f = eval_op(Op::Cast { to: DType::F32 }, &[&big]);
        assert_close(&f, &[2], &[16_777_216.0, -70000.0], 0.0);
        let i32v = eval_op(Op::Cast { to: DType::I32 }, &[i64t(&[1], &[(1 << 32) + 5])]);
        assert_eq!(i32v.storage(), &Storage::I32(vec![5]));
        let h = eval_op(Op::Cast { to: DType::F16 }, &[big]);
        assert_close(&h, &[2], &[f64::INFINITY, f64::NEG_INFINITY], 0.0);
    }
}

#[cfg(test)]
mod fused_tests {
    use super::super::testutil::*;
    use super::super::{run, NoParams};
    use crate::Tensor;
    use kiln_ir::{DType, Expr, Graph, Op};
    use std::collections::HashMap;

    /// Runs `chain` (a builder of primitive ops over the inputs) and `fused(body)` on `args`
    /// and asserts the results are equal bit for bit.
    fn same_as_chain(
        args: &[Tensor],
        body: &str,
        chain: impl Fn(&mut Graph, &[kiln_ir::ValueId]) -> kiln_ir::ValueId,
    ) {
        let mut g = Graph::new();
        let mut inputs = HashMap::new();
        let ids: Vec<_> = args
            .iter()
            .enumerate()
            .map(|(i, t)| {
                inputs.insert(format!("x{i}"), t.clone());
                g.input(&format!("x{i}"), ty_of(t))
            })
            .collect();
        let y = chain(&mut g, &ids);
        g.add_output("y", y);
        let want = run(&g, &inputs, &NoParams).unwrap().remove("y").unwrap();
        let body: Expr = body.parse().unwrap();
        let got = eval_op(Op::FusedElementwise { body }, args);
        assert_eq!(got.dtype(), want.dtype());
        assert_eq!(got.shape(), want.shape());
        let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
        for (x, y) in a.iter().zip(&b) {
            assert!(x.to_bits() == y.to_bits(), "{a:?} vs {b:?}");
        }
    }

    fn add(g: &mut Graph, op: Op, ins: &[kiln_ir::ValueId]) -> kiln_ir::ValueId {
        g.add(op, ins).unwrap()
    }

    fn values(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 - 1.1) * k).collect()
    }

    #[test]
    fn swiglu_in_f16_and_bf16_rounds_each_node() {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let a = f32t(&[2, 3, 4], &values(24, 1.7)).cast(dt);
            let b = f32t(&[2, 3, 4], &values(24, -0.9)).cast(dt);
            same_as_chain(&[a, b], "(mul (silu $0) $1)", |g, x| {
                let s = add(g, Op::Unary(kiln_ir::UnaryOp::Silu), &[x[0]]);
                add(g, Op::Binary(kiln_ir::BinaryOp::Mul), &[s, x[1]])
            });
        }
    }

    #[test]
    fn broadcasting_constants_casts_compare_and_where() {
        use kiln_ir::{BinaryOp as B, CmpOp, Literal, UnaryOp as U};
        // x[2, 1, 3] (bf16), y[4, 1] (f32), z[3] (i64): result [2, 4, 3].
        let x = f32t(&[2, 1, 3], &values(6, 3.3)).cast(DType::BF16);
        let y = f32t(&[4, 1], &values(4, 0.7));
        let z = i64t(&[3], &[-2, 0, 5]);
        let body = "(where (lt (cast f32 $2) $1)                     (add (cast f32 (mul $0 (const bf16 0.1))) (exp $1))                     (neg (rsqrt (cast f32 (abs $0)))))";
        same_as_chain(&[x, y, z], body, |g, v| {
            let c = add(
                g,
                Op::Const {
                    value: Literal::scalar(DType::BF16, 0.1),
                },
                &[],
            );
            let m = add(g, Op::Binary(B::Mul), &[v[0], c]);
            let m32 = add(g, Op::Cast { to: DType::F32 }, &[m]);
            let e = add(g, Op::Unary(U::Exp), &[v[1]]);
            let t = add(g, Op::Binary(B::Add), &[m32, e]);
            let a = add(g, Op::Unary(U::Abs), &[v[0]]);
            let a32 = add(g, Op::Cast { to: DType::F32 }, &[a]);
            let r = add(g, Op::Unary(U::Rsqrt), &[a32]);
            let f = add(g, Op::Unary(U::Neg), &[r]);
            let z32 = add(g, Op::Cast { to: DType::F32 }, &[v[2]]);
            let cond = add(g, Op::Compare(CmpOp::Lt), &[z32, v[1]]);
            add(g, Op::Where, &[cond, t, f])
        });
    }

    #[test]
    fn integer_bodies_wrap_and_divide_by_zero_is_an_error() {
        let x = i64t(&[3], &[i64::MAX, -7, 9]);
        let y = i64t(&[3], &[1, 2, 0]);
        same_as_chain(
            &[x.clone(), y.clone()],
            "(mul (add $0 $1) (const i64 3))",
            |g, v| {
                let s = add(g, Op::Binary(kiln_ir::BinaryOp::Add), &[v[0], v[1]]);
                let c = add(
                    g,
                    Op::Const {
                        value: kiln_ir::Literal::scalar_int(DType::I64, 3),
                    },
                    &[],
                );
                add(g, Op::Binary(kiln_ir::BinaryOp::Mul), &[s, c])
            },
        );
        let body: Expr = "(div $0 $1)".parse().unwrap();
        assert!(try_op(Op::FusedElementwise { body }, &[x, y]).is_err());
    }
}

//! Reductions over axes (`reduce_sum/mean/max/min`) and the axis searches `argmax` and `topk`.
//!
//! Sums accumulate in f64 (floats) or wrapping i64 (integers) and round once; max/min propagate
//! NaN; a max/min/argmax over an empty axis is [`ExecError::EmptyReduction`] (a sum over one is
//! 0 and a mean NaN, as PyTorch). `argmax` and `topk` order elements with NaN above everything
//! and ties broken towards the lower index.

use super::index::{split_axis, strides, Strided};
use super::{floats, from_floats, from_ints, ints, Ctx, ExecError};
use crate::Tensor;
use kiln_ir::{DType, ReduceOp};
use std::cmp::Ordering;

/// `op` over `axes` (strictly increasing), dropping them or keeping them as size 1.
pub(crate) fn reduce(
    ctx: &Ctx<'_>,
    op: ReduceOp,
    axes: &[usize],
    keepdim: bool,
    x: &Tensor,
) -> Result<Tensor, ExecError> {
    let shape = x.shape();
    if axes.iter().any(|&a| a >= shape.len()) {
        return Err(ctx.mismatch(format!("axes {axes:?} out of range for {shape:?}")));
    }
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&a| shape[a]).collect();
    let kept_strides = strides(&kept_shape);
    // For each input axis, how far one step along it moves in the output (0 if reduced).
    let mut to_out = vec![0; shape.len()];
    for (j, &a) in kept.iter().enumerate() {
        to_out[a] = kept_strides[j];
    }
    let out_len: usize = kept_shape.iter().product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    if count == 0 && out_len > 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(ExecError::EmptyReduction {
            node: ctx.node,
            op: ctx.op,
        });
    }
    let out_shape: Vec<usize> = if keepdim {
        (0..shape.len())
            .map(|a| if axes.contains(&a) { 1 } else { shape[a] })
            .collect()
    } else {
        kept_shape
    };
    let targets = Strided::new(shape, &to_out, 0);
    let dt = x.dtype();
    let storage = if dt.is_float() {
        let init = match op {
            ReduceOp::Sum | ReduceOp::Mean => 0.0,
            ReduceOp::Max => f64::NEG_INFINITY,
            ReduceOp::Min => f64::INFINITY,
        };
        let mut acc = vec![init; out_len];
        for (v, o) in floats(x).into_iter().zip(targets) {
            let a = &mut acc[o];
            match op {
                ReduceOp::Sum | ReduceOp::Mean => *a += v,
                ReduceOp::Max if v.is_nan() || v > *a => *a = v,
                ReduceOp::Min if v.is_nan() || v < *a => *a = v,
                ReduceOp::Max | ReduceOp::Min => {}
            }
        }
        if op == ReduceOp::Mean {
            let n = count as f64;
            acc.iter_mut().for_each(|a| *a /= n);
        }
        from_floats(dt, acc.into_iter())
    } else if dt.is_int() {
        let init = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => i64::MIN,
            ReduceOp::Min => i64::MAX,
            ReduceOp::Mean => return Err(ctx.unsupported(dt)),
        };
        let mut acc = vec![init; out_len];
        for (v, o) in ints(x).into_iter().zip(targets) {
            let a = &mut acc[o];
            *a = match op {
                ReduceOp::Max => (*a).max(v),
                ReduceOp::Min => (*a).min(v),
                _ => a.wrapping_add(v),
            };
        }
        from_ints(dt, acc.into_iter())
    } else {
        return Err(ctx.unsupported(dt));
    };
    ctx.tensor(out_shape, storage)
}

/// Elements widened for ordering: floats as f64, integers and bools as i64 (exact).
enum Keys {
    Float(Vec<f64>),
    Int(Vec<i64>),
}

impl Keys {
    fn of(x: &Tensor) -> Keys {
        if x.dtype().is_float() {
            Keys::Float(floats(x))
        } else {
            Keys::Int(ints(x))
        }
    }

    /// Compares elements `i` and `j`: NaN is above everything and equal to NaN.
    fn cmp(&self, i: usize, j: usize) -> Ordering {
        match self {
            Keys::Int(v) => v[i].cmp(&v[j]),
            Keys::Float(v) => match (v[i].is_nan(), v[j].is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => v[i].partial_cmp(&v[j]).unwrap_or(Ordering::Equal),
            },
        }
    }
}

/// Index of the largest element along `axis` (the first one on ties; the first NaN if any).
pub(crate) fn argmax(
    ctx: &Ctx<'_>,
    axis: usize,
    keepdim: bool,
    x: &Tensor,
) -> Result<Tensor, ExecError> {
    let shape = x.shape();
    if axis >= shape.len() {
        return Err(ctx.mismatch(format!("axis {axis} out of range for {shape:?}")));
    }
    let (outer, n, inner) = split_axis(shape, axis);
    if n == 0 && outer * inner > 0 {
        return Err(ExecError::EmptyReduction {
            node: ctx.node,
            op: ctx.op,
        });
    }
    let keys = Keys::of(x);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * n + j) * inner + i;
            let mut best = 0;
            for j in 1..n {
                if keys.cmp(at(j), at(best)) == Ordering::Greater {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    let mut out_shape = shape.to_vec();
    if keepdim {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    ctx.tensor(out_shape, from_ints(DType::I64, out.into_iter()))
}

/// Indices of the `k` largest elements along `axis`, largest first, ties by lower index.
pub(crate) fn topk(ctx: &Ctx<'_>, k: usize, axis: usize, x: &Tensor) -> Result<Tensor, ExecError> {
    let shape = x.shape();
    if axis >= shape.len() {
        return Err(ctx.mismatch(format!("axis {axis} out of range for {shape:?}")));
    }
    let (outer, n, inner) = split_axis(shape, axis);
    if k > n {
        return Err(ExecError::TopKOutOfRange {
            node: ctx.node,
            k,
            size: n,
        });
    }
    let keys = Keys::of(x);
    let mut out = vec![0i64; outer * k * inner];
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * n + j) * inner + i;
            order.clear();
            order.extend(0..n);
            // Stable sort, descending: equal keys keep ascending index order.
            order.sort_by(|&p, &q| keys.cmp(at(q), at(p)));
            for (r, &j) in order[..k].iter().enumerate() {
                out[(o * k + r) * inner + i] = j as i64;
            }
        }
    }
    let mut out_shape = shape.to_vec();
    out_shape[axis] = k;
    ctx.tensor(out_shape, from_ints(DType::I64, out.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use kiln_ir::{Graph, Op, TensorType, ValueId};

    const NAN: f32 = f32::NAN;

    fn reduce_op(op: ReduceOp, axes: &[usize], keepdim: bool) -> Op {
        Op::Reduce {
            op,
            axes: axes.to_vec(),
            keepdim,
        }
    }

    #[test]
    fn sums_and_means_over_axes() {
        // x[2, 3] = [[1, 2, 3], [4, 5, 6]].
        let x = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let s0 = eval_op(reduce_op(ReduceOp::Sum, &[0], false), &[&x]);
        assert_close(&s0, &[3], &[5., 7., 9.], 0.0);
        let s1 = eval_op(reduce_op(ReduceOp::Sum, &[1], true), &[&x]);
        assert_close(&s1, &[2, 1], &[6., 15.], 0.0);
        let all = eval_op(reduce_op(ReduceOp::Mean, &[0, 1], false), &[&x]);
        assert_close(&all, &[], &[3.5], 0.0);
        let keep = eval_op(reduce_op(ReduceOp::Mean, &[0, 1], true), &[x]);
        assert_close(&keep, &[1, 1], &[3.5], 0.0);
        // Middle and outer axes of a [2, 3, 2] tensor: x = 0..12.
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let y = f32t(&[2, 3, 2], &data);
        let s = eval_op(reduce_op(ReduceOp::Sum, &[0, 2], true), &[&y]);
        // axis-1 index j collects {2j, 2j+1, 6+2j, 7+2j}: 8j + 14.
        assert_close(&s, &[1, 3, 1], &[14., 22., 30.], 0.0);
        let m = eval_op(reduce_op(ReduceOp::Mean, &[1], false), &[y]);
        assert_close(&m, &[2, 2], &[2., 3., 8., 9.], 0.0);
    }

    #[test]
    fn sums_accumulate_in_f64_and_round_once() {
        // 1 + 2^-24 * 4 in f32 sequential accumulation would lose every small term.
        let tiny = f32::EPSILON / 2.0;
        let x = f32t(&[5], &[1.0, tiny, tiny, tiny, tiny]);
        let s = eval_op(reduce_op(ReduceOp::Sum, &[0], false), &[x]);
        assert_eq!(s.as_f32().unwrap(), &[1.0 + 2.0 * f32::EPSILON]);
    }

    #[test]
    fn max_min_propagate_nan_and_handle_integers() {
        let x = f32t(&[2, 3], &[1., NAN, 3., -4., -5., -6.]);
        let mx = eval_op(reduce_op(ReduceOp::Max, &[1], false), &[&x]);
        assert_close(&mx, &[2], &[f64::NAN, -4.], 0.0);
        let mn = eval_op(reduce_op(ReduceOp::Min, &[0], false), &[x]);
        assert_close(&mn, &[3], &[-4., f64::NAN, -6.], 0.0);
        let i = i64t(&[2, 2], &[i64::MAX, 1, -3, 7]);
        let s = eval_op(reduce_op(ReduceOp::Sum, &[0], false), &[&i]);
        assert_eq!(s.as_i64().unwrap(), &[i64::MAX - 3, 8]);
        let mx = eval_op(reduce_op(ReduceOp::Max, &[1], false), &[&i]);
        assert_eq!(mx.as_i64().unwrap(), &[i64::MAX, 7]);
        let mn = eval_op(reduce_op(ReduceOp::Min, &[0, 1], false), &[i]);
        assert_eq!(mn.as_i64().unwrap(), &[-3]);
    }

    #[test]
    fn empty_axes() {
        let x = f32t(&[2, 0], &[]);
        let s = eval_op(reduce_op(ReduceOp::Sum, &[1], false), &[&x]);
        assert_close(&s, &[2], &[0., 0.], 0.0);
        let m = eval_op(reduce_op(ReduceOp::Mean, &[1], false), &[&x]);
        assert_close(&m, &[2], &[f64::NAN, f64::NAN], 0.0);
        let e = try_op(reduce_op(ReduceOp::Max, &[1], false), &[&x]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%1 (reduce_max): reduction over an empty axis"
        );
        let e = try_op(
            Op::ArgMax {
                axis: 1,
                keepdim: false,
            },
            &[&x],
        )
        .unwrap_err();
        assert_eq!(
            e,
            ExecError::EmptyReduction {
                node: ValueId(1),
                op: "argmax"
            }
        );
        // Reducing the non-empty axis of an empty tensor gives an empty result, no error.
        let mx = eval_op(reduce_op(ReduceOp::Max, &[0], false), &[x]);
        assert_eq!(mx.shape(), &[0]);
    }

    #[test]
    fn argmax_first_max_and_nan() {
        let x = f32t(
            &[3, 4],
            &[
                1.,
                3.,
                3.,
                2.,
                -1.,
                NAN,
                5.,
                NAN,
                f32::NEG_INFINITY,
                -0.0,
                0.0,
                -1.0,
            ],
        );
        let a = eval_op(
            Op::ArgMax {
                axis: 1,
                keepdim: false,
            },
            &[&x],
        );
        assert_eq!(a.shape(), &[3]);
        assert_eq!(a.as_i64().unwrap(), &[1, 1, 1]);
        let a = eval_op(
            Op::ArgMax {
                axis: 0,
                keepdim: true,
            },
            &[x],
        );
        assert_eq!(a.shape(), &[1, 4]);
        assert_eq!(a.as_i64().unwrap(), &[0, 1, 1, 1]);
        let b = eval_op(
            Op::ArgMax {
                axis: 0,
                keepdim: false,
            },
            &[boolt(&[3], &[false, true, true])],
        );
        assert_eq!(b.as_i64().unwrap(), &[1]);
    }

    #[test]
    fn topk_order_ties_and_nan() {
        let x = f32t(&[2, 5], &[1., 3., 2., 3., NAN, 0., 0., -1., 0., 5.]);
        let t = eval_op(Op::TopK { k: 3, axis: 1 }, &[&x]);
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_i64().unwrap(), &[4, 1, 3, 4, 0, 1]);
        let t = eval_op(Op::TopK { k: 2, axis: 0 }, &[x]);
        assert_eq!(t.shape(), &[2, 5]);
        assert_eq!(t.as_i64().unwrap(), &[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        let i = i64t(&[4], &[5, 9, 9, -2]);
        let t = eval_op(Op::TopK { k: 4, axis: 0 }, &[i]);
        assert_eq!(t.as_i64().unwrap(), &[1, 2, 0, 3]);
    }

    #[test]
    fn topk_larger_than_a_symbolic_axis_is_an_error() {
        let mut g = Graph::new();
        let x = g.input("x", TensorType::new(DType::F32, ["n"]));
        let t = g.add(Op::TopK { k: 3, axis: 0 }, &[x]).unwrap();
        g.add_output("t", t);
        let inputs = [("x".to_string(), f32t(&[2], &[1.0, 2.0]))].into();
        let e = super::super::run(&g, &inputs, &super::super::NoParams).unwrap_err();
        assert_eq!(e.to_string(), "%1 (topk): k = 3 exceeds the axis size 2");
    }
}

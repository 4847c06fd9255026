//! Data movement and index-built tensors: reshape, permute, expand, slice, concat, gather
//! (`index_select`), gather_along (`take_along_dim`), iota and the triangular masks. Elements
//! are copied bit for bit; symbolic attributes (shapes, slice bounds, diagonals) are evaluated
//! with the bindings, and indices and bounds are checked at run time.

use super::index::{broadcast_strides, pick, split_axis, strides, take, Strided};
use super::{from_ints, ints, Ctx, ExecError};
use crate::{Storage, Tensor};
use kiln_ir::scalar::Scalar;
use kiln_ir::{DType, Dim};

/// The same elements in row-major order under a new shape.
pub(crate) fn reshape(ctx: &Ctx<'_>, shape: &[Dim], x: &Tensor) -> Result<Tensor, ExecError> {
    let to = ctx.shape(shape)?;
    if to.iter().product::<usize>() != x.numel() {
        return Err(ctx.mismatch(format!("cannot reshape {:?} to {to:?}", x.shape())));
    }
    ctx.tensor(to, x.storage().clone())
}

/// Result axis `i` is operand axis `perm[i]`.
pub(crate) fn permute(ctx: &Ctx<'_>, perm: &[usize], x: &Tensor) -> Result<Tensor, ExecError> {
    let s = x.shape();
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    if sorted != (0..s.len()).collect::<Vec<_>>() {
        return Err(ctx.mismatch(format!("{perm:?} does not permute the axes of {s:?}")));
    }
    let st = strides(s);
    let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let view: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let storage = take(x.storage(), Strided::new(&shape, &view, 0));
    ctx.tensor(shape, storage)
}

/// Broadcasts to `shape` (numpy rules).
pub(crate) fn expand(ctx: &Ctx<'_>, shape: &[Dim], x: &Tensor) -> Result<Tensor, ExecError> {
    let to = ctx.shape(shape)?;
    let view = broadcast_strides(x.shape(), &to)
        .ok_or_else(|| ctx.mismatch(format!("cannot expand {:?} to {to:?}", x.shape())))?;
    let storage = take(x.storage(), Strided::new(&to, &view, 0));
    ctx.tensor(to, storage)
}

/// Elements `start..end` along `axis`; `0 <= start <= end <= size` is checked.
pub(crate) fn slice(
    ctx: &Ctx<'_>,
    axis: usize,
    start: &Dim,
    end: &Dim,
    x: &Tensor,
) -> Result<Tensor, ExecError> {
    let s = x.shape();
    if axis >= s.len() {
        return Err(ctx.mismatch(format!("axis {axis} out of range for {s:?}")));
    }
    let (lo, hi) = (ctx.value(start)?, ctx.value(end)?);
    let size = s[axis];
    let (Ok(a), Ok(b)) = (usize::try_from(lo), usize::try_from(hi)) else {
        return Err(slice_error(ctx, lo, hi, size));
    };
    if a > b || b > size {
        return Err(slice_error(ctx, lo, hi, size));
    }
    let st = strides(s);
    let mut shape = s.to_vec();
    shape[axis] = b - a;
    let storage = take(x.storage(), Strided::new(&shape, &st, a * st[axis]));
    ctx.tensor(shape, storage)
}

fn slice_error(ctx: &Ctx<'_>, start: i64, end: i64, size: usize) -> ExecError {
    ExecError::SliceOutOfRange {
        node: ctx.node,
        start,
        end,
        size,
    }
}

/// Joins the operands along `axis`.
pub(crate) fn concat(ctx: &Ctx<'_>, axis: usize, parts: &[&Tensor]) -> Result<Tensor, ExecError> {
    let Some(first) = parts.first() else {
        return Err(ctx.mismatch("concat needs at least one operand"));
    };
    let s0 = first.shape();
    if axis >= s0.len() {
        return Err(ctx.mismatch(format!("axis {axis} out of range for {s0:?}")));
    }
    let mut shape = s0.to_vec();
    shape[axis] = 0;
    for t in parts {
        let s = t.shape();
        let differs = s.len() != s0.len() || (0..s.len()).any(|i| i != axis && s[i] != s0[i]);
        if differs {
            return Err(ctx.mismatch(format!(
                "cannot concatenate {s0:?} and {s:?} along axis {axis}"
            )));
        }
        shape[axis] += s[axis];
    }
    let (outer, _, inner) = split_axis(&shape, axis);
    // Row block `o` of the result is row block `o` of each operand in turn.
    let block: Vec<usize> = parts.iter().map(|t| t.shape()[axis] * inner).collect();
    let picks = (0..outer).flat_map(|o| {
        block
            .iter()
            .enumerate()
            .flat_map(move |(p, &len)| (0..len).map(move |q| (p, o * len + q)))
    });
    let storages: Vec<&Storage> = parts.iter().map(|t| t.storage()).collect();
    let storage = pick(&storages, picks).ok_or_else(|| ctx.mismatch("operand dtypes differ"))?;
    ctx.tensor(shape, storage)
}

/// Checks that every index is in `0..size`.
fn check_indices(ctx: &Ctx<'_>, idx: &[i64], size: usize) -> Result<(), ExecError> {
    match idx
        .iter()
        .find(|&&i| usize::try_from(i).map_or(true, |u| u >= size))
    {
        Some(&index) => Err(ExecError::IndexOutOfRange {
            node: ctx.node,
            op: ctx.op,
            index,
            size,
        }),
        None => Ok(()),
    }
}

/// `index_select`: result shape `data[..axis] ++ indices.shape ++ data[axis+1..]`.
pub(crate) fn gather(
    ctx: &Ctx<'_>,
    axis: usize,
    data: &Tensor,
    indices: &Tensor,
) -> Result<Tensor, ExecError> {
    let s = data.shape();
    if axis >= s.len() || !indices.dtype().is_int() {
        return Err(ctx.mismatch(format!("cannot gather axis {axis} of {s:?}")));
    }
    let (outer, size, inner) = split_axis(s, axis);
    let idx = ints(indices);
    check_indices(ctx, &idx, size)?;
    let picks = (0..outer).flat_map(|o| {
        idx.iter()
            .flat_map(move |&i| (0..inner).map(move |r| (o * size + i as usize) * inner + r))
    });
    let storage = take(data.storage(), picks);
    let mut shape = s[..axis].to_vec();
    shape.extend_from_slice(indices.shape());
    shape.extend_from_slice(&s[axis + 1..]);
    ctx.tensor(shape, storage)
}

/// `take_along_dim`: `out[.., j, ..] = data[.., indices[.., j, ..], ..]` along `axis`.
pub(crate) fn gather_along(
    ctx: &Ctx<'_>,
    axis: usize,
    data: &Tensor,
    indices: &Tensor,
) -> Result<Tensor, ExecError> {
    let (s, si) = (data.shape(), indices.shape());
    let matches =
        s.len() == si.len() && axis < s.len() && (0..s.len()).all(|k| k == axis || s[k] == si[k]);
    if !matches || !indices.dtype().is_int() {
        return Err(ctx.mismatch(format!(
            "gather_along indices {si:?} do not match data {s:?} on axes other than {axis}"
        )));
    }
    let size = s[axis];
    let (outer, m, inner) = split_axis(si, axis);
    let idx = ints(indices);
    check_indices(ctx, &idx, size)?;
    let picks = (0..outer).flat_map(|o| {
        let idx = &idx;
        (0..m).flat_map(move |j| {
            (0..inner).map(move |r| (o * size + idx[(o * m + j) * inner + r] as usize) * inner + r)
        })
    });
    let storage = take(data.storage(), picks);
    ctx.tensor(si.to_vec(), storage)
}

/// Each element is its index along `axis`.
pub(crate) fn iota(
    ctx: &Ctx<'_>,
    dtype: DType,
    shape: &[Dim],
    axis: usize,
) -> Result<Tensor, ExecError> {
    if dtype == DType::Bool {
        return Err(ctx.unsupported(dtype));
    }
    let s = ctx.shape(shape)?;
    if axis >= s.len() {
        return Err(ctx.mismatch(format!("axis {axis} out of range for {s:?}")));
    }
    let (_, n, inner) = split_axis(&s, axis);
    let total: usize = s.iter().product();
    let storage = from_ints(dtype, (0..total).map(|p| ((p / inner) % n) as i64));
    ctx.tensor(s, storage)
}

/// `triu` (`upper`: keep `col - row >= diagonal`) or `tril` (keep `col - row <= diagonal`) on
/// the last two axes; the rest become zero (false).
pub(crate) fn triangle(
    ctx: &Ctx<'_>,
    upper: bool,
    diagonal: &Dim,
    x: &Tensor,
) -> Result<Tensor, ExecError> {
    let s = x.shape();
    let r = s.len();
    if r < 2 {
        return Err(ctx.mismatch(format!("needs rank >= 2, got {s:?}")));
    }
    let diag = ctx.value(diagonal)?;
    let (rows, cols) = (s[r - 2], s[r - 1]);
    let zero = Storage::from_scalars(x.dtype(), std::iter::once(Scalar::Int(0)));
    let picks = (0..x.numel()).map(|p| {
        let col = (p % cols) as i64;
        let row = ((p / cols) % rows) as i64;
        let keep = if upper {
            col - row >= diag
        } else {
            col - row <= diag
        };
        if keep {
            (0, p)
        } else {
            (1, 0)
        }
    });
    let storage =
        pick(&[x.storage(), &zero], picks).ok_or_else(|| ctx.mismatch("zero of another dtype"))?;
    ctx.tensor(s.to_vec(), storage)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{run, run_with_bindings, NoParams};
    use super::*;
    use kiln_ir::{Bindings, Graph, Op, TensorType, ValueId};
    use std::collections::HashMap;

    fn seq(n: usize) -> Vec<f32> {
        (0..n).map(|v| v as f32).collect()
    }

    fn sym_ty(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType {
            dtype,
            shape: dims
                .iter()
                .map(|d| d.parse::<i64>().map_or_else(|_| Dim::sym(d), Dim::fixed))
                .collect(),
        }
    }

    #[test]
    fn reshape_keeps_row_major_order() {
        let x = f32t(&[2, 3], &seq(6));
        let shape = vec![Dim::fixed(3), Dim::fixed(1), Dim::fixed(2)];
        let y = eval_op(Op::Reshape { shape }, &[x]);
        assert_close(&y, &[3, 1, 2], &[0., 1., 2., 3., 4., 5.], 0.0);
    }

    #[test]
    fn symbolic_reshape() {
        // x[batch, seq, 4] -> [batch*seq, 4].
        let mut g = Graph::new();
        let x = g.input("x", sym_ty(DType::F32, &["batch", "seq", "4"]));
        let bs = &Dim::sym("batch") * &Dim::sym("seq");
        let y = g
            .add(
                Op::Reshape {
                    shape: vec![bs, Dim::fixed(4)],
                },
                &[x],
            )
            .unwrap();
        g.add_output("y", y);
        let inputs = HashMap::from([("x".to_string(), f32t(&[2, 3, 4], &seq(24)))]);
        let out = run(&g, &inputs, &NoParams).unwrap();
        assert_eq!(out["y"].shape(), &[6, 4]);
        assert_eq!(out["y"].as_f32().unwrap(), seq(24).as_slice());
    }

    #[test]
    fn permute_moves_axes() {
        // x[2, 3, 4] = 0..24; y = permute [2, 0, 1]: y[i, j, k] = x[j, k, i].
        let x = f32t(&[2, 3, 4], &seq(24));
        let y = eval_op(
            Op::Permute {
                perm: vec![2, 0, 1],
            },
            &[x],
        );
        assert_eq!(y.shape(), &[4, 2, 3]);
        let v = y.as_f32().unwrap();
        for i in 0..4 {
            for j in 0..2 {
                for k in 0..3 {
                    assert_eq!(v[(i * 2 + j) * 3 + k], (j * 12 + k * 4 + i) as f32);
                }
            }
        }
    }

    #[test]
    fn expand_broadcasts() {
        let x = i64t(&[3, 1], &[1, 2, 3]);
        let shape = vec![Dim::fixed(2), Dim::fixed(3), Dim::fixed(2)];
        let y = eval_op(Op::Expand { shape }, &[x]);
        assert_eq!(y.shape(), &[2, 3, 2]);
        assert_eq!(y.as_i64().unwrap(), &[1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn slices() {
        let x = f32t(&[2, 4], &seq(8));
        let y = eval_op(
            Op::Slice {
                axis: 1,
                start: Dim::fixed(1),
                end: Dim::fixed(3),
            },
            &[&x],
        );
        assert_close(&y, &[2, 2], &[1., 2., 5., 6.], 0.0);
        let y = eval_op(
            Op::Slice {
                axis: 0,
                start: Dim::fixed(1),
                end: Dim::fixed(1),
            },
            &[x],
        );
        assert_eq!(y.shape(), &[0, 4]);
    }

    /// `cache[total, 2]` sliced to `past..past+seq`, with `seq` from `x[seq]` and `past`
    /// explicitly bound.
    fn kv_slice_graph() -> Graph {
        let mut g = Graph::new();
        let c = g.input("cache", sym_ty(DType::F32, &["total", "2"]));
        let x = g.input("x", sym_ty(DType::F32, &["seq"]));
        let start = Dim::sym("past");
        let end = &Dim::sym("past") + &Dim::sym("seq");
        let s = g
            .add(
                Op::Slice {
                    axis: 0,
                    start,
                    end,
                },
                &[c],
            )
            .unwrap();
        g.add_output("s", s);
        g.add_output("x", x);
        g
    }

    #[test]
    fn symbolic_slice_and_out_of_range() {
        let g = kv_slice_graph();
        let inputs = HashMap::from([
            ("cache".to_string(), f32t(&[5, 2], &seq(10))),
            ("x".to_string(), f32t(&[2], &[0.0; 2])),
        ]);
        let env = Bindings::from([("past".to_string(), 3)]);
        let out = run_with_bindings(&g, &inputs, &NoParams, &env).unwrap();
        assert_close(&out["s"], &[2, 2], &[6., 7., 8., 9.], 0.0);
        let env = Bindings::from([("past".to_string(), 4)]);
        let e = run_with_bindings(&g, &inputs, &NoParams, &env).unwrap_err();
        assert_eq!(
            e,
            ExecError::SliceOutOfRange {
                node: ValueId(2),
                start: 4,
                end: 6,
                size: 5
            }
        );
        assert_eq!(
            e.to_string(),
            "%2 (slice): bounds 4..6 do not fit an axis of size 5"
        );
    }

    #[test]
    fn concat_along_axes() {
        let a = f32t(&[2, 1], &[1., 2.]);
        let b = f32t(&[2, 2], &[3., 4., 5., 6.]);
        let y = eval_op(Op::Concat { axis: 1 }, &[a, b.clone()]);
        assert_close(&y, &[2, 3], &[1., 3., 4., 2., 5., 6.], 0.0);
        let c = f32t(&[1, 2], &[7., 8.]);
        let y = eval_op(Op::Concat { axis: 0 }, &[b, c.clone(), c]);
        assert_close(&y, &[4, 2], &[3., 4., 5., 6., 7., 8., 7., 8.], 0.0);
    }

    #[test]
    fn gather_with_2d_indices() {
        // An embedding table [4, 2] looked up with ids [2, 3].
        let table = f32t(&[4, 2], &seq(8));
        let ids = i64t(&[2, 3], &[3, 0, 1, 1, 1, 2]);
        let y = eval_op(Op::Gather { axis: 0 }, &[table.clone(), ids]);
        let want = [6., 7., 0., 1., 2., 3., 2., 3., 2., 3., 4., 5.];
        assert_close(&y, &[2, 3, 2], &want, 0.0);
        // Along axis 1 with i32 indices: [4, 2] -> [4, 3].
        let ids = Tensor::new(vec![3], Storage::I32(vec![1, 0, 1])).unwrap();
        let y = eval_op(Op::Gather { axis: 1 }, &[table, ids]);
        let want = [1., 0., 1., 3., 2., 3., 5., 4., 5., 7., 6., 7.];
        assert_close(&y, &[4, 3], &want, 0.0);
    }

    #[test]
    fn gather_out_of_range_is_an_error() {
        let table = f32t(&[4, 2], &seq(8));
        for bad in [4, -1] {
            let ids = i64t(&[2], &[0, bad]);
            let e = try_op(Op::Gather { axis: 0 }, &[table.clone(), ids]).unwrap_err();
            assert_eq!(
                e,
                ExecError::IndexOutOfRange {
                    node: ValueId(2),
                    op: "gather",
                    index: bad,
                    size: 4
                }
            );
            assert_eq!(
                e.to_string(),
                format!("%2 (gather): index {bad} is out of range for an axis of size 4")
            );
        }
        let e = try_op(
            Op::GatherAlong { axis: 1 },
            &[table, i64t(&[4, 1], &[0, 1, 2, 0])],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "%2 (gather_along): index 2 is out of range for an axis of size 2"
        );
    }

    #[test]
    fn gather_along_axes() {
        // data[2, 3] = [[0, 1, 2], [3, 4, 5]].
        let data = f32t(&[2, 3], &seq(6));
        let idx = i64t(&[2, 2], &[2, 0, 1, 1]);
        let y = eval_op(Op::GatherAlong { axis: 1 }, &[data.clone(), idx]);
        assert_close(&y, &[2, 2], &[2., 0., 4., 4.], 0.0);
        let idx = i64t(&[1, 3], &[1, 0, 1]);
        let y = eval_op(Op::GatherAlong { axis: 0 }, &[data, idx]);
        assert_close(&y, &[1, 3], &[3., 1., 5.], 0.0);
    }

    #[test]
    fn iota_counts_along_an_axis() {
        let shape = vec![Dim::fixed(2), Dim::fixed(3)];
        let rows = eval_op(
            Op::Iota {
                dtype: DType::I64,
                shape: shape.clone(),
                axis: 0,
            },
            NO_ARGS,
        );
        assert_eq!(rows.as_i64().unwrap(), &[0, 0, 0, 1, 1, 1]);
        let cols = eval_op(
            Op::Iota {
                dtype: DType::F32,
                shape,
                axis: 1,
            },
            NO_ARGS,
        );
        assert_close(&cols, &[2, 3], &[0., 1., 2., 0., 1., 2.], 0.0);
    }

    #[test]
    fn triangles_with_offsets() {
        let x = f32t(
            &[3, 4],
            &seq(12).iter().map(|v| v + 1.0).collect::<Vec<_>>(),
        );
        let tri = |upper: bool, d: i64| {
            eval_op(
                Op::Triangle {
                    upper,
                    diagonal: Dim::fixed(d),
                },
                &[&x],
            )
        };
        #[rustfmt::skip]
        let cases = [
            (true, 0, [1., 2., 3., 4., 0., 6., 7., 8., 0., 0., 11., 12.]),
            (true, 1, [0., 2., 3., 4., 0., 0., 7., 8., 0., 0., 0., 12.]),
            (true, -1, [1., 2., 3., 4., 5., 6., 7., 8., 0., 10., 11., 12.]),
            (false, 0, [1., 0., 0., 0., 5., 6., 0., 0., 9., 10., 11., 0.]),
            (false, -1, [0., 0., 0., 0., 5., 0., 0., 0., 9., 10., 0., 0.]),
            (false, 2, [1., 2., 3., 0., 5., 6., 7., 8., 9., 10., 11., 12.]),
        ];
        for (upper, d, want) in cases {
            assert_close(&tri(upper, d), &[3, 4], &want, 0.0);
        }
        // A batch of bool matrices.
        let b = boolt(&[2, 2, 2], &[true; 8]);
        let y = eval_op(
            Op::Triangle {
                upper: false,
                diagonal: Dim::fixed(0),
            },
            &[b],
        );
        assert_eq!(
            y,
            boolt(
                &[2, 2, 2],
                &[true, false, true, true, true, false, true, true]
            )
        );
    }

    #[test]
    fn triangle_with_symbolic_diagonal() {
        // triu(ones[seq, past+seq], past+1): the masked-out future of a KV-cached causal mask.
        let mut g = Graph::new();
        let total = &Dim::sym("past") + &Dim::sym("seq");
        let x = g.input(
            "x",
            TensorType {
                dtype: DType::F32,
                shape: vec![Dim::sym("seq"), total],
            },
        );
        let diagonal = &Dim::sym("past") + &Dim::fixed(1);
        let y = g
            .add(
                Op::Triangle {
                    upper: true,
                    diagonal,
                },
                &[x],
            )
            .unwrap();
        g.add_output("y", y);
        let env = Bindings::from([("past".to_string(), 1)]);
        let inputs = HashMap::from([("x".to_string(), f32t(&[2, 3], &[1.0; 6]))]);
        let out = run_with_bindings(&g, &inputs, &NoParams, &env).unwrap();
        assert_close(&out["y"], &[2, 3], &[0., 0., 1., 0., 0., 0.], 0.0);
        // Without `past` the diagonal cannot be evaluated, and the input's shape `past+seq`
        // is solved for it once `seq` is known: past = 3 - 2 = 1 as well.
        let out = run(&g, &inputs, &NoParams).unwrap();
        assert_close(&out["y"], &[2, 3], &[0., 0., 1., 0., 0., 0.], 0.0);
    }
}

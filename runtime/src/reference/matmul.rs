//! Batched matrix product `a[..., m, k] · b[..., k, n]` with broadcast batch axes and optional
//! transposed reading of either operand; accumulates in f64 (floats, rounded once) or wrapping
//! i64 (integers).

use super::index::{broadcast_shape, broadcast_strides, Strided};
use super::{floats, from_floats, from_ints, ints, Ctx, ExecError};
use crate::Tensor;

/// The product, with `transpose_a` / `transpose_b` reading that operand's last two axes swapped.
pub(crate) fn matmul(
    ctx: &Ctx<'_>,
    transpose_a: bool,
    transpose_b: bool,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor, ExecError> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() < 2 || sb.len() < 2 || a.dtype() != b.dtype() {
        return Err(ctx.mismatch(format!("cannot multiply {sa:?} by {sb:?}")));
    }
    let (ra, rb) = (sa.len(), sb.len());
    let (m, k) = if transpose_a {
        (sa[ra - 1], sa[ra - 2])
    } else {
        (sa[ra - 2], sa[ra - 1])
    };
    let (kb, n) = if transpose_b {
        (sb[rb - 1], sb[rb - 2])
    } else {
        (sb[rb - 2], sb[rb - 1])
    };
    let batch = broadcast_shape(&sa[..ra - 2], &sb[..rb - 2]);
    let (Some(batch), true) = (batch, k == kb) else {
        return Err(ctx.mismatch(format!("cannot multiply {sa:?} by {sb:?}")));
    };
    // Batch strides in units of whole matrices, then scaled to elements.
    let matrix_offsets = |s: &[usize], size: usize| -> Result<Strided, ExecError> {
        let st = broadcast_strides(s, &batch)
            .ok_or_else(|| ctx.mismatch("batch axes do not broadcast"))?;
        let st: Vec<usize> = st.iter().map(|x| x * size).collect();
        Ok(Strided::new(&batch, &st, 0))
    };
    let offs_a = matrix_offsets(&sa[..ra - 2], m * k)?;
    let offs_b = matrix_offsets(&sb[..rb - 2], k * n)?;
    // Position of element (row, col) of the logical matrices inside one stored matrix.
    let at_a = |i: usize, p: usize| if transpose_a { p * m + i } else { i * k + p };
    let at_b = |p: usize, j: usize| if transpose_b { j * k + p } else { p * n + j };

    let batches: Vec<(usize, usize)> = offs_a.zip(offs_b).collect();
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let dt = a.dtype();
    let storage = if dt.is_float() {
        let (x, y) = (floats(a), floats(b));
        let mut out = Vec::with_capacity(batches.len() * m * n);
        for &(oa, ob) in &batches {
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|p| x[oa + at_a(i, p)] * y[ob + at_b(p, j)])
                        .sum();
                    out.push(dot);
                }
            }
        }
        from_floats(dt, out.into_iter())
    } else if dt.is_int() {
        let (x, y) = (ints(a), ints(b));
        let mut out = Vec::with_capacity(batches.len() * m * n);
        for &(oa, ob) in &batches {
            for i in 0..m {
                for j in 0..n {
                    let dot = (0..k).fold(0i64, |acc, p| {
                        acc.wrapping_add(x[oa + at_a(i, p)].wrapping_mul(y[ob + at_b(p, j)]))
                    });
                    out.push(dot);
                }
            }
        }
        from_ints(dt, out.into_iter())
    } else {
        return Err(ctx.unsupported(dt));
    };
    ctx.tensor(shape, storage)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use kiln_ir::Op;

    fn mm(ta: bool, tb: bool) -> Op {
        Op::MatMul {
            transpose_a: ta,
            transpose_b: tb,
        }
    }

    /// Plain row-major matrix product of `[m, k]` by `[k, n]`.
    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| x[r * cols + c]))
            .collect()
    }

    #[test]
    fn hand_checked_2x2() {
        let a = f32t(&[2, 2], &[1., 2., 3., 4.]);
        let b = f32t(&[2, 2], &[5., 6., 7., 8.]);
        let c = eval_op(mm(false, false), &[a.clone(), b.clone()]);
        assert_close(&c, &[2, 2], &[19., 22., 43., 50.], 0.0);
        // aᵀ·b = [[1,3],[2,4]]·b.
        let c = eval_op(mm(true, false), &[a.clone(), b.clone()]);
        assert_close(&c, &[2, 2], &[26., 30., 38., 44.], 0.0);
        // a·bᵀ.
        let c = eval_op(mm(false, true), &[a.clone(), b.clone()]);
        assert_close(&c, &[2, 2], &[17., 23., 39., 53.], 0.0);
        // aᵀ·bᵀ = (b·a)ᵀ.
        let c = eval_op(mm(true, true), &[a, b]);
        assert_close(&c, &[2, 2], &[23., 31., 34., 46.], 0.0);
    }

    #[test]
    fn transpose_flags_on_rectangular_matrices() {
        // a[2, 3], b[3, 4]: every flag combination reads stored transposes back to a·b.
        let a: Vec<f32> = (0..6).map(|v| v as f32 - 2.0).collect();
        let b: Vec<f32> = (0..12).map(|v| (v as f32) * 0.5 - 1.0).collect();
        let want = naive(
            &a.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            &b.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            2,
            3,
            4,
        );
        let at = transpose(&a, 2, 3);
        let bt = transpose(&b, 3, 4);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ta_t = if ta {
                f32t(&[3, 2], &at)
            } else {
                f32t(&[2, 3], &a)
            };
            let tb_t = if tb {
                f32t(&[4, 3], &bt)
            } else {
                f32t(&[3, 4], &b)
            };
            let c = eval_op(mm(ta, tb), &[ta_t, tb_t]);
            assert_close(&c, &[2, 4], &want, 0.0);
        }
    }

    #[test]
    fn batch_broadcasting() {
        // a[2, 1, 1, 2] · b[3, 2, 1] -> [2, 3, 1, 1]: out[i, j] = a_i · b_j.
        let a = f32t(&[2, 1, 1, 2], &[1., 2., 3., 4.]);
        let b = f32t(&[3, 2, 1], &[1., 0., 0., 1., 1., 1.]);
        let c = eval_op(mm(false, false), &[a, b]);
        assert_close(&c, &[2, 3, 1, 1], &[1., 2., 3., 3., 4., 7.], 0.0);
        // A shared rhs matrix for a batch of lhs matrices, with b transposed.
        let a = f32t(&[2, 1, 2], &[1., 2., 3., 4.]);
        let b = f32t(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
        let c = eval_op(mm(false, true), &[a, b]);
        assert_close(&c, &[2, 1, 3], &[1., 2., 3., 3., 4., 7.], 0.0);
    }

    #[test]
    fn integers_and_empty_contraction() {
        let a = i64t(&[1, 2], &[3, -4]);
        let b = i64t(&[2, 1], &[5, 6]);
        let c = eval_op(mm(false, false), &[a, b]);
        assert_eq!(c.as_i64().unwrap(), &[-9]);
        let a = f32t(&[2, 0], &[]);
        let b = f32t(&[0, 3], &[]);
        let c = eval_op(mm(false, false), &[a, b]);
        assert_close(&c, &[2, 3], &[0.0; 6], 0.0);
    }

    #[test]
    fn accumulates_in_f64() {
        // 1e8 + 1 - 1e8 in f32 is 0; with an f64 accumulator it is 1.
        let a = f32t(&[1, 3], &[1e8, 1.0, -1e8]);
        let b = f32t(&[3, 1], &[1.0, 1.0, 1.0]);
        let c = eval_op(mm(false, false), &[a, b]);
        assert_eq!(c.as_f32().unwrap(), &[1.0]);
    }
}

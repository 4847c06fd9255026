//! Row-wise kernels over the last axis: softmax and log-softmax, rmsnorm, layernorm. The
//! operand is viewed as `[rows, cols]` (contiguous), rows dynamic; the norms compile their row
//! length in, softmax takes it at run time (it is the key length when attention is not fused).
//!
//! Each is one `scf.parallel` over rows (split across threads by the JIT, mapped to GPU
//! threads on the GPU) whose body makes its few passes over one row while it sits in the L1
//! cache, as the native kernels do: row statistics as `scf.for` loops carrying their
//! accumulator in a register (reassociable, so LLVM vectorizes them), then the output pass.

use super::build::Builder;
use super::loops::{for_loop, parallel_rows, Ix};
use super::lower::{fixed, module, Lowered};
use super::scalar::Scalars;
use super::spec::{KernelKey, Layout};
use super::MlirError;
use kiln_ir::Op;
use melior::ir::{Block, Value};
use melior::Context;

type V<'c, 'a> = Value<'c, 'a>;

/// `[rows, cols]` of a shape normalized over its last axis.
fn rows_cols(shape: &[usize]) -> Result<(usize, usize), MlirError> {
    let (&cols, lead) = shape
        .split_last()
        .ok_or_else(|| MlirError::Unsupported("a row-wise op on a rank-0 tensor".into()))?;
    Ok((lead.iter().product(), cols))
}

/// The layout of a row-wise op: `x` as `[rows, cols]`, the weight and bias as `[cols]`, the
/// output as `x`; the norms fix `cols`.
pub fn layout(op: &Op, inputs: &[&[usize]]) -> Result<Layout, MlirError> {
    let shape = inputs[0];
    if let Op::Softmax { axis } | Op::LogSoftmax { axis } = op {
        if axis + 1 != shape.len() {
            return Err(MlirError::Unsupported(format!(
                "softmax over axis {axis} of a rank-{} tensor (only the last axis is lowered)",
                shape.len()
            )));
        }
    }
    let (rows, cols) = rows_cols(shape)?;
    let norm = matches!(op, Op::RmsNorm { .. } | Op::LayerNorm { .. });
    let mut l = Layout::new(Vec::new());
    l.arg(vec![rows, cols], &[false, norm], true);
    for _ in 1..inputs.len() {
        l.arg(vec![cols], &[true], false);
    }
    l.arg(vec![rows, cols], &[false, norm], true);
    Ok(l)
}

/// `combine` (`arith.addf`, `arith.maximumf`) of `f(j)` over `j < cols`, from `init`: an
/// `scf.for` carrying the accumulator.
fn over_row<'c, 'a>(
    b: &Builder<'c>,
    block: &'a Block<'c>,
    cols: V<'c, '_>,
    (init, combine): (f64, &str),
    f: impl for<'i> FnOnce(&Ix<'_, 'c, 'i>, V<'c, 'i>) -> Result<V<'c, 'i>, MlirError>,
) -> Result<V<'c, 'a>, MlirError> {
    let ix = Ix { b, block };
    let zero = ix.c(0)?;
    let init = ix.scalars().c(init)?;
    Ok(for_loop(b, block, (zero, cols), &[init], |inner, j, acc| {
        let ix = Ix { b, block: inner };
        let t = f(&ix, j)?;
        Ok(vec![ix.scalars().reassoc(combine, acc[0], t)?])
    })?[0])
}

/// `f(j)` for every `j < cols`.
fn each_col<'c>(
    b: &Builder<'c>,
    block: &Block<'c>,
    cols: V<'c, '_>,
    f: impl for<'i> FnOnce(&Ix<'_, 'c, 'i>, V<'c, 'i>) -> Result<(), MlirError>,
) -> Result<(), MlirError> {
    let zero = Ix { b, block }.c(0)?;
    for_loop(b, block, (zero, cols), &[], |inner, j, _| {
        f(&Ix { b, block: inner }, j)?;
        Ok(vec![])
    })?;
    Ok(())
}

/// A row-wise kernel: `row` gets the builder, the row loop's block, the row, the row length
/// and the function's arguments.
fn rowwise<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    row: impl for<'a> FnOnce(
            &Builder<'c>,
            &'a Block<'c>,
            V<'c, 'a>,
            V<'c, 'a>,
            &[V<'c, 'a>],
        ) -> Result<(), MlirError>
        + 'static,
) -> Result<Lowered<'c>, MlirError> {
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let rows = b.dim(block, v[0], 0)?;
            let cols = b.dim(block, v[0], 1)?;
            parallel_rows(b, block, rows, |blk, r| row(b, blk, r, cols, v))
        }),
    )
}

/// Softmax (`log` false) or log-softmax over the last axis, per row: the maximum `m`, then
/// `e = exp(x - m)` (stored, for softmax) and its sum, then `e / sum` (by the sum's
/// reciprocal) or `x - m - log(sum)`.
pub fn softmax<'c>(ctx: &'c Context, key: &KernelKey, log: bool) -> Result<Lowered<'c>, MlirError> {
    rowwise(ctx, key, move |b, blk, r, cols, v| {
        let (x, y) = (v[0], v[1]);
        // maxnum (NaN-ignoring, cheaper than IEEE maximum on x86): a NaN in the row makes the
        // sum, hence every output, NaN either way.
        let max = (f64::NEG_INFINITY, "arith.maxnumf");
        let m = over_row(b, blk, cols, max, |ix, j| ix.load(x, &[r, j]))?;
        let sum = over_row(b, blk, cols, (0.0, "arith.addf"), |ix, j| {
            let s = ix.scalars();
            let e = s.exp(s.bin("arith.subf", ix.load(x, &[r, j])?, m)?)?;
            if !log {
                ix.store(e, y, &[r, j])?;
            }
            Ok(e)
        })?;
        let s = Scalars::new(b, blk);
        if log {
            let lse = s.un("math.log", sum)?;
            each_col(b, blk, cols, |ix, j| {
                let s = ix.scalars();
                let d = s.bin("arith.subf", ix.load(x, &[r, j])?, m)?;
                ix.store(s.bin("arith.subf", d, lse)?, y, &[r, j])
            })
        } else {
            let inv = s.recip(sum)?;
            each_col(b, blk, cols, |ix, j| {
                let s = ix.scalars();
                ix.store(s.bin("arith.mulf", ix.load(y, &[r, j])?, inv)?, y, &[r, j])
            })
        }
    })
}

/// `x / sqrt(mean(x²) + eps) * w`, per row: the sum of squares, the scale, the output pass.
pub fn rmsnorm<'c>(ctx: &'c Context, key: &KernelKey, eps: f64) -> Result<Lowered<'c>, MlirError> {
    let n = fixed(key, 0, 1)? as f64;
    rowwise(ctx, key, move |b, blk, r, cols, v| {
        let (x, w, y) = (v[0], v[1], v[2]);
        let ss = over_row(b, blk, cols, (0.0, "arith.addf"), |ix, j| {
            let t = ix.load(x, &[r, j])?;
            ix.scalars().bin("arith.mulf", t, t)
        })?;
        let s = Scalars::new(b, blk);
        let ms = s.bin("arith.divf", ss, s.c(n)?)?;
        let scale = s.recip(s.un("math.sqrt", s.bin("arith.addf", ms, s.c(eps)?)?)?)?;
        each_col(b, blk, cols, |ix, j| {
            let s = ix.scalars();
            let t = s.bin("arith.mulf", ix.load(x, &[r, j])?, scale)?;
            ix.store(s.bin("arith.mulf", t, ix.load(w, &[j])?)?, y, &[r, j])
        })
    })
}

/// `(x - mean) / sqrt(var + eps) * w + bias` (biased variance), per row: the mean, the sum of
/// squared deviations, the scale, the output pass.
pub fn layernorm<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    eps: f64,
) -> Result<Lowered<'c>, MlirError> {
    let n = fixed(key, 0, 1)? as f64;
    rowwise(ctx, key, move |b, blk, r, cols, v| {
        let (x, w, bias, y) = (v[0], v[1], v[2], v[3]);
        let sum = over_row(b, blk, cols, (0.0, "arith.addf"), |ix, j| {
            ix.load(x, &[r, j])
        })?;
        let s = Scalars::new(b, blk);
        let mean = s.bin("arith.divf", sum, s.c(n)?)?;
        let dev = over_row(b, blk, cols, (0.0, "arith.addf"), |ix, j| {
            let s = ix.scalars();
            let d = s.bin("arith.subf", ix.load(x, &[r, j])?, mean)?;
            s.bin("arith.mulf", d, d)
        })?;
        let var = s.bin("arith.divf", dev, s.c(n)?)?;
        let scale = s.recip(s.un("math.sqrt", s.bin("arith.addf", var, s.c(eps)?)?)?)?;
        each_col(b, blk, cols, |ix, j| {
            let s = ix.scalars();
            let d = s.bin("arith.subf", ix.load(x, &[r, j])?, mean)?;
            let t = s.bin(
                "arith.mulf",
                s.bin("arith.mulf", d, scale)?,
                ix.load(w, &[j])?,
            )?;
            ix.store(s.bin("arith.addf", t, ix.load(bias, &[j])?)?, y, &[r, j])
        })
    })
}

//! Row-wise kernels over the last axis, as `linalg.generic` reductions into per-row buffers
//! followed by parallel generics: softmax and log-softmax, rmsnorm, layernorm. The operand is
//! viewed as `[rows, cols]` (contiguous), rows dynamic and split across threads by the JIT;
//! the norms compile their row length in, softmax takes it at run time (it is the key length
//! when attention is not fused).

use super::build::{Builder, Iter};
use super::lower::{fixed, module, Lowered};
use super::scalar::Scalars;
use super::spec::{KernelKey, Layout};
use super::MlirError;
use kiln_ir::Op;
use melior::ir::{AffineMap, Block, Value};
use melior::Context;

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

/// The maps `(i, j) -> (i, j)`, `(i, j) -> (i)` and `(i, j) -> (j)`.
struct Maps<'c> {
    x: AffineMap<'c>,
    row: AffineMap<'c>,
    col: AffineMap<'c>,
}

impl<'c> Maps<'c> {
    fn new(b: &Builder<'c>) -> Self {
        Maps {
            x: b.map(2, &[Some(0), Some(1)]),
            row: b.map(2, &[Some(0)]),
            col: b.map(2, &[Some(1)]),
        }
    }
}

const PR: [Iter; 2] = [Iter::Parallel, Iter::Reduction];
const PP: [Iter; 2] = [Iter::Parallel, Iter::Parallel];

/// A per-row f32 buffer (`memref<?xf32>`, as many rows as `x` has) filled with `init`.
fn row_buffer<'c, 'a>(
    b: &Builder<'c>,
    block: &'a Block<'c>,
    x: Value<'c, '_>,
    init: f64,
) -> Result<Value<'c, 'a>, MlirError> {
    let buf = b.alloc(block, &[None], x)?;
    b.fill(block, init, buf)?;
    Ok(buf)
}

/// Row sums of `f(x, extra...)` into a new row buffer.
fn row_sum<'c, 'a>(
    b: &Builder<'c>,
    block: &'a Block<'c>,
    ins: &[Value<'c, '_>],
    maps: &[AffineMap<'c>],
    f: impl for<'s> Fn(&Scalars<'_, 'c, 's>, &[Value<'c, 's>]) -> Result<Value<'c, 's>, MlirError>,
) -> Result<Value<'c, 'a>, MlirError> {
    let acc = row_buffer(b, block, ins[0], 0.0)?;
    let mut all = maps.to_vec();
    all.push(Maps::new(b).row);
    b.generic(block, ins, &[acc], &all, &PR, |blk, a| {
        let s = Scalars { b, block: blk };
        let t = f(&s, &a[..a.len() - 1])?;
        Ok(vec![s.reassoc("arith.addf", a[a.len() - 1], t)?])
    })?;
    Ok(acc)
}

/// Replaces every element `v` of a row buffer by `f(v)`.
fn map_rows<'c>(
    b: &Builder<'c>,
    block: &Block<'c>,
    buf: Value<'c, '_>,
    f: impl for<'s> Fn(&Scalars<'_, 'c, 's>, Value<'c, 's>) -> Result<Value<'c, 's>, MlirError>,
) -> Result<(), MlirError> {
    b.generic(
        block,
        &[],
        &[buf],
        &[b.map(1, &[Some(0)])],
        &[Iter::Parallel],
        |blk, a| {
            let s = Scalars { b, block: blk };
            Ok(vec![f(&s, a[0])?])
        },
    )
}

/// Softmax (`log` false) or log-softmax over the last axis (`axis` must be it): row max, then
/// `exp(x - max)`, its row sum, and the normalization (by the sum's reciprocal).
pub fn softmax<'c>(ctx: &'c Context, key: &KernelKey, log: bool) -> Result<Lowered<'c>, MlirError> {
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let (x, y) = (v[0], v[1]);
            let m = Maps::new(b);
            let max = row_buffer(b, block, x, f64::NEG_INFINITY)?;
            b.generic(block, &[x], &[max], &[m.x, m.row], &PR, |blk, a| {
                let s = Scalars { b, block: blk };
                Ok(vec![s.bin("arith.maximumf", a[1], a[0])?])
            })?;
            if log {
                let sum = row_sum(b, block, &[x, max], &[m.x, m.row], |s, a| {
                    s.exp(s.bin("arith.subf", a[0], a[1])?)
                })?;
                b.generic(
                    block,
                    &[x, max, sum],
                    &[y],
                    &[m.x, m.row, m.row, m.x],
                    &PP,
                    |blk, a| {
                        let s = Scalars { b, block: blk };
                        let d = s.bin("arith.subf", a[0], a[1])?;
                        Ok(vec![s.bin("arith.subf", d, s.un("math.log", a[2])?)?])
                    },
                )?;
                b.dealloc(block, sum)?;
            } else {
                b.generic(block, &[x, max], &[y], &[m.x, m.row, m.x], &PP, |blk, a| {
                    let s = Scalars { b, block: blk };
                    Ok(vec![s.exp(s.bin("arith.subf", a[0], a[1])?)?])
                })?;
                // One division per row, then a product per element.
                let sum = row_sum(b, block, &[y], &[m.x], |_, a| Ok(a[0]))?;
                map_rows(b, block, sum, |s, v| s.recip(v))?;
                b.generic(block, &[sum], &[y], &[m.row, m.x], &PP, |blk, a| {
                    let s = Scalars { b, block: blk };
                    Ok(vec![s.bin("arith.mulf", a[1], a[0])?])
                })?;
                b.dealloc(block, sum)?;
            }
            b.dealloc(block, max)
        }),
    )
}

/// `x / sqrt(mean(x²) + eps) * w`: row sums of squares, the per-row scale, then one pass.
pub fn rmsnorm<'c>(ctx: &'c Context, key: &KernelKey, eps: f64) -> Result<Lowered<'c>, MlirError> {
    let cols = fixed(key, 0, 1)?;
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let (x, w, y) = (v[0], v[1], v[2]);
            let m = Maps::new(b);
            let scale = row_sum(b, block, &[x], &[m.x], |s, a| {
                s.bin("arith.mulf", a[0], a[0])
            })?;
            map_rows(b, block, scale, |s, ss| {
                let ms = s.bin("arith.divf", ss, s.c(cols as f64)?)?;
                s.recip(s.un("math.sqrt", s.bin("arith.addf", ms, s.c(eps)?)?)?)
            })?;
            b.generic(
                block,
                &[x, scale, w],
                &[y],
                &[m.x, m.row, m.col, m.x],
                &PP,
                |blk, a| {
                    let s = Scalars { b, block: blk };
                    Ok(vec![s.bin(
                        "arith.mulf",
                        s.bin("arith.mulf", a[0], a[1])?,
                        a[2],
                    )?])
                },
            )?;
            b.dealloc(block, scale)
        }),
    )
}

/// `(x - mean) / sqrt(var + eps) * w + bias` (biased variance): row means, row sums of squared
/// deviations, the per-row scale, then one pass.
pub fn layernorm<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    eps: f64,
) -> Result<Lowered<'c>, MlirError> {
    let cols = fixed(key, 0, 1)?;
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let (x, w, bias, y) = (v[0], v[1], v[2], v[3]);
            let m = Maps::new(b);
            let n = cols as f64;
            let mean = row_sum(b, block, &[x], &[m.x], |_, a| Ok(a[0]))?;
            map_rows(b, block, mean, |s, t| s.bin("arith.divf", t, s.c(n)?))?;
            let scale = row_sum(b, block, &[x, mean], &[m.x, m.row], |s, a| {
                let d = s.bin("arith.subf", a[0], a[1])?;
                s.bin("arith.mulf", d, d)
            })?;
            map_rows(b, block, scale, |s, t| {
                let var = s.bin("arith.divf", t, s.c(n)?)?;
                s.recip(s.un("math.sqrt", s.bin("arith.addf", var, s.c(eps)?)?)?)
            })?;
            let maps = [m.x, m.row, m.row, m.col, m.col, m.x];
            b.generic(
                block,
                &[x, mean, scale, w, bias],
                &[y],
                &maps,
                &PP,
                |blk, a| {
                    let s = Scalars { b, block: blk };
                    let d = s.bin("arith.subf", a[0], a[1])?;
                    let t = s.bin("arith.mulf", s.bin("arith.mulf", d, a[2])?, a[3])?;
                    Ok(vec![s.bin("arith.addf", t, a[4])?])
                },
            )?;
            b.dealloc(block, mean)?;
            b.dealloc(block, scale)
        }),
    )
}

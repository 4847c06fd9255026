//! Normalizations, rotary embedding, linear layers and attention: `softmax` / `log_softmax`
//! along an axis, and the composite ops `rmsnorm`, `layernorm`, `rotary`, `linear` (with its
//! head layout) and `attention` (with its merged heads), exactly as documented on their
//! [`kiln_ir::Op`] variants. Norms and attention are computed in f64 from the widened operands
//! and rounded once; `rotary`, `linear` and the layouts are their primitive ops in sequence
//! (so is `swiglu`, which the executor composes from `linear` and elementwise ops).

use super::index::{broadcast_strides, split_axis};
use super::{elementwise, floats, from_floats, layout, matmul, Ctx, ExecError};
use crate::Tensor;
use kiln_ir::{BinaryOp, Dim, UnaryOp};

/// The maximum of `values`, NaN if any is NaN, `-inf` if there are none.
fn nan_max(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(f64::NEG_INFINITY, |m, v| {
        if m.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    })
}

/// Softmax of one row: `exp(x - max) / sum(exp(x - max))`, or with `log`,
/// `x - max - ln(sum(exp(x - max)))`. A row of all `-inf` (or with a NaN) gives NaN.
fn softmax_row(row: &[f64], log: bool) -> Vec<f64> {
    let m = nan_max(row.iter().copied());
    let sum: f64 = row.iter().map(|&x| (x - m).exp()).sum();
    row.iter()
        .map(|&x| {
            if log {
                x - m - sum.ln()
            } else {
                (x - m).exp() / sum
            }
        })
        .collect()
}

/// `softmax` (or `log_softmax` with `log`) along `axis`.
pub(crate) fn softmax(
    ctx: &Ctx<'_>,
    axis: usize,
    log: bool,
    x: &Tensor,
) -> Result<Tensor, ExecError> {
    let s = x.shape();
    if axis >= s.len() || !x.dtype().is_float() {
        return Err(ctx.mismatch(format!("cannot normalize axis {axis} of {s:?}")));
    }
    let (outer, n, inner) = split_axis(s, axis);
    let v = floats(x);
    let mut out = vec![0.0; v.len()];
    let mut row = Vec::with_capacity(n);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * n + j) * inner + i;
            row.clear();
            row.extend((0..n).map(|j| v[at(j)]));
            for (j, y) in softmax_row(&row, log).into_iter().enumerate() {
                out[at(j)] = y;
            }
        }
    }
    ctx.tensor(s.to_vec(), from_floats(x.dtype(), out.into_iter()))
}

/// Checks that each of `params` is a vector as long as the last axis of `x`; returns that length.
fn last_axis(ctx: &Ctx<'_>, x: &Tensor, params: &[&Tensor]) -> Result<usize, ExecError> {
    let Some(&n) = x.shape().last() else {
        return Err(ctx.mismatch("needs rank >= 1"));
    };
    for p in params {
        if p.shape() != [n] || p.dtype() != x.dtype() || !x.dtype().is_float() {
            return Err(ctx.mismatch(format!(
                "weight {:?} does not match input {:?}",
                p.shape(),
                x.shape()
            )));
        }
    }
    Ok(n)
}

/// `x / sqrt(mean(x^2 over the last axis) + eps) * weight`.
pub(crate) fn rmsnorm(
    ctx: &Ctx<'_>,
    eps: f64,
    x: &Tensor,
    weight: &Tensor,
) -> Result<Tensor, ExecError> {
    let n = last_axis(ctx, x, &[weight])?;
    let (v, w) = (floats(x), floats(weight));
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(n.max(1)) {
        let mean_sq = row.iter().map(|a| a * a).sum::<f64>() / n as f64;
        let denom = (mean_sq + eps).sqrt();
        out.extend(row.iter().zip(&w).map(|(a, g)| a / denom * g));
    }
    ctx.tensor(x.shape().to_vec(), from_floats(x.dtype(), out.into_iter()))
}

/// `x * cos + rotate_half(x) * sin` over the last axis, computed as the primitive ops the
/// traced form is made of (slices, negation, concat, two products, a sum), so each rounds as
/// they do.
pub(crate) fn rotary(
    ctx: &Ctx<'_>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor, ExecError> {
    let (Some(axis), Some(&d)) = (x.shape().len().checked_sub(1), x.shape().last()) else {
        return Err(ctx.mismatch("rotary needs rank >= 1"));
    };
    if d % 2 != 0 {
        return Err(ctx.mismatch(format!("rotary needs an even last axis, got {d}")));
    }
    let (zero, half, end) = (size(0), size(d / 2), size(d));
    let low = layout::slice(ctx, axis, &zero, &half, x)?;
    let high = layout::slice(ctx, axis, &half, &end, x)?;
    let negated = elementwise::unary(ctx, UnaryOp::Neg, &high)?;
    let rotated = layout::concat(ctx, axis, &[&negated, &low])?;
    let a = elementwise::binary(ctx, BinaryOp::Mul, x, cos)?;
    let b = elementwise::binary(ctx, BinaryOp::Mul, &rotated, sin)?;
    let y = elementwise::binary(ctx, BinaryOp::Add, &a, &b)?;
    if y.shape() != x.shape() {
        return Err(ctx.mismatch(format!(
            "rotary tables broadcast {:?} to {:?}",
            x.shape(),
            y.shape()
        )));
    }
    Ok(y)
}

/// A linear layer with its epilogue: `matmul(x, w)` (`transpose_a = false`), then `* scale`,
/// then `+ addend` (`epilogue` holds those present, in that order), computed as those
/// primitive ops, so each rounds as they do.
pub(crate) fn linear(
    ctx: &Ctx<'_>,
    transpose_b: bool,
    x: &Tensor,
    w: &Tensor,
    epilogue: &[(BinaryOp, &Tensor)],
) -> Result<Tensor, ExecError> {
    let mut y = matmul::matmul(ctx, false, transpose_b, x, w)?;
    for &(op, operand) in epilogue {
        let next = elementwise::binary(ctx, op, &y, operand)?;
        if next.shape() != y.shape() {
            return Err(ctx.mismatch(format!(
                "linear {} operand {:?} broadcasts the product {:?} to {:?}",
                op.name(),
                operand.shape(),
                y.shape(),
                next.shape()
            )));
        }
        y = next;
    }
    Ok(y)
}

/// A linear layer's result `y[.., s, n]` as `h` heads: reshaped to `[.., s, h, n/h]`, permuted
/// to `[.., h, s, n/h]` and, with `tables` `(cos, sin)`, rotated ([`rotary`]).
pub(crate) fn heads(
    ctx: &Ctx<'_>,
    h: usize,
    y: &Tensor,
    tables: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor, ExecError> {
    let s = y.shape();
    let (r, n) = (s.len(), s.last().copied().unwrap_or(0));
    if r < 2 || h == 0 || n % h != 0 {
        return Err(ctx.mismatch(format!("cannot split {s:?} into {h} heads")));
    }
    let mut shape: Vec<Dim> = s[..r - 1].iter().map(|&d| size(d)).collect();
    shape.extend([size(h), size(n / h)]);
    let split = layout::reshape(ctx, &shape, y)?;
    let mut perm: Vec<usize> = (0..=r).collect();
    perm.swap(r - 2, r - 1);
    let heads = layout::permute(ctx, &perm, &split)?;
    match tables {
        Some((cos, sin)) => rotary(ctx, &heads, cos, sin),
        None => Ok(heads),
    }
}

/// Attention's result `o[b, h, s, d]` as rows `[b, s, h·d]`: permuted, then reshaped.
pub(crate) fn merge_heads(ctx: &Ctx<'_>, o: &Tensor) -> Result<Tensor, ExecError> {
    let &[b, h, s, d] = o.shape() else {
        return Err(ctx.mismatch(format!("cannot merge the heads of {:?}", o.shape())));
    };
    let rows = layout::permute(ctx, &[0, 2, 1, 3], o)?;
    layout::reshape(ctx, &[size(b), size(s), size(h * d)], &rows)
}

/// A run-time size as a fixed [`Dim`].
fn size(n: usize) -> Dim {
    Dim::fixed(i64::try_from(n).unwrap_or(i64::MAX))
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis (biased variance).
pub(crate) fn layernorm(
    ctx: &Ctx<'_>,
    eps: f64,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor, ExecError> {
    let n = last_axis(ctx, x, &[weight, bias])?;
    let (v, w, b) = (floats(x), floats(weight), floats(bias));
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(n.max(1)) {
        let mean = row.iter().sum::<f64>() / n as f64;
        let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n as f64;
        let denom = (var + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w.iter().zip(&b))
                .map(|(a, (g, c))| (a - mean) / denom * g + c),
        );
    }
    ctx.tensor(x.shape().to_vec(), from_floats(x.dtype(), out.into_iter()))
}

/// The attributes of an attention node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttentionSpec {
    /// Multiplies `q·k`.
    pub scale: f64,
    /// Keys after the query's position are invisible.
    pub causal: bool,
    /// With `w > 0`, keys at or before `pos - w` are invisible.
    pub window: usize,
}

/// Scaled-dot-product attention of `q[b, hq, sq, d]`, `k[b, hkv, sk, d]`, `v[b, hkv, sk, dv]`
/// with an optional additive `mask` broadcastable to `[b, hq, sq, sk]`; result `[b, hq, sq, dv]`.
///
/// Query head `h` uses key/value head `h / (hq / hkv)`; query `i` sits at position
/// `sk - sq + i`; key `j` is visible unless `causal` and `j > pos`, or `window = w > 0` and
/// `j <= pos - w`. Scores `scale * q·k + mask` are softmaxed over the visible keys (NaN if all of
/// them are `-inf`, as softmax); a query with no visible key yields zeros.
pub(crate) fn attention(
    ctx: &Ctx<'_>,
    spec: AttentionSpec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor, ExecError> {
    let bad = || {
        ctx.mismatch(format!(
            "attention shapes disagree: q {:?}, k {:?}, v {:?}, mask {:?}",
            q.shape(),
            k.shape(),
            v.shape(),
            mask.map(Tensor::shape)
        ))
    };
    let ([b, hq, sq, d], [bk, hkv, sk, dk], [bv, hv, skv, dv]) = (
        <[usize; 4]>::try_from(q.shape()).map_err(|_| bad())?,
        <[usize; 4]>::try_from(k.shape()).map_err(|_| bad())?,
        <[usize; 4]>::try_from(v.shape()).map_err(|_| bad())?,
    );
    let dt = q.dtype();
    let dtypes_ok =
        dt.is_float() && k.dtype() == dt && v.dtype() == dt && mask.is_none_or(|m| m.dtype() == dt);
    let group = hq.checked_div(hkv);
    let groups_ok = match group {
        Some(_) => hq % hkv == 0,
        None => hq == 0,
    };
    if !dtypes_ok || !groups_ok || (bk, dk) != (b, d) || (bv, hv, skv) != (b, hkv, sk) {
        return Err(bad());
    }
    let scores_shape = [b, hq, sq, sk];
    let mask_view = match mask {
        Some(m) => Some(broadcast_strides(m.shape(), &scores_shape).ok_or_else(bad)?),
        None => None,
    };

    let (qv, kv, vv) = (floats(q), floats(k), floats(v));
    let mv = mask.map(floats);
    let mut out = Vec::with_capacity(b * hq * sq * dv);
    let window = i64::try_from(spec.window).unwrap_or(i64::MAX);
    let mut scores: Vec<(usize, f64)> = Vec::with_capacity(sk);
    for bi in 0..b {
        for h in 0..hq {
            let hk = h / group.unwrap_or(1);
            for i in 0..sq {
                let pos = sk as i64 - sq as i64 + i as i64;
                let visible = |j: usize| {
                    let j = j as i64;
                    (!spec.causal || j <= pos) && (window == 0 || j > pos.saturating_sub(window))
                };
                let q_row = &qv[((bi * hq + h) * sq + i) * d..][..d];
                scores.clear();
                for j in (0..sk).filter(|&j| visible(j)) {
                    let k_row = &kv[((bi * hkv + hk) * sk + j) * d..][..d];
                    let dot: f64 = q_row.iter().zip(k_row).map(|(a, c)| a * c).sum();
                    let add = match (&mv, &mask_view) {
                        (Some(m), Some(st)) => m[bi * st[0] + h * st[1] + i * st[2] + j * st[3]],
                        _ => 0.0,
                    };
                    scores.push((j, spec.scale * dot + add));
                }
                let mut acc = vec![0.0; dv];
                if !scores.is_empty() {
                    let row: Vec<f64> = scores.iter().map(|&(_, s)| s).collect();
                    for (&(j, _), p) in scores.iter().zip(softmax_row(&row, false)) {
                        let v_row = &vv[((bi * hkv + hk) * sk + j) * dv..][..dv];
                        for (a, x) in acc.iter_mut().zip(v_row) {
                            *a += p * x;
                        }
                    }
                }
                out.extend(acc);
            }
        }
    }
    ctx.tensor(vec![b, hq, sq, dv], from_floats(dt, out.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use kiln_ir::{DType, Op, F64};

    const NINF: f32 = f32::NEG_INFINITY;

    /// `linear` is its matmul, scale product and sum: hand-checked in f32, and bit for bit the
    /// chain of those primitive ops in bf16 (each step rounded to bf16), with a residual or a
    /// bias `[n]`.
    #[test]
    fn linear_is_its_primitive_ops() {
        let x = f32t(&[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.5, 0.25]);
        let w = f32t(&[2, 3], &[1.0, 0.0, 1.0, 2.0, -1.0, 0.0]);
        let s = f32t(&[2], &[0.5, 2.0]);
        let r = f32t(&[2, 2], &[10.0, 20.0, 30.0, 40.0]);
        let linear = |scaled, added| Op::Linear {
            transpose_b: true,
            scaled,
            added,
            heads: 0,
            rotary: false,
        };
        // x · wᵀ = [[4, 0], [-0.75, -2.5]], times s = [[2, 0], [-0.375, -5]], plus r.
        let y = eval_op(linear(true, true), &[&x, &w, &s, &r]);
        assert_close(&y, &[2, 2], &[12.0, 20.0, 29.625, 35.0], 0.0);
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let (mul, add) = (Op::Binary(BinaryOp::Mul), Op::Binary(BinaryOp::Add));
        let bf16 = |t: &Tensor| t.cast(DType::BF16);
        let x = bf16(&f32t(&[2, 3], &[1.1, 2.3, 3.7, -1.9, 0.55, 0.27]));
        let (w, s) = (bf16(&w), bf16(&f32t(&[2], &[0.3, 1.7])));
        for addend in [bf16(&r), bf16(&f32t(&[2], &[0.3, -0.7]))] {
            let got = eval_op(linear(true, true), &[&x, &w, &s, &addend]);
            let product = eval_op(mm.clone(), &[&x, &w]);
            let scaled = eval_op(mul.clone(), &[&product, &s]);
            let want = eval_op(add.clone(), &[&scaled, &addend]);
            assert_eq!(got.dtype(), DType::BF16);
            assert_eq!(got.to_f64_vec(), want.to_f64_vec());
            let got = eval_op(linear(false, true), &[&x, &w, &addend]);
            let want = eval_op(add.clone(), &[&product, &addend]);
            assert_eq!(got.to_f64_vec(), want.to_f64_vec());
        }
    }

    #[test]
    fn softmax_rows_and_columns() {
        let x = f32t(&[2, 3], &[1., 2., 3., 0., 0., NINF]);
        let y = eval_op(Op::Softmax { axis: 1 }, &[&x]);
        let e = |v: f64| v.exp();
        let z = e(1.) + e(2.) + e(3.);
        let want = [e(1.) / z, e(2.) / z, e(3.) / z, 0.5, 0.5, 0.0];
        assert_close(&y, &[2, 3], &want, 1e-7);
        let ly = eval_op(Op::LogSoftmax { axis: 1 }, &[&x]);
        let want: Vec<f64> = want.iter().map(|w| w.ln()).collect();
        assert_close(&ly, &[2, 3], &want, 1e-6);
        // Along axis 0: columns [1, 0], [2, 0], [3, -inf].
        let y = eval_op(Op::Softmax { axis: 0 }, &[x]);
        let s = |a: f64, b: f64| e(a) / (e(a) + e(b));
        let want = [s(1., 0.), s(2., 0.), 1.0, s(0., 1.), s(0., 2.), 0.0];
        assert_close(&y, &[2, 3], &want, 1e-7);
    }

    #[test]
    fn softmax_degenerate_rows() {
        // All -inf gives NaN (as PyTorch); huge values do not overflow; NaN poisons the row.
        let x = f32t(&[3, 2], &[NINF, NINF, 1e30, 1e30, f32::NAN, 1.0]);
        let y = eval_op(Op::Softmax { axis: 1 }, &[&x]);
        assert_close(
            &y,
            &[3, 2],
            &[f64::NAN, f64::NAN, 0.5, 0.5, f64::NAN, f64::NAN],
            0.0,
        );
        let ly = eval_op(Op::LogSoftmax { axis: 1 }, &[x]);
        let l2 = -(2f64.ln());
        assert_close(
            &ly,
            &[3, 2],
            &[f64::NAN, f64::NAN, l2, l2, f64::NAN, f64::NAN],
            1e-7,
        );
    }

    #[test]
    fn rmsnorm_and_layernorm() {
        // Row [3, 4]: mean square 12.5; row [0, 0] stays 0.
        let x = f32t(&[2, 2], &[3., 4., 0., 0.]);
        let w = f32t(&[2], &[1., 2.]);
        let y = eval_op(Op::RmsNorm { eps: F64(0.0) }, &[x.clone(), w.clone()]);
        let r = 12.5f64.sqrt();
        // With eps = 0 a zero row is 0 / 0.
        assert_close(&y, &[2, 2], &[3. / r, 8. / r, f64::NAN, f64::NAN], 1e-6);
        let y = eval_op(Op::RmsNorm { eps: F64(1.0) }, &[x.clone(), w.clone()]);
        let r = 13.5f64.sqrt();
        assert_close(&y, &[2, 2], &[3. / r, 8. / r, 0., 0.], 1e-6);
        // Row [3, 4]: mean 3.5, variance 0.25 -> normalized [-1, 1].
        let bias = f32t(&[2], &[0.5, -0.5]);
        let y = eval_op(
            Op::LayerNorm { eps: F64(0.0) },
            &[x.clone(), w.clone(), bias.clone()],
        );
        assert_close(&y, &[2, 2], &[-0.5, 1.5, f64::NAN, f64::NAN], 1e-7);
        let y = eval_op(Op::LayerNorm { eps: F64(0.75) }, &[x, w, bias]);
        assert_close(&y, &[2, 2], &[0.0, 0.5, 0.5, -0.5], 1e-7);
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Attention written out: for each (b, h, i), scores over all keys with the visibility and
    /// the mask applied as `-inf`/additive terms, an explicit softmax, then the weighted values.
    #[allow(clippy::too_many_arguments)]
    fn explicit_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
        causal: bool,
        window: usize,
    ) -> Vec<f64> {
        let [b, hq, sq, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
        let [_, hkv, sk, _] = <[usize; 4]>::try_from(k.shape()).unwrap();
        let dv = v.shape()[3];
        let (qv, kv, vv) = (q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec());
        let mv = mask.map(|m| m.to_f64_vec());
        let mut out = Vec::new();
        for bi in 0..b {
            for h in 0..hq {
                let hk = h * hkv / hq;
                for i in 0..sq {
                    let pos = (sk + i) as i64 - sq as i64;
                    let mut s = vec![f64::NEG_INFINITY; sk];
                    let mut any = false;
                    for (j, sj) in s.iter_mut().enumerate() {
                        let jj = j as i64;
                        if (causal && jj > pos) || (window > 0 && jj <= pos - window as i64) {
                            continue;
                        }
                        any = true;
                        let mut dot = 0.0;
                        for c in 0..d {
                            dot += qv[((bi * hq + h) * sq + i) * d + c]
                                * kv[((bi * hkv + hk) * sk + j) * d + c];
                        }
                        // Test masks are [sq, sk].
                        *sj = scale * dot + mv.as_ref().map_or(0.0, |m| m[i * sk + j]);
                    }
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dv {
                        let mut acc = 0.0;
                        if any {
                            for j in 0..sk {
                                acc += e[j] / z * vv[((bi * hkv + hk) * sk + j) * dv + c];
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    fn attn(scale: f64, causal: bool, window: usize) -> Op {
        Op::Attention {
            scale: F64(scale),
            causal,
            window,
            merge_heads: false,
        }
    }

    #[test]
    fn attention_gqa_with_mask_matches_explicit_softmax() {
        // b=2, hq=4, hkv=2, sq=sk=3, d=4, dv=5, additive mask [3, 3].
        let q = f32t(&[2, 4, 3, 4], &values(96, 1));
        let k = f32t(&[2, 2, 3, 4], &values(48, 2));
        let v = f32t(&[2, 2, 3, 5], &values(60, 3));
        let mask = f32t(&[3, 3], &[0., -1., 0.5, 0., 0., NINF, 2., 0., 0.]);
        let y = eval_op(
            attn(0.5, false, 0),
            &[q.clone(), k.clone(), v.clone(), mask.clone()],
        );
        let want = explicit_attention(&q, &k, &v, Some(&mask), 0.5, false, 0);
        assert_close(&y, &[2, 4, 3, 5], &want, 1e-6);
    }

    #[test]
    fn attention_causal_with_fewer_queries_than_keys() {
        // sq=2 queries at positions 3 and 4 of sk=5 keys (a KV cache of 3).
        let q = f32t(&[1, 2, 2, 3], &values(12, 4));
        let k = f32t(&[1, 1, 5, 3], &values(15, 5));
        let v = f32t(&[1, 1, 5, 2], &values(10, 6));
        let y = eval_op(attn(0.7, true, 0), &[q.clone(), k.clone(), v.clone()]);
        let want = explicit_attention(&q, &k, &v, None, 0.7, true, 0);
        assert_close(&y, &[1, 2, 2, 2], &want, 1e-6);
        // Query 0 (position 3) must ignore key 4: changing it changes only query 1.
        let mut k2 = k.to_f64_vec();
        k2[12..15].copy_from_slice(&[5.0, -5.0, 5.0]);
        let k2 = f32t(
            &[1, 1, 5, 3],
            &k2.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        );
        let y2 = eval_op(attn(0.7, true, 0), &[q, k2, v]);
        let (a, b) = (y.as_f32().unwrap(), y2.as_f32().unwrap());
        assert_eq!(&a[..2], &b[..2]);
        assert_eq!(&a[4..6], &b[4..6]);
        assert_ne!(&a[2..4], &b[2..4]);
    }

    #[test]
    fn attention_sliding_window() {
        let q = f32t(&[1, 1, 4, 2], &values(8, 7));
        let k = f32t(&[1, 1, 4, 2], &values(8, 8));
        let v = f32t(&[1, 1, 4, 3], &values(12, 9));
        let y = eval_op(attn(1.0, true, 2), &[q.clone(), k.clone(), v.clone()]);
        let want = explicit_attention(&q, &k, &v, None, 1.0, true, 2);
        assert_close(&y, &[1, 1, 4, 3], &want, 1e-6);
        // Window 1: each query sees only its own key, so the output is that key's value.
        let y = eval_op(attn(1.0, true, 1), &[q, k, v.clone()]);
        assert_close(&y, &[1, 1, 4, 3], &v.to_f64_vec(), 0.0);
    }

    #[test]
    fn attention_query_without_visible_keys_gives_zeros() {
        // sq=3 > sk=2: query 0 sits at position -1 and sees no key under the causal mask.
        let q = f32t(&[1, 1, 3, 2], &values(6, 10));
        let k = f32t(&[1, 1, 2, 2], &values(4, 11));
        let v = f32t(&[1, 1, 2, 2], &[1., 2., 3., 4.]);
        let y = eval_op(attn(1.0, true, 0), &[q.clone(), k.clone(), v.clone()]);
        let want = explicit_attention(&q, &k, &v, None, 1.0, true, 0);
        assert_eq!(&y.as_f32().unwrap()[..2], &[0.0, 0.0]);
        // Query 1 (position 0) sees key 0 only.
        assert_eq!(&y.as_f32().unwrap()[2..4], &[1.0, 2.0]);
        assert_close(&y, &[1, 1, 3, 2], &want, 1e-6);
    }

    #[test]
    fn attention_with_all_visible_keys_masked_is_nan_like_softmax() {
        // The additive mask does not change visibility: -inf on every visible key is a softmax
        // row of all -inf, which is NaN; only the causal/window rule produces zeros.
        let q = f32t(&[1, 1, 2, 1], &[1.0, 1.0]);
        let k = f32t(&[1, 1, 2, 1], &[1.0, 1.0]);
        let v = f32t(&[1, 1, 2, 1], &[3.0, 5.0]);
        let mask = f32t(&[2, 2], &[NINF, NINF, 0.0, NINF]);
        let y = eval_op(attn(1.0, false, 0), &[q, k, v, mask]);
        assert_close(&y, &[1, 1, 2, 1], &[f64::NAN, 3.0], 0.0);
    }

    #[test]
    fn attention_in_bf16_rounds_once() {
        let q = f32t(&[1, 1, 1, 2], &[1.0, 0.0]).cast(DType::BF16);
        let k = f32t(&[1, 1, 2, 2], &[1.0, 0.0, 0.0, 1.0]).cast(DType::BF16);
        let v = f32t(&[1, 1, 2, 1], &[1.0, 0.0]).cast(DType::BF16);
        let y = eval_op(attn(1.0, false, 0), &[q, k, v]);
        assert_eq!(y.dtype(), DType::BF16);
        // softmax([1, 0])[0] = 0.7310585786 -> bf16 0.73046875.
        assert_close(&y, &[1, 1, 1, 1], &[0.730_468_75], 0.0);
    }
}

//! `refine_logits`: an output projection's coarse logits refined by its residual weight where
//! they can decide the largest column, exactly as documented on [`kiln_ir::Op::RefineLogits`],
//! in f64 and rounded once. The residual is read for the candidate rows only.

use super::{floats, from_floats, Ctx, ExecError};
use crate::Tensor;

/// The candidate columns of one row: every `j` with `coarse[j] + e[j] ≥ max(coarse − e)`,
/// `e[j] = bound[j] · norm` (all of them when a value is NaN).
pub(crate) fn candidates(coarse: &[f64], bound: &[f64], norm: f64) -> Vec<usize> {
    let lo = coarse
        .iter()
        .zip(bound)
        .map(|(c, b)| c - b * norm)
        .fold(f64::NEG_INFINITY, f64::max);
    let nan = norm.is_nan() || coarse.iter().any(|c| c.is_nan());
    (0..coarse.len())
        .filter(|&j| nan || coarse[j] + bound[j] * norm >= lo)
        .collect()
}

/// `refine_logits(coarse, x, r, s, bound)`.
pub(crate) fn refine_logits(ctx: &Ctx<'_>, args: &[&Tensor]) -> Result<Tensor, ExecError> {
    let &[coarse, x, r, s, bound] = args else {
        return Err(ctx.mismatch(format!(
            "refine_logits takes 5 operands, got {}",
            args.len()
        )));
    };
    let (n, k) = match r.shape() {
        &[n, k] => (n, k),
        other => return Err(ctx.mismatch(format!("residual of shape {other:?}"))),
    };
    let rows = coarse.numel().checked_div(n).unwrap_or(0);
    if coarse.shape().last() != Some(&n)
        || x.shape().last() != Some(&k)
        || x.numel() != rows * k
        || s.numel() != n
        || bound.numel() != n
    {
        return Err(ctx.mismatch(format!(
            "refine_logits of {:?}, {:?}, {:?}, {:?}, {:?}",
            coarse.shape(),
            x.shape(),
            r.shape(),
            s.shape(),
            bound.shape()
        )));
    }
    let (mut out, xs, s, bound) = (floats(coarse), floats(x), floats(s), floats(bound));
    for (row, xr) in out.chunks_mut(n.max(1)).zip(xs.chunks(k.max(1))) {
        let norm = xr.iter().map(|v| v * v).sum::<f64>().sqrt();
        for j in candidates(row, &bound, norm) {
            let dot: f64 = (0..k).map(|i| xr[i] * r.get(j * k + i).as_f64()).sum();
            row[j] += s[j] * dot;
        }
    }
    let storage = from_floats(coarse.dtype(), out.into_iter());
    Tensor::new(coarse.shape().to_vec(), storage).map_err(|e| ctx.mismatch(e.to_string()))
}

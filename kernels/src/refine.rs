//! `refine_logits` (the IR's `Op::RefineLogits`): an fp8 LM head's coarse logits refined by
//! its e4m3 residual on the candidate columns, those whose refined value could be the row's
//! largest. Per row: `‖x‖₂`, one pass for `m = max_j (coarse_j − bound_j · ‖x‖₂)`, one for
//! the candidates (`coarse_j + bound_j · ‖x‖₂ ≥ m`), then each candidate's residual row times
//! `bf16(x)` by the fp8 GEMV's widening ([`crate::gemv`]), scaled and added. The pass bounds
//! are computed in f32, the reference executor's in f64: a column within an f32 rounding of the
//! threshold may be a candidate in one and not the other.

use crate::gemv::dot_rows_f8e4m3;
use crate::scratch::Scratch;
use crate::simd::round_bf16;
use crate::{Isa, KernelError};

/// The candidates of one row into `into`: every column `j` with `coarse[j] + bound[j] · norm ≥
/// max_i (coarse[i] − bound[i] · norm)`, all of them when a value is NaN.
fn candidates(coarse: &[f32], bound: &[f32], norm: f32, into: &mut Vec<u32>) {
    into.clear();
    let lo = coarse
        .iter()
        .zip(bound)
        .map(|(c, b)| c - b * norm)
        .fold(f32::NEG_INFINITY, f32::max);
    let nan = norm.is_nan() || coarse.iter().any(|c| c.is_nan());
    into.extend(
        (0..coarse.len() as u32)
            .filter(|&j| nan || coarse[j as usize] + bound[j as usize] * norm >= lo),
    );
}

/// `out = refine_logits(coarse, x, r, s, bound)` for `rows` rows: `coarse`/`out` `rows × n`,
/// `x` `rows × k` (read as bf16, as the fp8 head's product reads it), `r` the `n × k` e4m3
/// residual bytes, `s` and `bound` `n` each.
#[allow(clippy::too_many_arguments)]
pub fn refine_logits(
    rows: usize,
    n: usize,
    k: usize,
    coarse: &[f32],
    x: &[f32],
    r: &[u8],
    s: &[f32],
    bound: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let sizes = [rows.checked_mul(n), rows.checked_mul(k), n.checked_mul(k)];
    let lens = [coarse.len(), x.len(), r.len()];
    if sizes.iter().zip(lens).any(|(want, got)| *want != Some(got))
        || out.len() != coarse.len()
        || s.len() != n
        || bound.len() != n
    {
        return Err(KernelError::Layout(format!(
            "refine_logits {rows}x{n}x{k}: coarse {}, x {}, residual {}, scale {}, bound {}, \
             out {}",
            coarse.len(),
            x.len(),
            r.len(),
            s.len(),
            bound.len(),
            out.len()
        )));
    }
    out.copy_from_slice(coarse);
    if n == 0 || k == 0 {
        return Ok(());
    }
    let mut picked = Scratch::<u32>::empty();
    let mut dots = Scratch::<f32>::empty();
    for (row, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
        let norm = xr
            .iter()
            .map(|&v| round_bf16(v).powi(2))
            .sum::<f32>()
            .sqrt();
        candidates(row, bound, norm, picked.as_vec());
        let dots = dots.as_vec();
        dots.clear();
        dots.resize(picked.len(), 0.0);
        dot_rows_f8e4m3(Isa::best(), k, r, xr, &picked, dots);
        for (&j, d) in picked.iter().zip(dots.iter()) {
            row[j as usize] += s[j as usize] * d;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::f8::f8e4m3_to_f32;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn bf16_f64(v: f32) -> f64 {
        f64::from(half::bf16::from_f32(v).to_f32())
    }

    /// The op by its definition, in f64, with x rounded to bf16.
    fn reference(
        n: usize,
        k: usize,
        c: &[f32],
        x: &[f32],
        r: &[u8],
        s: &[f32],
        b: &[f32],
    ) -> Vec<f64> {
        let mut out: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        for (row, xr) in out.chunks_mut(n).zip(x.chunks(k)) {
            let xb: Vec<f64> = xr.iter().map(|&v| bf16_f64(v)).collect();
            let norm = xr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            let lo = (0..n)
                .map(|j| row[j] - f64::from(b[j]) * norm)
                .fold(f64::NEG_INFINITY, f64::max);
            for j in 0..n {
                if row[j] + f64::from(b[j]) * norm >= lo {
                    let dot: f64 = (0..k)
                        .map(|i| xb[i] * f64::from(f8e4m3_to_f32(r[j * k + i])))
                        .sum();
                    row[j] += f64::from(s[j]) * dot;
                }
            }
        }
        out
    }

    #[test]
    fn refines_the_candidates_as_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 7, 33),
            (3, 33, 7),
            (2, 4097, 64),
            (1, 1000, 768),
        ] {
            let c: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // x as the fp8 head reads it: bf16 values (the graph rounds it first).
            let x: Vec<f32> = (0..rows * k)
                .map(|_| bf16_f64(rng.random_range(-1.0..1.0)) as f32)
                .collect();
            // Finite e4m3 bytes (0x7f / 0xff are NaN).
            let r: Vec<u8> = (0..n * k)
                .map(|_| rng.random_range(0..0x7f) | (rng.random::<u8>() & 0x80))
                .collect();
            let s: Vec<f32> = (0..n).map(|_| rng.random_range(1e-4..1e-3)).collect();
            let b: Vec<f32> = (0..n)
                .map(|j| {
                    let sq: f64 = (0..k)
                        .map(|i| f64::from(f8e4m3_to_f32(r[j * k + i])).powi(2))
                        .sum();
                    (sq.sqrt() * f64::from(s[j])) as f32 * 1.000_001
                })
                .collect();
            let mut out = vec![f32::NAN; rows * n];
            refine_logits(rows, n, k, &c, &x, &r, &s, &b, &mut out).unwrap();
            let want = reference(n, k, &c, &x, &r, &s, &b);
            let refined = out.iter().zip(&c).filter(|(o, c)| o != c).count();
            assert!(refined >= rows.min(n), "{rows}x{n}x{k}: {refined} refined");
            for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*o) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{rows}x{n}x{k} [{i}]: {o} vs {w}"
                );
            }
            // The largest refined value is the largest of the fully refined product.
            for ((row, cr), xr) in out.chunks(n).zip(c.chunks(n)).zip(x.chunks(k)) {
                let full: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..k)
                            .map(|i| bf16_f64(xr[i]) * f64::from(f8e4m3_to_f32(r[j * k + i])))
                            .sum();
                        f64::from(cr[j]) + f64::from(s[j]) * dot
                    })
                    .collect();
                let top = |v: &[f64]| (0..n).fold(0, |m, j| if v[j] > v[m] { j } else { m });
                let got: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
                assert_eq!(top(&got), top(&full), "{rows}x{n}x{k}");
            }
        }
    }

    #[test]
    fn refuses_mismatched_operands() {
        let mut out = vec![0.0; 4];
        let err = refine_logits(
            1, 4, 2, &[0.0; 4], &[0.0; 2], &[0; 7], &[1.0; 4], &[0.0; 4], &mut out,
        );
        assert!(err.is_err());
    }
}

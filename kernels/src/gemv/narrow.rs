//! Narrow-float weights read where they are stored, for products whose activations stay f32:
//! `y = widen(W) · x` with `W` bf16, f16 or fp8 (e4m3, e5m2) and `x` f32 **not** rounded — the
//! IR's `matmul(x, cast(w, f32))`, as a mixture-of-experts block computes under bf16 and fp8
//! precision. Every narrow value is exact in f32, so the result is [`super::gemv_f32`] of the
//! widened matrix up to the order of the f32 additions, without writing that matrix anywhere:
//! each block of four rows is widened into a small buffer (in L1) and multiplied by the f32
//! row kernel — by every row of x, for a few rows ([`gemv_narrow_batch`]), so the weights are
//! read from memory once.

use super::{check, f32_rows, split_rows};
use crate::simd::Isa;
use crate::KernelError;
use half::{bf16, f16};
use std::sync::OnceLock;

/// Rows widened at a time (the f32 row kernel reads four side by side).
const ROWS: usize = 4;

/// A row-major matrix of narrow floats.
#[derive(Debug, Clone, Copy)]
pub enum Narrow<'a> {
    /// f32 elements (read as they are; so that one call serves every dtype).
    F32(&'a [f32]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
    /// fp8 e4m3 bit patterns.
    F8E4M3(&'a [u8]),
    /// fp8 e5m2 bit patterns.
    F8E5M2(&'a [u8]),
}

impl Narrow<'_> {
    fn len(&self) -> usize {
        match self {
            Narrow::F32(w) => w.len(),
            Narrow::Bf16(w) => w.len(),
            Narrow::F16(w) => w.len(),
            Narrow::F8E4M3(w) | Narrow::F8E5M2(w) => w.len(),
        }
    }

    /// Elements `range` widened into `out` (as long as the range).
    fn widen(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        match self {
            Narrow::F32(w) => out.copy_from_slice(&w[range]),
            Narrow::Bf16(w) => {
                for (o, v) in out.iter_mut().zip(&w[range]) {
                    *o = f32::from_bits(u32::from(v.to_bits()) << 16);
                }
            }
            Narrow::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[range]) {
                    *o = v.to_f32();
                }
            }
            Narrow::F8E4M3(w) => lookup(super::f8::table(), &w[range], out),
            Narrow::F8E5M2(w) => lookup(e5m2_table(), &w[range], out),
        }
    }
}

fn lookup(table: &[f32; 256], bytes: &[u8], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = table[usize::from(b)];
    }
}

fn e5m2_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|b| kiln_ir::f8::f8e5m2_to_f32(b as u8)))
}

/// `y[r] = widen(W) · x[r]` for the `m` rows of `x` (`m × k`) into `y` (`m × n`), both
/// row-major, at the best [`Isa`]: each block of four weight rows is read from memory and
/// widened once for all the rows of x.
pub fn gemv_narrow_batch(
    m: usize,
    n: usize,
    k: usize,
    w: Narrow<'_>,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    gemv_narrow_batch_with(Isa::best(), m, n, k, w, x, y)
}

/// As [`gemv_narrow_batch`] at instruction-set level `isa`.
pub fn gemv_narrow_batch_with(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    w: Narrow<'_>,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    if m.checked_mul(k) != Some(x.len()) || m.checked_mul(n) != Some(y.len()) {
        return Err(KernelError::Layout(format!(
            "gemv_narrow {m}x{n}x{k}: x has {} elements, y {}",
            x.len(),
            y.len()
        )));
    }
    check(n, k, w.len(), k, n)?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    let level = crate::simd::vector_level(isa);
    // Row i of W times row r of x lands at yt[i·m + r] (each block's outputs contiguous).
    let mut yt = if m == 1 { Vec::new() } else { vec![0.0; n * m] };
    let out: &mut [f32] = if m == 1 { y } else { &mut yt };
    split_rows(n, k, m, out, |r0, yb| {
        let mut buf = vec![0.0f32; ROWS * k];
        let mut dots = [0.0f32; ROWS];
        for (q, yq) in yb.chunks_mut(ROWS * m).enumerate() {
            let (first, count) = (r0 + q * ROWS, yq.len() / m);
            let wide = &mut buf[..count * k];
            w.widen(first * k..(first + count) * k, wide);
            for (r, xr) in x.chunks_exact(k).enumerate() {
                f32_rows(level, wide, k, xr, &mut dots[..count]);
                for (j, &d) in dots[..count].iter().enumerate() {
                    yq[j * m + r] = d;
                }
            }
        }
    });
    if m > 1 {
        for (i, row) in yt.chunks_exact(m).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                y[r * n + i] = v;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemv::gemv_f32;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Against widening first and the f32 GEMV, for every narrow dtype, at odd sizes, with
    /// every byte pattern of the fp8 formats present (NaN and infinities included).
    #[test]
    fn matches_widening_then_the_f32_gemv() {
        for (n, k) in [(1usize, 1usize), (7, 33), (33, 7), (5, 4097), (64, 256)] {
            let base = data(n * k, 7);
            let x = data(k, 3);
            let bytes: Vec<u8> = (0..n * k).map(|i| (i * 97 % 256) as u8).collect();
            let b16: Vec<bf16> = base.iter().map(|&v| bf16::from_f32(v * 3.0)).collect();
            let h16: Vec<f16> = base.iter().map(|&v| f16::from_f32(v * 3.0)).collect();
            let cases: [(&str, Narrow<'_>, Vec<f32>); 5] = [
                ("f32", Narrow::F32(&base), base.clone()),
                (
                    "bf16",
                    Narrow::Bf16(&b16),
                    b16.iter().map(|v| v.to_f32()).collect(),
                ),
                (
                    "f16",
                    Narrow::F16(&h16),
                    h16.iter().map(|v| v.to_f32()).collect(),
                ),
                (
                    "e4m3",
                    Narrow::F8E4M3(&bytes),
                    bytes
                        .iter()
                        .map(|&b| kiln_ir::f8::f8e4m3_to_f32(b))
                        .collect(),
                ),
                (
                    "e5m2",
                    Narrow::F8E5M2(&bytes),
                    bytes
                        .iter()
                        .map(|&b| kiln_ir::f8::f8e5m2_to_f32(b))
                        .collect(),
                ),
            ];
            for (name, w, wide) in cases {
                for (isa, m) in Isa::ALL
                    .into_iter()
                    .filter(|i| i.available())
                    .flat_map(|i| [(i, 1), (i, 3)])
                {
                    let xs: Vec<f32> = (0..m)
                        .flat_map(|r| x.iter().map(move |v| v * (r + 1) as f32))
                        .collect();
                    let (mut got, mut want) = (vec![0.0; m * n], vec![0.0; m * n]);
                    gemv_narrow_batch_with(isa, m, n, k, w, &xs, &mut got).unwrap();
                    for (xr, yr) in xs.chunks_exact(k).zip(want.chunks_exact_mut(n)) {
                        gemv_f32(n, k, &wide, xr, yr).unwrap();
                    }
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        let same = (a.is_nan() && b.is_nan())
                            || a == b
                            || (a - b).abs() <= 1e-4 * b.abs().max(1.0);
                        assert!(same, "{name} {m}x{n}x{k} {isa:?} output {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let w = vec![bf16::ONE; 6];
        let mut y = vec![0.0; 2];
        assert!(gemv_narrow_batch(1, 2, 3, Narrow::Bf16(&w), &[0.0; 4], &mut y).is_err());
        assert!(gemv_narrow_batch(1, 3, 3, Narrow::Bf16(&w), &[0.0; 3], &mut y).is_err());
        let mut y4 = vec![0.0; 4];
        assert!(gemv_narrow_batch(2, 2, 3, Narrow::Bf16(&w), &[0.0; 5], &mut y4).is_err());
        assert!(gemv_narrow_batch(0, 2, 3, Narrow::Bf16(&w), &[], &mut []).is_ok());
        assert!(gemv_narrow_batch(1, 2, 3, Narrow::Bf16(&w), &[0.0; 3], &mut []).is_err());
    }
}

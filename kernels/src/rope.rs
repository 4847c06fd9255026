//! Rotary position embedding in the rotate-half form the Hugging Face Llama family traces:
//! `out = x · cos + rotate_half(x) · sin` with `rotate_half(x) = concat(-x[.., h..], x[.., ..h])`
//! over the last axis (`h` = half its size), i.e. per row
//! `out[j] = x[j]·cos[j] − x[j+h]·sin[j]` for `j < h` and `out[j] = x[j]·cos[j] + x[j−h]·sin[j]`
//! for `j ≥ h`. One pass, where the traced graph takes a slice pair, a negation, a concat and
//! a fused multiply-add. Operands are strided (0 = broadcast, e.g. `cos` shared by the heads);
//! the result is dense, optionally rounded to bf16 (to nearest even) and stored widened, for a
//! bf16 graph's attention operand. [`rotate_half_in_place`] is the per-head arithmetic, shared
//! with the linear layers' RoPE epilogue ([`crate::linear`]).

use crate::simd::round_bf16;
use crate::KernelError;
use rayon::prelude::*;

/// Rows (of the last axis) below which the kernel runs on the calling thread only.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `out = x · cos + rotate_half(x) · sin` over `shape` (last axis even); each operand is
/// `(elements from its first one, element strides per axis)`, `out` dense; with `to_bf16`
/// each result is rounded to bf16.
pub fn rope_rotate_half(
    shape: &[usize],
    x: (&[f32], &[usize]),
    cos: (&[f32], &[usize]),
    sin: (&[f32], &[usize]),
    to_bf16: bool,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let err = |what: String| Err(KernelError::Layout(format!("rope {shape:?}: {what}")));
    let Some((&d, outer)) = shape.split_last() else {
        return err("rank 0".into());
    };
    if d % 2 == 1 {
        return err("odd last axis".into());
    }
    let total: usize = shape.iter().product();
    if out.len() != total {
        return err(format!("out has {} elements", out.len()));
    }
    if total == 0 {
        return Ok(());
    }
    for (what, (data, st)) in [("x", x), ("cos", cos), ("sin", sin)] {
        let reach = (st.len() == shape.len())
            .then(|| {
                shape
                    .iter()
                    .zip(st)
                    .try_fold(0usize, |a, (&n, &s)| a.checked_add((n - 1).checked_mul(s)?))
            })
            .flatten();
        if reach.is_none_or(|r| r >= data.len()) {
            return err(format!("{what} of {} elements, strides {st:?}", data.len()));
        }
    }
    // Element offset of row `r` (row-major over the outer axes) in an operand.
    let offset = |st: &[usize], mut r: usize| {
        let mut o = 0;
        for (&n, &s) in outer.iter().zip(st).rev() {
            o += r % n * s;
            r /= n;
        }
        o
    };
    let h = d / 2;
    let row = |(r, y): (usize, &mut [f32])| {
        let (xo, co, so) = (offset(x.1, r), offset(cos.1, r), offset(sin.1, r));
        let (xs, cs, ss) = (x.1[outer.len()], cos.1[outer.len()], sin.1[outer.len()]);
        if xs == 1 && cs == 1 && ss == 1 {
            y.copy_from_slice(&x.0[xo..xo + d]);
            rotate_half_in_place(y, &cos.0[co..co + d], &sin.0[so..so + d]);
        } else {
            let at = |(data, o, st): (&[f32], usize, usize), j: usize| data[o + j * st];
            let (xv, cv, sv) = ((x.0, xo, xs), (cos.0, co, cs), (sin.0, so, ss));
            for (j, v) in y.iter_mut().enumerate() {
                let rot = if j < h { -at(xv, j + h) } else { at(xv, j - h) };
                *v = at(xv, j) * at(cv, j) + rot * at(sv, j);
            }
        }
        if to_bf16 {
            for v in y.iter_mut() {
                *v = round_bf16(*v);
            }
        }
    };
    if crate::threads() > 1 && total >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(d).enumerate().for_each(row);
    } else {
        out.chunks_mut(d).enumerate().for_each(row);
    }
    Ok(())
}

/// One row (one head, `d = x.len()` even) rotated in place: `x = x · cos + rotate_half(x) · sin`
/// (`cos` and `sin` of length `d`), the arithmetic of [`rope_rotate_half`].
#[inline]
pub fn rotate_half_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    let (lo, hi) = x.split_at_mut(h);
    let (c_lo, c_hi) = cos.split_at(h);
    let (s_lo, s_hi) = sin.split_at(h);
    for j in 0..h {
        let (a, b) = (lo[j], hi[j]);
        lo[j] = a * c_lo[j] - b * s_lo[j];
        hi[j] = b * c_hi[j] + a * s_hi[j];
    }
}

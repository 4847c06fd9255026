//! Strided copies, the data movement behind permute, slice, expand and concat.
//!
//! [`copy_strided`] checks the extreme index of both operands up front, drops size-1 axes and
//! merges axes that are contiguous in both, then copies: contiguous innermost runs with
//! `copy_from_slice`, transposes of the last two axes in cache-sized tiles, anything else
//! element by element along the innermost axis. Large copies are split over [`crate::threads`]
//! threads along the destination's outermost axis when its rows are disjoint slices of `dst`.
//! [`copy_strided_convert`] converts each element on the way ([`Convert`]: f32 to bf16 and
//! back, for a KV cache kept narrow).

use crate::KernelError;
use half::bf16;
use rayon::prelude::*;

/// Copies with fewer elements than this run on the calling thread only.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Side of the square tiles of a blocked transpose.
const TILE: usize = 32;

/// An element conversion a copy applies: the identity, f32 to bf16 (to nearest, ties to even,
/// as a cast) and bf16 to f32 (exact).
pub trait Convert<D>: Copy + Send + Sync {
    /// The element as a `D`.
    fn convert(self) -> D;
}

impl<T: Copy + Send + Sync> Convert<T> for T {
    #[inline(always)]
    fn convert(self) -> T {
        self
    }
}

impl Convert<bf16> for f32 {
    #[inline(always)]
    fn convert(self) -> bf16 {
        bf16::from_f32(self)
    }
}

impl Convert<f32> for bf16 {
    #[inline(always)]
    fn convert(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// Copies `shape` elements from `src` (starting at `src_offset`, element strides `src_strides`,
/// 0 = broadcast) to `dst` (starting at `dst_offset`, strides `dst_strides`). Generic over
/// plain-old-data element types.
pub fn copy_strided<T: Copy + Send + Sync>(
    shape: &[usize],
    src: &[T],
    src_offset: usize,
    src_strides: &[usize],
    dst: &mut [T],
    dst_offset: usize,
    dst_strides: &[usize],
) -> Result<(), KernelError> {
    copy_strided_convert(
        shape,
        src,
        src_offset,
        src_strides,
        dst,
        dst_offset,
        dst_strides,
    )
}

/// [`copy_strided`], converting each element from `S` to `D`.
pub fn copy_strided_convert<S: Convert<D>, D: Copy + Send + Sync>(
    shape: &[usize],
    src: &[S],
    src_offset: usize,
    src_strides: &[usize],
    dst: &mut [D],
    dst_offset: usize,
    dst_strides: &[usize],
) -> Result<(), KernelError> {
    if src_strides.len() != shape.len() || dst_strides.len() != shape.len() {
        return Err(KernelError::Layout(format!(
            "copy_strided: shape {shape:?} with src strides {src_strides:?}, dst strides \
             {dst_strides:?}"
        )));
    }
    if shape.contains(&0) {
        return Ok(());
    }
    let reach = |what: &str, len: usize, off: usize, st: &[usize]| {
        let last = shape
            .iter()
            .zip(st)
            .try_fold(off, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
        match last {
            Some(l) if l < len => Ok(()),
            _ => Err(KernelError::Layout(format!(
                "copy_strided: {what} of {len} elements does not hold shape {shape:?} at \
                 offset {off}, strides {st:?}"
            ))),
        }
    };
    reach("src", src.len(), src_offset, src_strides)?;
    reach("dst", dst.len(), dst_offset, dst_strides)?;
    let axes = merge_axes(shape, src_strides, dst_strides);
    let total: usize = shape.iter().product();
    let dst = &mut dst[dst_offset..];
    let src = &src[src_offset..];
    if let [(n0, s0, d0), rest @ ..] = axes.as_slice() {
        // The destination rows along the outermost axis are disjoint slices when each is
        // shorter than the stride between them; tasks take `per` consecutive rows.
        let row_reach = rest.iter().map(|&(n, _, d)| (n - 1) * d).sum::<usize>();
        if crate::threads() > 1 && total >= PARALLEL_MIN_ELEMS && *n0 > 1 && *d0 > row_reach {
            let per = n0.div_ceil(crate::threads() * 8);
            dst.par_chunks_mut(per * d0)
                .take(n0.div_ceil(per))
                .enumerate()
                .for_each_init(
                    || axes.clone(),
                    |ax, (t, drow)| {
                        ax[0].0 = per.min(n0 - t * per);
                        copy_axes(ax, &src[t * per * s0..], drow)
                    },
                );
            return Ok(());
        }
    }
    copy_axes(&axes, src, dst);
    Ok(())
}

/// [`merge_axes`]'s result: inline up to 8 axes (no allocation per copy).
type Axes = smallvec::SmallVec<[(usize, usize, usize); 8]>;

/// `(size, src stride, dst stride)` per axis without size-1 axes, adjacent axes merged where
/// both operands step over the outer one as over the whole inner one; at least one axis.
fn merge_axes(shape: &[usize], ss: &[usize], ds: &[usize]) -> Axes {
    let mut axes = Axes::new();
    for ((&n, &s), &d) in shape.iter().zip(ss).zip(ds) {
        if n == 1 {
            continue;
        }
        match axes.last_mut() {
            Some(last) if Some(last.1) == s.checked_mul(n) && Some(last.2) == d.checked_mul(n) => {
                *last = (last.0 * n, s, d);
            }
            _ => axes.push((n, s, d)),
        }
    }
    if axes.is_empty() {
        axes.push((1, 0, 0));
    }
    axes
}

/// Copies the (already bounds-checked) index space `axes` from `src` to `dst`, both starting
/// at element 0.
fn copy_axes<S: Convert<D>, D: Copy>(axes: &[(usize, usize, usize)], src: &[S], dst: &mut [D]) {
    let rank = axes.len();
    // The innermost one or two axes are handled by a kernel; the rest by an odometer.
    let transpose = rank >= 2 && axes[rank - 1].1 != 1 && axes[rank - 2].1 == 1;
    let inner = if transpose { 2 } else { 1 };
    let outer = &axes[..rank - inner];
    let mut idx: smallvec::SmallVec<[usize; 8]> = smallvec::smallvec![0; outer.len()];
    let (mut so, mut dof) = (0usize, 0usize);
    loop {
        if transpose {
            copy_tiled(axes[rank - 2], axes[rank - 1], &src[so..], &mut dst[dof..]);
        } else {
            copy_run(axes[rank - 1], &src[so..], &mut dst[dof..]);
        }
        // Next outer index.
        let mut ax = outer.len();
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            let (n, s, d) = outer[ax];
            idx[ax] += 1;
            so += s;
            dof += d;
            if idx[ax] < n {
                break;
            }
            so -= n * s;
            dof -= n * d;
            idx[ax] = 0;
        }
    }
}

/// One run of `n` elements at strides `s` (src) and `d` (dst).
#[inline]
fn copy_run<S: Convert<D>, D: Copy>((n, s, d): (usize, usize, usize), src: &[S], dst: &mut [D]) {
    match (s, d) {
        (1, 1) => {
            for (y, &x) in dst[..n].iter_mut().zip(&src[..n]) {
                *y = x.convert();
            }
        }
        (0, 1) => dst[..n].fill(src[0].convert()),
        _ => {
            for i in 0..n {
                dst[i * d] = src[i * s].convert();
            }
        }
    }
}

/// A 2-D block whose source is contiguous along the outer axis (a transpose), in
/// `TILE × TILE` tiles so reads and writes both stay in cache.
fn copy_tiled<S: Convert<D>, D: Copy>(
    (n1, s1, d1): (usize, usize, usize),
    (n2, s2, d2): (usize, usize, usize),
    src: &[S],
    dst: &mut [D],
) {
    for i0 in (0..n1).step_by(TILE) {
        for j0 in (0..n2).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n1) {
                for j in j0..(j0 + TILE).min(n2) {
                    dst[i * d1 + j * d2] = src[i * s1 + j * s2].convert();
                }
            }
        }
    }
}

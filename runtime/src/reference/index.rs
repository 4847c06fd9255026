//! Row-major index arithmetic shared by the op modules: strides, numpy broadcasting of concrete
//! shapes, an odometer over strided views (strides are computed once per op, then each step is
//! an addition), and bit-exact element picking from storages.

use crate::Storage;

/// Row-major strides of `shape` (in elements).
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `(outer, size, inner)`: the products of the axes before `axis`, the axis, and after it.
pub(crate) fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Numpy broadcasting of two concrete shapes (right-aligned; a size-1 axis stretches).
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = (i + a.len()).checked_sub(rank).map_or(1, |j| a[j]);
            let db = (i + b.len()).checked_sub(rank).map_or(1, |j| b[j]);
            match (da, db) {
                _ if da == db => Some(da),
                (1, _) => Some(db),
                (_, 1) => Some(da),
                _ => None,
            }
        })
        .collect()
}

/// Strides that read a row-major tensor of `shape` as if broadcast to `out` (numpy rules):
/// stride 0 on stretched and added leading axes. `None` if `shape` does not broadcast to `out`.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    if shape.len() > out.len() {
        return None;
    }
    let own = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| match i.checked_sub(lead) {
            None => Some(0),
            Some(j) if shape[j] == out[i] => Some(own[j]),
            Some(j) if shape[j] == 1 => Some(0),
            Some(_) => None,
        })
        .collect()
}

/// The flat source positions of a strided view, in row-major order of the view's `shape`:
/// position `offset + Σ index[i] * strides[i]`.
#[derive(Debug, Clone)]
pub(crate) struct Strided {
    shape: Vec<usize>,
    strides: Vec<usize>,
    counter: Vec<usize>,
    pos: usize,
    remaining: usize,
}

impl Strided {
    /// A view of `shape` with the given per-axis `strides`, starting at `offset`.
    pub(crate) fn new(shape: &[usize], strides: &[usize], offset: usize) -> Strided {
        debug_assert_eq!(shape.len(), strides.len());
        Strided {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            counter: vec![0; shape.len()],
            pos: offset,
            remaining: shape.iter().product(),
        }
    }
}

impl Iterator for Strided {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let current = self.pos;
        if self.remaining > 0 {
            // Advance the odometer: bump the last axis, carrying into earlier ones.
            for ax in (0..self.shape.len()).rev() {
                self.counter[ax] += 1;
                self.pos += self.strides[ax];
                if self.counter[ax] < self.shape[ax] {
                    break;
                }
                self.pos -= self.strides[ax] * self.shape[ax];
                self.counter[ax] = 0;
            }
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Strided {}

/// The elements of `src` at the positions `idx`, in that order, bit for bit.
///
/// The caller guarantees every position is in range (they come from checked shapes).
pub(crate) fn take(src: &Storage, idx: impl Iterator<Item = usize>) -> Storage {
    macro_rules! arms {
        ($($v:ident),*) => {
            match src {
                $(Storage::$v(s) => Storage::$v(idx.map(|i| s[i]).collect()),)*
            }
        };
    }
    arms!(F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, U8, Bool)
}

/// Elements picked from several storages of one dtype, bit for bit: `(part, position)` pairs.
/// `None` if the parts' dtypes differ (cannot happen for operands of a verified graph).
pub(crate) fn pick(
    parts: &[&Storage],
    picks: impl Iterator<Item = (usize, usize)>,
) -> Option<Storage> {
    macro_rules! arms {
        ($($v:ident),*) => {
            match parts.first()? {
                $(Storage::$v(_) => {
                    let vecs = parts
                        .iter()
                        .map(|p| match p {
                            Storage::$v(s) => Some(s),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Storage::$v(picks.map(|(p, i)| vecs[p][i]).collect())
                })*
            }
        };
    }
    Some(arms!(F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, U8, Bool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_strides_and_split() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
        assert_eq!(split_axis(&[2, 3, 4], 1), (2, 3, 4));
        assert_eq!(split_axis(&[5], 0), (1, 5, 1));
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast_shape(&[3, 1], &[4]), Some(vec![3, 4]));
        assert_eq!(broadcast_shape(&[], &[2, 3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[0], &[1]), Some(vec![0]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), Some(vec![0, 1, 0]));
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), Some(vec![3, 1]));
        assert_eq!(broadcast_strides(&[2], &[3]), None);
        assert_eq!(broadcast_strides(&[1, 2], &[2]), None);
    }

    #[test]
    fn strided_walks_views() {
        // Transpose of a 2x3 matrix: shape [3, 2], strides [1, 3].
        let v: Vec<usize> = Strided::new(&[3, 2], &[1, 3], 0).collect();
        assert_eq!(v, vec![0, 3, 1, 4, 2, 5]);
        // Broadcast of a column [2, 1] to [2, 3].
        let v: Vec<usize> = Strided::new(&[2, 3], &[1, 0], 0).collect();
        assert_eq!(v, vec![0, 0, 0, 1, 1, 1]);
        // Offset view (a slice) and the empty / scalar views.
        let v: Vec<usize> = Strided::new(&[2, 2], &[4, 1], 1).collect();
        assert_eq!(v, vec![1, 2, 5, 6]);
        assert_eq!(Strided::new(&[2, 0, 3], &[0, 3, 1], 0).count(), 0);
        assert_eq!(Strided::new(&[], &[], 7).collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn take_and_pick_copy_bits() {
        let s = Storage::F32(vec![1.0, -0.0, f32::NAN]);
        let Storage::F32(t) = take(&s, [2, 1, 1].into_iter()) else {
            panic!("dtype changed")
        };
        assert!(t[0].is_nan() && t[1].to_bits() == (-0.0f32).to_bits());
        let a = Storage::I64(vec![1, 2]);
        let b = Storage::I64(vec![10, 20]);
        let p = pick(&[&a, &b], [(1, 0), (0, 1)].into_iter());
        assert_eq!(p, Some(Storage::I64(vec![10, 2])));
        let c = Storage::Bool(vec![true]);
        assert_eq!(pick(&[&a, &c], [(0, 0)].into_iter()), None);
    }
}

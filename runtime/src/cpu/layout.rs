//! Strided layouts of values in the CPU backend's buffers: a shape, one element stride per axis
//! (0 = broadcast) and an offset, so permutes, slices and expands are views with no copy.
//! Shapes and strides are inline arrays of at most [`MAX_RANK`] axes ([`Dims`]), so a layout is
//! `Copy` and making or reading one never allocates (the run loop makes several per node);
//! [`super::CpuGraph::compile`] refuses a graph with a value of higher rank.

use std::ops::{Deref, DerefMut};

/// The most axes a value of the CPU backend may have.
pub const MAX_RANK: usize = 8;

/// Up to [`MAX_RANK`] sizes or strides, inline.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Dims {
    len: u8,
    d: [usize; MAX_RANK],
}

impl Dims {
    /// `s`'s elements, or `None` past [`MAX_RANK`].
    pub fn try_from_slice(s: &[usize]) -> Option<Dims> {
        let mut d = [0; MAX_RANK];
        d.get_mut(..s.len())?.copy_from_slice(s);
        Some(Dims {
            len: s.len() as u8,
            d,
        })
    }

    /// `s`'s elements; `s` is a shape of a value of a compiled graph, whose rank
    /// [`super::CpuGraph::compile`] checked.
    pub fn of(s: &[usize]) -> Dims {
        Dims::try_from_slice(s).expect("internal: ranks are checked when a graph is compiled")
    }

    /// `len` zeros (`len` ≤ [`MAX_RANK`], as [`Dims::of`]).
    fn zeros(len: usize) -> Dims {
        Dims::of(&[0; MAX_RANK][..len.min(MAX_RANK)])
    }
}

impl Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.d[..usize::from(self.len)]
    }
}

impl DerefMut for Dims {
    fn deref_mut(&mut self) -> &mut [usize] {
        &mut self.d[..usize::from(self.len)]
    }
}

impl<'a> IntoIterator for &'a Dims {
    type Item = &'a usize;
    type IntoIter = std::slice::Iter<'a, usize>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::fmt::Debug for Dims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<usize> for Dims {
    /// The first [`MAX_RANK`] items (callers collect at most a checked rank).
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Dims {
        let mut out = Dims::default();
        for (slot, v) in out.d.iter_mut().zip(iter) {
            *slot = v;
            out.len += 1;
        }
        out
    }
}

/// Where a value's elements sit in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Sizes.
    pub shape: Dims,
    /// Element strides per axis.
    pub strides: Dims,
    /// Element offset of the first element.
    pub offset: usize,
}

impl Layout {
    /// Row-major dense.
    pub fn dense(shape: &[usize]) -> Layout {
        let shape = Dims::of(shape);
        let mut strides = Dims::zeros(shape.len());
        let mut s = 1;
        for (st, &n) in strides.iter_mut().zip(&shape).rev() {
            *st = s;
            s *= n;
        }
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major dense from its offset (size-1 axes may have any stride).
    pub fn is_dense(&self) -> bool {
        let mut s = 1;
        for (&st, &n) in self.strides.iter().zip(&self.shape).rev() {
            if n != 1 && st != s {
                return false;
            }
            s *= n;
        }
        true
    }

    /// The same dense elements under `shape` (same element count); a strided layout keeps
    /// its strides (a widening cast's alias, same shape).
    pub fn reshaped(&self, shape: &[usize]) -> Layout {
        if self.is_dense() {
            Layout {
                offset: self.offset,
                ..Layout::dense(shape)
            }
        } else {
            *self
        }
    }

    /// Axis `i` of the result is axis `perm[i]` of this layout.
    pub fn permuted(&self, perm: &[usize]) -> Layout {
        Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        }
    }

    /// Elements `start..end` along `axis` (bounds already checked).
    pub fn sliced(&self, axis: usize, start: usize, end: usize) -> Layout {
        let mut l = *self;
        l.offset += start * self.strides[axis];
        l.shape[axis] = end - start;
        l
    }

    /// Strides reading this layout broadcast (numpy rules) to `shape`, or `None` if it does
    /// not broadcast there.
    pub fn broadcast_to(&self, shape: &[usize]) -> Option<Dims> {
        let lead = shape.len().checked_sub(self.shape.len())?;
        let mut strides = Dims::try_from_slice(shape)?;
        strides.fill(0);
        for (i, (&n, &st)) in self.shape.iter().zip(&self.strides).enumerate() {
            let target = shape[lead + i];
            strides[lead + i] = if n == target {
                if n == 1 {
                    0
                } else {
                    st
                }
            } else if n == 1 {
                0
            } else {
                return None;
            };
        }
        Some(strides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views() {
        let l = Layout::dense(&[2, 3, 4]);
        assert_eq!(*l.strides, [12, 4, 1]);
        assert!(l.is_dense());
        let p = l.permuted(&[0, 2, 1]);
        assert_eq!((&*p.shape, &*p.strides), (&[2, 4, 3][..], &[12, 1, 4][..]));
        assert!(!p.is_dense());
        let s = l.sliced(2, 1, 3);
        assert_eq!((s.offset, &*s.shape), (1, &[2, 3, 2][..]));
        assert!(!s.is_dense());
        assert!(l.sliced(0, 1, 2).is_dense());
        assert_eq!(
            Layout::dense(&[3, 1]).broadcast_to(&[2, 3, 5]).as_deref(),
            Some(&[0, 1, 0][..])
        );
        assert_eq!(Layout::dense(&[3]).broadcast_to(&[2, 4]), None);
    }

    /// Ranks past [`MAX_RANK`] are refused, not cut.
    #[test]
    fn rank_limit() {
        assert_eq!(
            Dims::try_from_slice(&[1; MAX_RANK]).map(|d| d.len()),
            Some(MAX_RANK)
        );
        assert_eq!(Dims::try_from_slice(&[1; MAX_RANK + 1]), None);
    }
}

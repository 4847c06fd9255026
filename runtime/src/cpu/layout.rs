//! Strided layouts of values in the CPU backend's buffers: a shape, one element stride per axis
//! (0 = broadcast) and an offset, so permutes, slices and expands are views with no copy.

/// Where a value's elements sit in its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Sizes.
    pub shape: Vec<usize>,
    /// Element strides per axis.
    pub strides: Vec<usize>,
    /// Element offset of the first element.
    pub offset: usize,
}

impl Layout {
    /// Row-major dense.
    pub fn dense(shape: Vec<usize>) -> Layout {
        let mut strides = vec![0; shape.len()];
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
    pub fn reshaped(&self, shape: Vec<usize>) -> Layout {
        if self.is_dense() {
            Layout {
                offset: self.offset,
                ..Layout::dense(shape)
            }
        } else {
            self.clone()
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
        let mut l = self.clone();
        l.offset += start * self.strides[axis];
        l.shape[axis] = end - start;
        l
    }

    /// Strides reading this layout broadcast (numpy rules) to `shape`, or `None` if it does
    /// not broadcast there.
    pub fn broadcast_to(&self, shape: &[usize]) -> Option<Vec<usize>> {
        let lead = shape.len().checked_sub(self.shape.len())?;
        let mut strides = vec![0; shape.len()];
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
        let l = Layout::dense(vec![2, 3, 4]);
        assert_eq!(l.strides, vec![12, 4, 1]);
        assert!(l.is_dense());
        let p = l.permuted(&[0, 2, 1]);
        assert_eq!(
            (p.shape.clone(), p.strides.clone()),
            (vec![2, 4, 3], vec![12, 1, 4])
        );
        assert!(!p.is_dense());
        let s = l.sliced(2, 1, 3);
        assert_eq!((s.offset, s.shape.clone()), (1, vec![2, 3, 2]));
        assert!(!s.is_dense());
        assert!(l.sliced(0, 1, 2).is_dense());
        assert_eq!(
            Layout::dense(vec![3, 1]).broadcast_to(&[2, 3, 5]),
            Some(vec![0, 1, 0])
        );
        assert_eq!(Layout::dense(vec![3]).broadcast_to(&[2, 4]), None);
    }
}

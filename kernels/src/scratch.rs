//! Per-thread spare vectors for the kernels' per-call scratch (prepared activations, partial
//! results): [`Scratch::filled`] takes the calling thread's spare vector of that element type
//! (or a new one) and sizes it; dropping the [`Scratch`] gives it back. In a steady decode
//! loop the sizes repeat, so after the first steps no kernel call allocates for its scratch.
//! Spares past [`KEPT_ELEMENTS`] are freed, not kept (a long prefill's buffers).

use std::ops::{Deref, DerefMut};

/// The largest spare kept, in elements.
pub(crate) const KEPT_ELEMENTS: usize = 1 << 22;

/// Element types with a per-thread pool of spare vectors ([`pooled!`]).
pub(crate) trait Pooled: Copy + 'static {
    /// Runs `f` on the calling thread's spare vectors of this type; `None` while the thread's
    /// storage is being torn down.
    fn spares<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

/// Implements [`Pooled`] for plain element types, each with its own thread-local spares.
macro_rules! pooled {
    ($($t:ty),*) => {$(
        impl $crate::scratch::Pooled for $t {
            fn spares<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
                thread_local! {
                    static SPARES: std::cell::RefCell<Vec<Vec<$t>>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                SPARES.try_with(|s| f(&mut s.borrow_mut())).ok()
            }
        }
    )*};
}
pub(crate) use pooled;

pooled!(f32, u16, u32, half::bf16);

/// `v`'s allocation, emptied, for elements of another lifetime: a list of borrowing elements
/// (a call's tasks, a run's values) kept empty between calls, so that it allocates only to
/// grow.
pub fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    // The same size and alignment: collected in place (no element is left to map).
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// A vector borrowed from the thread's spares until dropped.
pub(crate) struct Scratch<T: Pooled>(Vec<T>);

impl<T: Pooled> Scratch<T> {
    /// `len` copies of `value`.
    pub(crate) fn filled(len: usize, value: T) -> Self {
        let mut v = Scratch::<T>::spare();
        v.resize(len, value);
        Scratch(v)
    }

    /// The items of `iter`, in order.
    pub(crate) fn collected(iter: impl IntoIterator<Item = T>) -> Self {
        let mut v = Scratch::<T>::spare();
        v.extend(iter);
        Scratch(v)
    }

    /// An empty vector to grow (see [`Scratch::as_vec`]).
    pub(crate) fn empty() -> Self {
        Scratch(Scratch::<T>::spare())
    }

    /// The vector itself, to resize.
    pub(crate) fn as_vec(&mut self) -> &mut Vec<T> {
        &mut self.0
    }

    /// An empty spare (or a new vector).
    fn spare() -> Vec<T> {
        let mut v = T::spares(Vec::pop).flatten().unwrap_or_default();
        v.clear();
        v
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > 0 && v.capacity() <= KEPT_ELEMENTS {
            T::spares(|s| s.push(v));
        }
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped scratch's vector is the next one taken on this thread, refilled.
    #[test]
    fn reuses_the_spare() {
        let a = Scratch::filled(100, 1.0f32);
        let ptr = a.as_ptr();
        drop(a);
        let b = Scratch::filled(50, 2.0f32);
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.iter().all(|&x| x == 2.0) && b.len() == 50);
        let c = Scratch::collected([3u16, 4, 5]);
        assert_eq!(&c[..], &[3, 4, 5]);
    }
}

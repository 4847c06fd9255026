//! A value computed on a thread of its own from the moment it is asked for, and waited for only
//! where it is needed: how opening a model overlaps the long, independent parts of start-up
//! (the weights' checksum, parsing the tokenizer) with everything else.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

/// A value being computed in the background (clones share it).
pub struct Background<T>(Arc<Inner<T>>);

struct Inner<T> {
    /// The computing thread, until its value is taken.
    running: Mutex<Option<JoinHandle<Option<T>>>>,
    /// The value, or `None` when the computation panicked.
    value: OnceLock<Option<T>>,
}

impl<T> std::fmt::Debug for Background<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Background(..)")
    }
}

impl<T> Clone for Background<T> {
    fn clone(&self) -> Self {
        Background(self.0.clone())
    }
}

impl<T: Send + Sync + 'static> Background<T> {
    /// Starts computing `f` on a new thread named `name` (or computes it here and now when no
    /// thread can be started).
    pub fn spawn(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Background<T> {
        let job = Arc::new(Mutex::new(Some(f)));
        let take =
            |job: &Mutex<Option<_>>| job.lock().unwrap_or_else(PoisonError::into_inner).take();
        let run = {
            let job = job.clone();
            move || take(&job).map(|f| f())
        };
        let (running, value) = match std::thread::Builder::new().name(name.into()).spawn(run) {
            Ok(handle) => (Some(handle), OnceLock::new()),
            Err(_) => (None, OnceLock::from(take(&job).map(|f| f()))),
        };
        Background(Arc::new(Inner {
            running: Mutex::new(running),
            value,
        }))
    }

    /// The value, waiting for it if it is still being computed; `None` if computing it panicked.
    pub fn get(&self) -> Option<&T> {
        let c = &self.0;
        c.value
            .get_or_init(|| {
                let running = c
                    .running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                running.and_then(|h| h.join().ok().flatten())
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_computed_once_and_shared() {
        let b = Background::spawn("test", || (1..=100u64).sum::<u64>());
        let c = b.clone();
        assert_eq!(b.get(), Some(&5050));
        assert_eq!(c.get(), Some(&5050));
    }

    #[test]
    fn a_panicking_computation_gives_none() {
        let b: Background<u8> = Background::spawn("test", || panic!("on purpose"));
        assert_eq!(b.get(), None);
        assert_eq!(b.get(), None);
    }
}

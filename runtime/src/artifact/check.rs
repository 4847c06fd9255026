//! The weight data's checksum, computed on a thread of its own while the model is built and
//! starts running, so that hashing hundreds of megabytes does not delay start-up.
//! [`WeightCheck::wait`] gives the verdict (waiting for it when needed); whatever serves a
//! model's outputs calls it before the first output leaves (see [`crate::deploy`]), so a
//! corrupted weight is reported as an [`ArtifactError::Checksum`] and never reaches the user.

use super::checksum::xxh64;
use super::ArtifactError;
use crate::tensor::SharedBytes;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// The pending or finished check of one section's checksum (clones share it).
#[derive(Clone)]
pub struct WeightCheck(Arc<Inner>);

struct Inner {
    origin: String,
    index: usize,
    kind: &'static str,
    expected: u64,
    /// The hashing thread, until its result is taken.
    running: Mutex<Option<JoinHandle<u64>>>,
    /// The checksum of the bytes, or `None` when the hashing thread died.
    actual: OnceLock<Option<u64>>,
}

impl WeightCheck {
    /// Starts hashing `range` of `bytes` (section `index` of `origin`, of kind `kind`, whose
    /// table entry gives the checksum `expected`) on a new thread, or here and now when no
    /// thread can be started.
    pub fn start(
        bytes: SharedBytes,
        range: Range<usize>,
        origin: &str,
        index: usize,
        kind: &'static str,
        expected: u64,
    ) -> WeightCheck {
        let hash = move || bytes.as_slice().get(range).map_or(0, xxh64);
        let (running, actual) = match std::thread::Builder::new()
            .name("kiln-weight-check".into())
            .spawn(hash.clone())
        {
            Ok(handle) => (Some(handle), OnceLock::new()),
            Err(_) => (None, OnceLock::from(Some(hash()))),
        };
        WeightCheck(Arc::new(Inner {
            origin: origin.to_string(),
            index,
            kind,
            expected,
            running: Mutex::new(running),
            actual,
        }))
    }

    /// Waits for the checksum (if it is still being computed) and compares it with the table's.
    pub fn wait(&self) -> Result<(), ArtifactError> {
        let c = &self.0;
        let actual = *c.actual.get_or_init(|| {
            let running = c.running.lock().unwrap_or_else(|e| e.into_inner()).take();
            running.and_then(|h| h.join().ok())
        });
        match actual {
            Some(actual) if actual == c.expected => Ok(()),
            Some(actual) => Err(ArtifactError::Checksum {
                origin: c.origin.clone(),
                index: c.index,
                kind: c.kind,
                expected: c.expected,
                actual,
            }),
            None => Err(c.died()),
        }
    }
}

impl Inner {
    fn died(&self) -> ArtifactError {
        ArtifactError::Malformed {
            origin: self.origin.clone(),
            message: format!(
                "section {} ({}) could not be checked: the checking thread stopped",
                self.index, self.kind
            ),
        }
    }
}

impl std::fmt::Debug for WeightCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let done = if self.0.actual.get().is_some() {
            "done"
        } else {
            "running"
        };
        write!(
            f,
            "WeightCheck(section {} of {}, {done})",
            self.0.index, self.0.origin
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_compares_the_hash_once_computed() {
        let bytes = SharedBytes::copy_of(&[7u8; 1000]);
        let good = xxh64(&[7u8; 900]);
        let ok = WeightCheck::start(bytes.clone(), 100..1000, "a.kiln", 6, "weight_data", good);
        assert!(ok.wait().is_ok());
        assert!(ok.clone().wait().is_ok(), "the verdict is kept");
        let bad = WeightCheck::start(bytes, 0..1000, "a.kiln", 6, "weight_data", good);
        for _ in 0..2 {
            let e = bad.wait().unwrap_err().to_string();
            assert!(
                e.contains("a.kiln: section 6 (weight_data) is corrupt"),
                "{e}"
            );
        }
    }
}

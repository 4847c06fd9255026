//! The weight data's checksum, computed on a thread of its own while the model is built and
//! starts running, so that hashing hundreds of megabytes does not delay start-up.
//! [`WeightCheck::wait`] gives the verdict (waiting for it when needed); whatever serves a
//! model's outputs calls it before the first output leaves (see [`crate::deploy`]), so a
//! corrupted weight is reported as an [`ArtifactError::Checksum`] and never reaches the user.

use super::checksum::xxh3;
use super::ArtifactError;
use crate::background::Background;
use crate::tensor::SharedBytes;
use std::ops::Range;

/// The pending or finished check of one section's checksum (clones share it).
#[derive(Clone)]
pub struct WeightCheck {
    origin: String,
    index: usize,
    kind: &'static str,
    expected: u64,
    actual: Background<u64>,
}

impl WeightCheck {
    /// Starts hashing `range` of `bytes` (section `index` of `origin`, of kind `kind`, whose
    /// table entry gives the checksum `expected`).
    pub fn start(
        bytes: SharedBytes,
        range: Range<usize>,
        origin: &str,
        index: usize,
        kind: &'static str,
        expected: u64,
    ) -> WeightCheck {
        let actual = Background::spawn("kiln-weight-check", move || {
            bytes.as_slice().get(range).map_or(0, xxh3)
        });
        WeightCheck {
            origin: origin.to_string(),
            index,
            kind,
            expected,
            actual,
        }
    }

    /// Waits for the checksum (if it is still being computed) and compares it with the table's.
    pub fn wait(&self) -> Result<(), ArtifactError> {
        match self.actual.get() {
            Some(&actual) if actual == self.expected => Ok(()),
            Some(&actual) => Err(ArtifactError::Checksum {
                origin: self.origin.clone(),
                index: self.index,
                kind: self.kind,
                expected: self.expected,
                actual,
            }),
            None => Err(ArtifactError::Malformed {
                origin: self.origin.clone(),
                message: format!(
                    "section {} ({}) could not be checked: the checking thread stopped",
                    self.index, self.kind
                ),
            }),
        }
    }
}

impl std::fmt::Debug for WeightCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightCheck(section {} of {})", self.index, self.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_compares_the_hash_once_computed() {
        let bytes = SharedBytes::copy_of(&[7u8; 1000]);
        let good = xxh3(&[7u8; 900]);
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

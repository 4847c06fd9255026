//! [`F64`]: an f64 attribute that can live in hashed and ordered collections (e-graph nodes,
//! CSE maps). Equality, hashing and ordering go by the bit pattern, so `NaN == NaN` and
//! `0.0 != -0.0`: two ops are the same op exactly when their attributes print the same.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// An f64 compared, hashed and ordered by its bits (ordering is IEEE 754 `totalOrder`).
/// Prints as the text format does: shortest round-trip digits, `inf`, `-inf` or `nan`; parses
/// that back.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for F64 {}

impl Hash for F64 {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for F64 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl From<f64> for F64 {
    fn from(x: f64) -> Self {
        F64(x)
    }
}

impl fmt::Display for F64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_nan() {
            f.write_str("nan")
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

impl FromStr for F64 {
    type Err = std::num::ParseFloatError;

    /// Reads what [`Display`](fmt::Display) writes (and any other decimal Rust accepts).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(F64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitwise_identity() {
        assert_eq!(F64(f64::NAN), F64(f64::NAN));
        assert_ne!(F64(0.0), F64(-0.0));
        assert!(F64(-0.0) < F64(0.0));
        assert!(F64(1e-6) < F64(1e-5));
        assert!(F64(f64::NEG_INFINITY) < F64(-1.0));
    }

    #[test]
    fn text_round_trip() {
        for x in [
            1e-6,
            0.25,
            -3.0,
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            let s = F64(x).to_string();
            assert_eq!(s.parse::<F64>().unwrap(), F64(x), "{s}");
        }
        assert_eq!(F64(1e-6).to_string(), "1e-6");
        assert_eq!(F64(f64::NAN).to_string(), "nan");
        assert_eq!(serde_json::to_string(&F64(0.5)).unwrap(), "0.5");
    }
}

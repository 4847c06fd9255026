//! Per-kind kernel timings of a backend's runs, asked for with `KILN_PROFILE` in the
//! environment when a graph is compiled: seconds and calls per kind of step (e.g. `linear`),
//! over all runs, reported longest first (`kiln bench model` prints them).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Seconds and calls per kind of step.
#[derive(Debug, Default)]
pub struct Profile(Mutex<BTreeMap<String, (f64, usize)>>);

impl Profile {
    /// A profile when `KILN_PROFILE` is set, else `None` (no timing at all).
    pub fn from_env() -> Option<Profile> {
        std::env::var_os("KILN_PROFILE").map(|_| Profile::default())
    }

    /// Adds one call of `kind` taking `secs`.
    pub fn record(&self, kind: &str, secs: f64) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(kind.to_string()).or_default();
        e.0 += secs;
        e.1 += 1;
    }

    /// `(kind, seconds, calls)`, longest first.
    pub fn report(&self) -> Vec<(String, f64, usize)> {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.iter().map(|(k, (t, n))| (k.clone(), *t, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_kind_and_reports_longest_first() {
        let p = Profile::default();
        p.record("linear", 0.5);
        p.record("rmsnorm", 0.25);
        p.record("linear", 1.0);
        assert_eq!(
            p.report(),
            vec![
                ("linear".to_string(), 1.5, 2),
                ("rmsnorm".to_string(), 0.25, 1)
            ]
        );
    }
}

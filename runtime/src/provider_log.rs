//! What a backend records of an outside kernel provider (`--codegen mlir`) as it uses it: the
//! first reason each kind of step stayed on the backend's own kernel (printed to stderr when
//! `KILN_CODEGEN_LOG` is set) and how many nodes the provider's kernels computed. Shared by the
//! CPU backend's [`crate::cpu::external`] and the CUDA backend's PTX providers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Fallback reasons (once per kind) and a count of computed nodes.
#[derive(Debug)]
pub struct ProviderLog {
    /// How fallbacks are introduced on stderr, e.g. `mlir kernels`.
    label: String,
    fallbacks: Mutex<BTreeMap<String, String>>,
    runs: AtomicUsize,
    print: bool,
}

impl ProviderLog {
    /// An empty record; fallbacks are printed, prefixed by `label`, when `KILN_CODEGEN_LOG` is
    /// set.
    pub fn new(label: impl Into<String>) -> ProviderLog {
        ProviderLog {
            label: label.into(),
            fallbacks: Mutex::default(),
            runs: AtomicUsize::new(0),
            print: std::env::var_os("KILN_CODEGEN_LOG").is_some(),
        }
    }

    /// Records (and with the log on, prints) the first reason `kind` stayed native.
    pub fn fell_back(&self, kind: &str, why: String) {
        let mut seen = self
            .fallbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !seen.contains_key(kind) {
            if self.print {
                eprintln!("kiln: {}: {kind} stays native: {why}", self.label);
            }
            seen.insert(kind.to_string(), why);
        }
    }

    /// Per kind, the first reason it stayed native.
    pub fn fallbacks(&self) -> BTreeMap<String, String> {
        self.fallbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts one node computed by the provider's kernels.
    pub fn ran(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    /// How many nodes the provider's kernels computed so far.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::Relaxed)
    }
}

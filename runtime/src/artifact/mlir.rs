//! The MLIR section (optional, `kiln compile --emit-mlir`): per distinct kernel that the
//! `--codegen mlir` provider lowers for the artifact's graphs, its key and its MLIR module as
//! text, before the lowering-to-LLVM pipeline (the `linalg`/`scf`/`vector` form, which a user
//! can hand to their own MLIR pipeline).
//!
//! The runtime treats the modules as opaque text: it checks the section's shape (JSON, at most
//! [`MAX_KERNELS`] records, a known target, non-empty keys in strictly increasing order, so
//! each key once) and hands it on; `kiln_compiler::mlir::MlirProvider` decides what to do with
//! each module. The keys are `kiln_compiler::mlir::KernelKey`'s text (the op in the IR text
//! syntax, its memref arguments and its params), which this crate never parses.

use serde::{Deserialize, Serialize};

/// The most kernel records a section may hold.
pub const MAX_KERNELS: usize = 1 << 16;

/// The only kernel target the section holds so far: the CPU JIT's.
pub const CPU: &str = "cpu";

/// The artifact's MLIR: one record per kernel, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlirRecord {
    /// The kernels.
    pub kernels: Vec<CarriedKernel>,
}

/// One kernel's MLIR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarriedKernel {
    /// The kernel's key, as text.
    pub key: String,
    /// What it was lowered for ([`CPU`]).
    pub target: String,
    /// The module, as MLIR's printer writes it.
    pub mlir: String,
}

impl MlirRecord {
    /// A record holding `kernels`, sorted by key (the order the writer and the reader agree on).
    pub fn new(mut kernels: Vec<CarriedKernel>) -> MlirRecord {
        kernels.sort_by(|a, b| a.key.cmp(&b.key));
        MlirRecord { kernels }
    }

    /// Why this record cannot be stored or used (`None`: it can).
    pub fn problem(&self) -> Option<String> {
        if self.kernels.len() > MAX_KERNELS {
            return Some(format!(
                "{} kernels; an artifact carries at most {MAX_KERNELS}",
                self.kernels.len()
            ));
        }
        for (i, k) in self.kernels.iter().enumerate() {
            if k.key.is_empty() || k.mlir.is_empty() {
                return Some(format!("kernel {i} has an empty key or module"));
            }
            if k.target != CPU {
                return Some(format!(
                    "kernel {i} is for target {:?}; only {CPU:?} kernels are carried",
                    k.target
                ));
            }
            if i > 0 && self.kernels[i - 1].key >= k.key {
                return Some(format!(
                    "kernel {i}'s key is listed twice or out of order: {:?}",
                    k.key
                ));
            }
        }
        None
    }

    /// The module of the kernel with key text `key`, if carried.
    pub fn module(&self, key: &str) -> Option<&str> {
        self.kernels
            .binary_search_by(|k| k.key.as_str().cmp(key))
            .ok()
            .map(|i| self.kernels[i].mlir.as_str())
    }

    /// The modules' total length in bytes.
    pub fn text_bytes(&self) -> usize {
        self.kernels.iter().map(|k| k.mlir.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(key: &str) -> CarriedKernel {
        CarriedKernel {
            key: key.into(),
            target: CPU.into(),
            mlir: format!("module {{}} // {key}"),
        }
    }

    #[test]
    fn records_are_sorted_and_looked_up_by_key() {
        let r = MlirRecord::new(vec![
            kernel("softmax"),
            kernel("matmul"),
            kernel("rms_norm"),
        ]);
        assert_eq!(r.problem(), None);
        assert_eq!(r.module("rms_norm"), Some("module {} // rms_norm"));
        assert_eq!(r.module("gelu"), None);
        let texts = [
            "module {} // softmax",
            "module {} // matmul",
            "module {} // rms_norm",
        ];
        assert_eq!(r.text_bytes(), texts.iter().map(|t| t.len()).sum::<usize>());
    }

    #[test]
    fn bad_records_say_why() {
        let twice = MlirRecord {
            kernels: vec![kernel("a"), kernel("a")],
        };
        assert!(twice.problem().unwrap().contains("listed twice"));
        let unsorted = MlirRecord {
            kernels: vec![kernel("b"), kernel("a")],
        };
        assert!(unsorted.problem().unwrap().contains("out of order"));
        let mut gpu = kernel("a");
        gpu.target = "cuda".into();
        let e = MlirRecord::new(vec![gpu]).problem().unwrap();
        assert!(e.contains("target \"cuda\""), "{e}");
        let empty = MlirRecord::new(vec![kernel("")]);
        assert!(empty.problem().unwrap().contains("empty key"));
        let many = MlirRecord {
            kernels: vec![kernel("a"); MAX_KERNELS + 1],
        };
        assert!(many.problem().unwrap().contains("at most"));
    }
}

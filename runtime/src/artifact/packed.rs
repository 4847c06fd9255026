//! Packed weights in artifacts: which weights the writer stores in the linear kernels' packed
//! layout ([`packed_forms`], decided from the CPU plan of the graphs, by the same code that
//! prepares weights at load), their bytes ([`append_words`]), and the reader's side: packed words
//! borrowed in place from the artifact's bytes ([`borrow`]).
//!
//! A weight is stored packed only when it is bf16 and every reader in the plans is a linear
//! step reading it prepared; a weight something else reads as a value (an embedding gather, a
//! reference-op fallback, a graph output) stays plain, and the runtime packs it at load as for
//! a directory. A packed weight read as a value after all (another plan, e.g. with external
//! kernels) is unpacked on first use ([`crate::Tensor::packed`]): slower, never different.

use crate::cpu::legalize::legalize;
use crate::cpu::weights::{packed_reads, plain_reads};
use crate::cpu::Plan;
use crate::tensor::SharedBytes;
use kiln_ir::{DType, Graph};
use kiln_kernels::gemm_bf16::{PackedBf16, PackedWords};
use kiln_kernels::KernelError;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

/// The orientations (`transposed`) in which to store each weight packed, by name: the bf16
/// weights the CPU plans of `graphs` (verified) read only through linear steps; `dtype` gives a
/// parameter's element type.
pub fn packed_forms(
    graphs: &[Graph],
    dtype: impl Fn(&str) -> Option<DType>,
) -> BTreeMap<String, Vec<bool>> {
    let graphs: Vec<Graph> = graphs.iter().map(legalize).collect();
    let plans: Vec<Plan> = graphs.iter().map(Plan::new).collect();
    let plan_refs: Vec<&Plan> = plans.iter().collect();
    let plain: BTreeSet<&str> = graphs
        .iter()
        .zip(&plans)
        .flat_map(|(g, p)| plain_reads(g, p))
        .collect();
    let mut forms: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (name, transposed) in packed_reads(&plan_refs, &dtype) {
        if dtype(name) == Some(DType::BF16) && !plain.contains(name) {
            forms.entry(name.to_string()).or_default().push(transposed);
        }
    }
    forms
}

/// Appends the packed words, little-endian.
pub fn append_words(p: &PackedBf16, out: &mut Vec<u8>) {
    out.reserve(p.bytes());
    for w in p.words() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Packed words in place in an artifact's bytes (4-byte aligned, a little-endian host: checked
/// by [`borrow`]).
#[derive(Debug)]
struct Mapped {
    bytes: SharedBytes,
    range: Range<usize>,
}

impl PackedWords for Mapped {
    fn words(&self) -> &[u32] {
        bytemuck::cast_slice(&self.bytes.as_slice()[self.range.clone()])
    }
}

impl PackedWords for Owned {
    fn words(&self) -> &[u32] {
        &self.0
    }
}

/// Packed words decoded from their bytes (a big-endian host).
#[derive(Debug)]
struct Owned(Vec<u32>);

/// The packed `n × k` matrix whose words are the bytes `range` of `bytes` (in bounds: checked
/// by the caller), borrowed in place; refused (as [`PackedBf16::from_words`] refuses) unless
/// they are exactly the words packing leaves.
pub fn borrow(
    bytes: &SharedBytes,
    range: Range<usize>,
    n: usize,
    k: usize,
) -> Result<PackedBf16, KernelError> {
    let raw = &bytes.as_slice()[range.clone()];
    let in_place =
        cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, u32>(raw).is_ok();
    let words: Arc<dyn PackedWords> = if in_place {
        Arc::new(Mapped {
            bytes: bytes.clone(),
            range,
        })
    } else {
        let words = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Arc::new(Owned(words))
    };
    PackedBf16::from_words(n, k, words)
}

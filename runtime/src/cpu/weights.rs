//! Weights converted and packed once at load for the linear-layer kernels: a bf16 or f16
//! weight (and an fp8 one stored `[k, n]`) becomes a bf16 panel-packed matrix ([`PackedBf16`],
//! exact for bf16 and e4m3, rounded for f16 and e5m2 as a cast to bf16 would — precision
//! lowering only emits bf16 and e4m3 weights here). f32 weights, and e4m3 weights stored
//! `[n, k]` (read one byte per weight by the fp8 GEMV), are used in place from the parameters,
//! with no copy.

use super::plan::{LinearLayer, Plan, Step};
use crate::reference::ParamSource;
use crate::tensor::Elements;
use crate::Tensor;
use half::bf16;
use kiln_ir::DType;
use kiln_kernels::gemm_bf16::PackedBf16;
use std::borrow::Cow;
use std::collections::HashMap;

/// Prepared weights of one or more plans over the same parameters, by parameter name, then
/// storage orientation (`[transposed as usize]`).
#[derive(Debug, Default)]
pub struct Weights {
    packed: HashMap<String, [Option<PackedBf16>; 2]>,
}

impl Weights {
    /// Packs every narrow weight a linear step of `plans` reads (a SwiGLU gate's too) (once, however many plans and
    /// steps read it). A weight that is missing or cannot be packed is left out; the step then
    /// finds no prepared weight and runs the reference op, which reports the problem.
    pub fn prepare(plans: &[&Plan], params: &dyn ParamSource) -> Weights {
        let mut packed: HashMap<String, [Option<PackedBf16>; 2]> = HashMap::new();
        for plan in plans {
            for step in &plan.steps {
                let Step::Linear(layers) = step else {
                    continue;
                };
                for (weight, transposed) in layers.iter().flat_map(LinearLayer::weights) {
                    let transposed = &transposed;
                    let fp8_in_place = *transposed
                        && params
                            .get(weight)
                            .is_some_and(|t| t.dtype() == DType::F8E4M3);
                    let entry = packed.entry(weight.to_string()).or_default();
                    let slot = &mut entry[usize::from(*transposed)];
                    if fp8_in_place || slot.is_some() {
                        continue;
                    }
                    *slot = params.get(weight).and_then(|t| pack(t, *transposed));
                }
            }
        }
        Weights { packed }
    }

    /// The packed form of `weight` stored with orientation `transposed`, if prepared.
    pub fn packed(&self, weight: &str, transposed: bool) -> Option<&PackedBf16> {
        self.packed.get(weight)?[usize::from(transposed)].as_ref()
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        self.packed
            .values()
            .flatten()
            .flatten()
            .map(PackedBf16::bytes)
            .sum()
    }
}

/// `t` (2-D, narrow float) as a bf16 matrix `[n, k]` packed for `matmul_bf16`; `transposed`
/// says `t` is stored `[n, k]` already, else `[k, n]`.
pub(super) fn pack(t: &Tensor, transposed: bool) -> Option<PackedBf16> {
    let &[rows, cols] = t.shape() else {
        return None;
    };
    // bf16 weights are read in place (from an artifact's map, with no copy); others converted.
    let cast;
    let values: &[bf16] = match t.elements() {
        Elements::BF16(v) => v,
        Elements::F16(_) | Elements::F8E4M3(_) | Elements::F8E5M2(_) => {
            cast = t.cast(DType::BF16);
            match cast.elements() {
                Elements::BF16(v) => v,
                _ => return None,
            }
        }
        _ => return None,
    };
    let (n, k, w) = if transposed {
        (rows, cols, Cow::Borrowed(values))
    } else {
        let mut w = vec![bf16::ZERO; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                w[c * rows + r] = values[r * cols + c];
            }
        }
        (cols, rows, Cow::Owned(w))
    };
    PackedBf16::pack(n, k, &w).ok()
}

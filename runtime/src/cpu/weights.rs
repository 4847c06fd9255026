//! Weights converted and packed once for the linear-layer kernels: a bf16 or f16 weight (and an
//! fp8 one stored `[k, n]`) becomes a bf16 panel-packed matrix ([`PackedBf16`], exact for bf16
//! and e4m3, rounded for f16 and e5m2 as a cast to bf16 would — precision lowering only emits
//! bf16 and e4m3 weights here). f32 weights, and e4m3 weights stored `[n, k]` (read one byte
//! per weight by the fp8 GEMV), are used in place from the parameters, with no copy.
//!
//! A weight an artifact stores already packed ([`Tensor::packed`]) is used as it is: no copy at
//! load. The artifact writer asks [`packed_reads`] and [`plain_reads`] which weights to store so.

use super::plan::{LinearLayer, Plan, Step};
use crate::reference::ParamSource;
use crate::tensor::Elements;
use crate::Tensor;
use half::bf16;
use kiln_ir::{DType, Graph, Op};
use kiln_kernels::gemm_bf16::PackedBf16;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

/// Prepared weights of one or more plans over the same parameters, by parameter name, then
/// storage orientation (`[transposed as usize]`).
#[derive(Debug, Default)]
pub struct Weights {
    packed: HashMap<String, [Option<PackedBf16>; 2]>,
}

impl Weights {
    /// Packs every narrow weight a linear step of `plans` reads (a SwiGLU gate's too) (once,
    /// however many plans and steps read it), or takes its packed form where the parameter is
    /// held packed already. A weight that is missing or cannot be packed is left out; the step
    /// then finds no prepared weight and runs the reference op, which reports the problem.
    pub fn prepare(plans: &[&Plan], params: &dyn ParamSource) -> Weights {
        let mut packed: HashMap<String, [Option<PackedBf16>; 2]> = HashMap::new();
        let dtype = |name: &str| params.get(name).map(Tensor::dtype);
        for (weight, transposed) in packed_reads(plans, dtype) {
            let Some(t) = params.get(weight) else {
                continue;
            };
            if let Some(p) = t
                .packed_form(transposed)
                .cloned()
                .or_else(|| pack(t, transposed))
            {
                packed.entry(weight.to_string()).or_default()[usize::from(transposed)] = Some(p);
            }
        }
        Weights { packed }
    }

    /// The packed form of `weight` stored with orientation `transposed`, if prepared.
    pub fn packed(&self, weight: &str, transposed: bool) -> Option<&PackedBf16> {
        self.packed.get(weight)?[usize::from(transposed)].as_ref()
    }

    /// Bytes of the packed copies made here (not counting packed weights used in place).
    pub fn bytes(&self) -> usize {
        self.packed
            .values()
            .flatten()
            .flatten()
            .filter(|p| !p.is_borrowed())
            .map(PackedBf16::bytes)
            .sum()
    }
}

/// The weights the linear steps of `plans` read packed, as `(name, transposed)`: every narrow
/// float weight (`dtype` gives a parameter's), except e4m3 weights stored `[n, k]`.
pub fn packed_reads<'p>(
    plans: &[&'p Plan],
    dtype: impl Fn(&str) -> Option<DType>,
) -> BTreeSet<(&'p str, bool)> {
    let mut reads = BTreeSet::new();
    for step in plans.iter().flat_map(|p| &p.steps) {
        let Step::Linear(layers) = step else {
            continue;
        };
        for (weight, transposed) in layers.iter().flat_map(LinearLayer::weights) {
            let packs = match dtype(weight) {
                Some(DType::F8E4M3) => !transposed,
                Some(d) => matches!(d, DType::BF16 | DType::F16 | DType::F8E5M2),
                None => false,
            };
            if packs {
                reads.insert((weight, transposed));
            }
        }
    }
    reads
}

/// The parameters `plan` reads as values (not through a linear step's prepared weight): those
/// a step computing something takes as an operand, and those the graph outputs.
pub fn plain_reads<'g>(graph: &'g Graph, plan: &Plan) -> BTreeSet<&'g str> {
    let name = |v: kiln_ir::ValueId| match graph.node(v).map(|n| &n.op) {
        Some(Op::Param { name }) => Some(name.as_str()),
        _ => None,
    };
    let computed = graph
        .nodes()
        .iter()
        .zip(&plan.steps)
        .filter(|(_, step)| !matches!(step, Step::Skip))
        .flat_map(|(node, step)| step.value_operands(node));
    let outputs = graph.outputs().iter().map(|o| o.value);
    computed.chain(outputs).filter_map(name).collect()
}

/// `t` (2-D, narrow float) as a bf16 matrix `[n, k]` packed for `matmul_bf16`; `transposed`
/// says `t` is stored `[n, k]` already, else `[k, n]`.
pub(crate) fn pack(t: &Tensor, transposed: bool) -> Option<PackedBf16> {
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

//! Kernels from outside the runtime (e.g. `kiln-compiler`'s MLIR code generator), plugged into
//! the CPU backend without the runtime depending on whoever makes them.
//!
//! A [`KernelProvider`] is asked twice: at plan time whether it may lower a node ([`accepts`],
//! from the op and its operands' declared types), and at run time for a kernel at the
//! operands' concrete shapes ([`kernel`], which may compile and should cache). A node it
//! accepts becomes [`Step::External`] around the native step it replaces; whenever the
//! provider cannot give or run a kernel, the native step runs instead and the reason is
//! recorded once per kind of kernel ([`Provider::fallbacks`]), printed to stderr when
//! `KILN_CODEGEN_LOG` is set. A provider never makes a run fail.
//!
//! [`accepts`]: KernelProvider::accepts
//! [`kernel`]: KernelProvider::kernel

use super::plan::{kind, Step};
use crate::provider_log::ProviderLog;
use kiln_ir::{Op, TensorType};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// An f32 operand as the CPU backend holds it, possibly a view (e.g. the KV cache grown in
/// place): element `[i0, i1, ...]` is `data[Σ ik · strides[k]]`.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    /// The elements, from the operand's first one.
    pub data: &'a [f32],
    /// The sizes.
    pub shape: &'a [usize],
    /// The element strides per axis.
    pub strides: &'a [usize],
}

/// A kernel computing one node's f32 result from its f32 operands.
pub trait ExternalKernel: Send + Sync {
    /// Runs on `inputs` in operand order; `out` (dense, of shape `out_shape`) receives the
    /// result. An error means nothing usable was written.
    fn run(
        &self,
        inputs: &[Operand<'_>],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> Result<(), String>;
}

/// Makes kernels for graph nodes.
pub trait KernelProvider: Send + Sync {
    /// A short name for plans and logs, e.g. `mlir`.
    fn name(&self) -> &str;

    /// Whether this provider may compute a node with `op` over operands of these declared
    /// types (`Err` says why not).
    fn accepts(&self, op: &Op, operands: &[&TensorType]) -> Result<(), String>;

    /// The kernel for `op` over f32 operands of exactly these shapes, or why there is none.
    fn kernel(&self, op: &Op, shapes: &[&[usize]]) -> Result<Arc<dyn ExternalKernel>, String>;
}

/// A provider as a plan uses it: the kinds of native steps it may replace, the reasons it did
/// not (once per kind) and the number of nodes its kernels computed.
pub struct Provider {
    inner: Arc<dyn KernelProvider>,
    log: ProviderLog,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Provider({})", self.inner.name())
    }
}

impl Provider {
    /// Wraps `inner`; fallbacks go to stderr when `KILN_CODEGEN_LOG` is set.
    pub fn new(inner: Arc<dyn KernelProvider>) -> Arc<Provider> {
        let log = ProviderLog::new(format!("{} kernels", inner.name()));
        Arc::new(Provider { inner, log })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The step for a node whose native step is `native`: [`Step::External`] when the native
    /// kernel is one a provider may replace (fused elementwise, norms, softmax, products of
    /// activations, attention) and the provider accepts the node.
    pub fn choose(self: &Arc<Self>, native: Step, op: &Op, operands: &[&TensorType]) -> Step {
        let replaceable = matches!(
            native,
            Step::Fused(_)
                | Step::RmsNorm { .. }
                | Step::LayerNorm { .. }
                | Step::Softmax
                | Step::MatMul { .. }
                | Step::Attention { .. }
        );
        if !replaceable {
            return native;
        }
        match self.inner.accepts(op, operands) {
            Ok(()) => Step::External {
                provider: self.clone(),
                native: Box::new(native),
            },
            Err(why) => {
                self.fell_back(&native, why);
                native
            }
        }
    }

    /// Runs the provider's kernel for `op` on `inputs`; `false` (reason recorded) when there
    /// is none or it failed, so that the caller runs `native`.
    pub fn run(
        &self,
        native: &Step,
        op: &Op,
        inputs: &[Operand<'_>],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> bool {
        let shapes: Vec<&[usize]> = inputs.iter().map(|o| o.shape).collect();
        let done = self
            .inner
            .kernel(op, &shapes)
            .and_then(|k| k.run(inputs, out, out_shape));
        match done {
            Ok(()) => {
                self.log.ran();
                true
            }
            Err(why) => {
                self.fell_back(native, why);
                false
            }
        }
    }

    /// Records (and with the log on, prints) the first reason a kind of kernel stayed native.
    pub fn fell_back(&self, native: &Step, why: String) {
        self.log.fell_back(kind(&native.name()), why);
    }

    /// Per kind of native kernel, the first reason it was not replaced.
    pub fn fallbacks(&self) -> BTreeMap<String, String> {
        self.log.fallbacks()
    }

    /// How many node evaluations the provider's kernels computed so far.
    pub fn runs(&self) -> usize {
        self.log.runs()
    }
}

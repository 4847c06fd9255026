//! kiln's CPU backend: runs an (optimized) graph with the fast kernels of `kiln-kernels`.
//!
//! The graph is first [`legalize`]d: the compiler's head-layout linears, merged-head
//! attentions and SwiGLUs are expanded to the forms [`fuse`] maps onto the same steps.
//! Then three stages, each printable and checkable on its own:
//! 1. [`plan`]: kernel selection per node ([`plan::Step`]): a matmul whose right operand is a
//!    weight becomes a linear layer on weights converted and packed once at load
//!    ([`weights`]), then [`fuse`] folds epilogues (scales, residual and bias adds, SwiGLU,
//!    per-head RoPE and bf16 rounding) into linear layers, groups the layers reading one
//!    activation, lets a group append its keys and values to the KV cache, and finds rotary
//!    embeddings and attention outputs that can be stored permuted; norms, softmax, attention, fused elementwise bodies, embedding gathers and
//!    layout ops get their kernels; reshapes and widening casts of already-widened values are
//!    aliases (no copy); anything else runs the reference executor's op on that node alone.
//! 2. [`slots`]: static memory planning: liveness-based assignment of every float value to one
//!    of a few reusable buffers (aliases share their operand's), giving the peak activation
//!    bytes for concrete sizes before anything is allocated.
//! 3. [`exec`]: the run loop. Float activations live in f32 buffers holding values already
//!    rounded to their logical dtype (a bf16 value is stored widened), so every kernel reads
//!    and writes f32; bools are stored as 0.0/1.0, and integer values (ids) stay host
//!    tensors, which [`host`]'s kernels read for the few integer nodes of a decode step.
//!    Buffers persist between runs and only grow, so a decode loop at steady state does not
//!    allocate them (nor anything else: see [`exec`]).
//!    A `concat` that is a graph output (a KV cache) is kept as a [`state`] with room to
//!    grow, and appended to in place when it comes back as the next run's input. The weights
//!    the linear steps stream get huge pages from the second run on ([`advice`]).
//!
//! The reference executor ([`crate::reference`]) defines what every graph means; this backend
//! must agree with it within the kernels' documented tolerances (tests in `tests/`).

mod advice;
mod exec;
pub mod external;
mod fuse;
mod host;
mod layout;
pub mod legalize;
mod moe;
mod plan;
mod slots;
pub mod state;
pub(crate) mod weights;

pub use exec::CpuGraph;
pub use moe::{moe_f32, MoeData};
pub use plan::{kind_counts, GateLayer, LinearLayer, MoeWeight, Plan, Step};
pub use slots::SlotPlan;
pub use weights::Weights;

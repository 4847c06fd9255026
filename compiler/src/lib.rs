//! kiln's compiler: passes that rewrite verified IR graphs into faster equivalent graphs.
//!
//! - [`pipeline`]: the pass manager ([`optimize`]) with per-pass reports and limits;
//! - [`egraph`]: graphs as `egg` e-graphs (language, type/constant analysis, extraction);
//! - [`cost`]: the roofline cost model and the [`Target`] table;
//! - [`rules`]: the rewrite rule sets;
//! - [`precision`]: precision lowering (`--precision bf16|fp16|fp8`), run after [`optimize`];
//! - [`mlir`] (feature `mlir`): MLIR code generation through melior (CPU JIT, GPU PTX);
//! - [`dce`]: dead-code elimination and common-subexpression elimination, the clean-up every
//!   rewrite stage ends with.

pub mod cost;
pub mod dce;
pub mod egraph;
#[cfg(feature = "mlir")]
pub mod mlir;
pub mod pipeline;
pub mod precision;
pub mod rules;
#[cfg(test)]
mod testutil;

pub use cost::Target;
pub use pipeline::{optimize, Limits, Report};
pub use precision::{lower_precision, Precision, PrecisionError};

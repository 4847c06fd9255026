//! kiln's compiler: passes that rewrite verified IR graphs into faster equivalent graphs.
//!
//! - [`pipeline`]: the pass manager ([`optimize`]) with per-pass reports and limits;
//! - [`egraph`]: graphs as `egg` e-graphs (language, type/constant analysis, extraction);
//! - [`cost`]: the roofline cost model and the [`Target`] table;
//! - [`rules`]: the rewrite rule sets;
//! - [`dce`]: dead-code elimination and common-subexpression elimination, the clean-up every
//!   rewrite stage ends with.

pub mod cost;
pub mod dce;
pub mod egraph;
pub mod pipeline;
pub mod rules;
#[cfg(test)]
mod testutil;

pub use cost::Target;
pub use pipeline::{optimize, Limits, Report};

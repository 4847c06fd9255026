//! kiln's compiler: passes that rewrite verified IR graphs into faster equivalent graphs.
//!
//! - [`dce`]: dead-code elimination and common-subexpression elimination, the clean-up every
//!   rewrite stage ends with.

pub mod dce;

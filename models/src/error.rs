//! Errors from tracing a model: a shape or dtype error in an op, or a graph failing verification.

use kiln_ir::{OpError, VerifyError};

/// Tracing a model failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// An op rejected its operands (the message names the op and the operand types).
    #[error("tracing failed: {0}")]
    Op(#[from] OpError),
    /// The traced graph is ill-formed.
    #[error("traced graph is invalid: {0}")]
    Verify(#[from] VerifyError),
}

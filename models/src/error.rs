//! Errors from reading a model's configuration and tracing it.

use kiln_ir::{OpError, VerifyError};
use std::path::PathBuf;

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

/// A model directory or configuration that kiln cannot use, or a failed trace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// A required file is absent from the model directory.
    #[error("{} has no {file}: {hint}", dir.display())]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// The file that is missing.
        file: String,
        /// What the file is for / what to do.
        hint: String,
    },
    /// A JSON file is malformed or lacks a required key.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The config's `model_type` is not one kiln supports.
    #[error("{}: model_type {found:?} is not supported (kiln supports: {})", path.display(), supported.join(", "))]
    UnknownModelType {
        /// config.json.
        path: PathBuf,
        /// The model_type found.
        found: String,
        /// Supported model types.
        supported: Vec<String>,
    },
    /// The config asks for something kiln does not implement.
    #[error("{}: {message}", path.display())]
    Unsupported {
        /// config.json.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
    /// Tracing the model failed.
    #[error(transparent)]
    Trace(#[from] TraceError),
}

impl From<OpError> for ModelError {
    fn from(e: OpError) -> Self {
        ModelError::Trace(TraceError::Op(e))
    }
}

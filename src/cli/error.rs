//! The CLI's error type: bad input (exit 2) versus internal failures (exit 1).

/// An error that ends a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The user's files or flags are wrong; exit code 2.
    #[error("{0}")]
    Input(String),
    /// kiln failed on valid input; exit code 1.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Internal(_) => 1,
        }
    }

    /// Wraps a user-input error with context.
    pub fn input(context: impl std::fmt::Display, e: impl std::fmt::Display) -> CliError {
        CliError::Input(format!("{context}: {e}"))
    }
}

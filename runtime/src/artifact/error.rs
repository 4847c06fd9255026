//! Why an artifact could not be written, read or used. Every check of the reader has its own
//! message; none of them panics.

use std::path::PathBuf;

/// An artifact error.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the artifact magic number.
    #[error("{origin} is not a kiln artifact (it does not start with kiln's magic number; compile one with `kiln compile`)")]
    BadMagic {
        /// The file.
        origin: String,
    },
    /// The file is shorter than its header says (or than a header).
    #[error("{origin} is truncated: it has {actual} bytes but needs {expected}")]
    Truncated {
        /// The file.
        origin: String,
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The file is longer than its header says.
    #[error("{origin} has {actual} bytes but its header says {expected}: trailing data")]
    TrailingData {
        /// The file.
        origin: String,
        /// Bytes the header claims.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// A format version this build does not read.
    #[error("{origin} has artifact format version {found}; this build of kiln reads version {supported} only (recompile it with this kiln)")]
    Version {
        /// The file.
        origin: String,
        /// The file's version.
        found: u32,
        /// This build's version.
        supported: u32,
    },
    /// The header or the section table does not match its checksum.
    #[error("{origin}: the {what} is corrupt (checksum mismatch)")]
    HeaderChecksum {
        /// The file.
        origin: String,
        /// `header` or `section table`.
        what: &'static str,
    },
    /// A section's bytes do not match their checksum.
    #[error("{origin}: section {index} ({kind}) is corrupt: checksum {actual:016x}, expected {expected:016x}")]
    Checksum {
        /// The file.
        origin: String,
        /// The section's index in the table.
        index: usize,
        /// Its kind.
        kind: &'static str,
        /// The stored checksum.
        expected: u64,
        /// The checksum of the bytes read.
        actual: u64,
    },
    /// A size or offset in the file is impossible (past the end of the file, overflowing,
    /// overlapping, too many sections).
    #[error("{origin}: {message}")]
    Bounds {
        /// The file.
        origin: String,
        /// What is impossible.
        message: String,
    },
    /// The file's structure or contents are invalid (unknown or missing sections, bad UTF-8 or
    /// JSON, a graph that does not parse, a weight index that disagrees with its bytes).
    #[error("{origin}: {message}")]
    Malformed {
        /// The file.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The artifact was compiled for a target this machine or build cannot run.
    #[error("{origin} was compiled for target {target}, but this runtime runs on {host} only; recompile it with `kiln compile --target {host}`")]
    WrongTarget {
        /// The file.
        origin: String,
        /// The artifact's target.
        target: String,
        /// What this runtime runs.
        host: &'static str,
    },
    /// The artifact's execution plan is not the one this runtime derives from its graphs.
    #[error("{origin} was compiled by kiln {version} with an execution plan this runtime does not reproduce: {difference}; recompile it with this kiln")]
    PlanMismatch {
        /// The file.
        origin: String,
        /// The kiln version that wrote it.
        version: String,
        /// The first difference.
        difference: String,
    },
    /// Something given to the writer cannot be stored.
    #[error("cannot write the artifact: {0}")]
    Write(String),
}

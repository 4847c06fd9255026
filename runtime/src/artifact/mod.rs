//! Ahead-of-time artifacts: one file holding a compiled model (its optimized graphs, its
//! weights already converted to the target precision, its tokenizer, generation config and
//! settings), written by `kiln compile` and loaded with this crate alone.
//!
//! - [`format`]: the layout (header, section table, sections) and its constants;
//! - [`write`]: the writer ([`write::to_bytes`]), deterministic byte for byte;
//! - [`read`]: the checking reader ([`Artifact::open`]), which refuses a bad file with an
//!   [`ArtifactError`] and never panics;
//! - [`checksum`]: the per-section checksum (XXH3-64); `codec`: tensors to and from little-endian
//!   bytes; `packed`: weights stored in the kernels' packed layout (which, and borrowing them);
//!   `tokenizer`: `tokenizer.json` in the shape that parses fastest;
//! - [`plan`]: the CPU execution and memory plans, recorded by the writer and checked by the
//!   reader against its own;
//! - [`mlir`]: the kernels' MLIR an artifact may carry (`kiln compile --emit-mlir`), as text;
//! - [`WeightCheck`]: the weight data's checksum, computed in the background while the model
//!   starts (its outputs wait for it).
//!
//! [`crate::deploy::Model::open`] turns an artifact into a model ready to generate or embed.

mod check;
pub mod checksum;
mod codec;
mod error;
pub mod format;
pub mod mlir;
mod packed;
pub mod plan;
pub mod read;
pub(crate) mod tokenizer;
pub mod write;

pub use check::WeightCheck;
pub use error::ArtifactError;
pub use format::{Manifest, Packing, Section, SectionKind, WeightEntry};
pub use mlir::{CarriedKernel, MlirRecord};
pub use plan::PlanRecord;
pub use read::Artifact;

/// Recomputes every checksum of an artifact's bytes (header, table and sections) after the
/// caller changed them, so that its other checks can be exercised (tests, fuzzing). Does
/// nothing to bytes too short or too broken to have a table.
pub fn reseal(bytes: &mut [u8]) {
    use format::{ENTRY_LEN, HEADER_LEN};
    if bytes.len() < HEADER_LEN {
        return;
    }
    let count = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    let table_end = HEADER_LEN + ENTRY_LEN * count.min(format::MAX_SECTIONS as usize);
    if table_end > bytes.len() {
        return;
    }
    for e in (HEADER_LEN..table_end).step_by(ENTRY_LEN) {
        let field = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[e + at..e + at + 8]);
            u64::from_le_bytes(a)
        };
        let (off, len) = (field(8), field(16));
        let Some(end) = off
            .checked_add(len)
            .filter(|&end| end <= bytes.len() as u64)
        else {
            continue;
        };
        let c = checksum::xxh3(&bytes[off as usize..end as usize]);
        bytes[e + 24..e + 32].copy_from_slice(&c.to_le_bytes());
    }
    let t = checksum::xxh3(&bytes[HEADER_LEN..table_end]);
    bytes[24..32].copy_from_slice(&t.to_le_bytes());
    let h = checksum::xxh3(&bytes[..32]);
    bytes[32..40].copy_from_slice(&h.to_le_bytes());
}

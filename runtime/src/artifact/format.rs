//! The artifact file layout, shared by the writer and the reader.
//!
//! ```text
//! 0   header (64 bytes, little-endian)
//!       0..8    magic  89 'K' 'I' 'L' 'N' 0D 0A 1A
//!       8..12   format version (u32)
//!      12..16   number of sections (u32, at most MAX_SECTIONS)
//!      16..24   length of the whole file (u64)
//!      24..32   XXH3-64 of the section table
//!      32..40   XXH3-64 of bytes 0..32
//!      40..64   zero
//! 64  section table: one 32-byte entry per section
//!       kind (u32), 0 (u32), offset (u64), length (u64), XXH3-64 of the bytes (u64)
//!     sections, in table order, each at a multiple of 64 bytes, zero padding between
//! ```
//!
//! Sections: one [`Manifest`] (JSON: versions, target, precision, limits, graph names, the
//! model's [`ModelInfo`]), one IR graph per name in the manifest (kiln's text format, which
//! round-trips exactly), optionally `tokenizer.json` and `generation_config.json` (their
//! bytes), the weight index (JSON list of [`WeightEntry`], sorted by offset), the weight data
//! (each tensor's raw little-endian elements at a 64-byte aligned offset; `bool` as bytes
//! 0/1; fp8 as bit patterns). For a CPU target, a bf16 weight that the CPU plan reads only
//! through linear layers is stored instead in the kernels' packed layout ([`Packing`]: the
//! little-endian `u32` words of `kiln_kernels::gemm_bf16::PackedBf16`), once per orientation
//! read, so that the loader hands those words to the kernels in place. Last, for a CPU target,
//! the execution and memory plan of each graph ([`super::plan`]); and, when compiled with
//! `--emit-mlir`, the kernels' MLIR ([`super::mlir`]). That last section is optional and
//! additive: a file without it is laid out exactly as before it existed, so the format version
//! stayed 4 (a reader older than the section refuses a file holding it as "unknown kind 8"; readers
//! since say which kinds they read and that a newer kiln may have written the file).

use crate::info::ModelInfo;
use serde::{Deserialize, Serialize};

/// The first bytes of every artifact (PNG-style: detects text-mode transfers).
pub const MAGIC: [u8; 8] = *b"\x89KILN\r\n\x1a";
/// The format version this build reads and writes (4: the CPU plan section; 3 added packed
/// weights; 2 stored every weight plain; 1 used XXH64 checksums).
pub const FORMAT_VERSION: u32 = 4;
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Bytes of one section-table entry.
pub const ENTRY_LEN: usize = 32;
/// Alignment of every section and of every tensor inside the weight data.
pub const ALIGN: u64 = 64;
/// The most sections a file may have.
pub const MAX_SECTIONS: u32 = 64;
/// The only target this build's runtime runs.
pub const HOST_TARGET: &str = "cpu";

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    /// The [`Manifest`] (JSON).
    Manifest,
    /// One IR graph (text format).
    Graph,
    /// `tokenizer.json`.
    Tokenizer,
    /// `generation_config.json`.
    GenerationConfig,
    /// The weight index (JSON).
    WeightIndex,
    /// The weights' bytes.
    WeightData,
    /// The CPU execution and memory plans ([`super::plan::PlanRecord`], JSON).
    Plan,
    /// The kernels' MLIR, optional ([`super::mlir::MlirRecord`], JSON).
    Mlir,
}

impl SectionKind {
    /// Every kind with its code in the section table.
    pub const ALL: [(u32, SectionKind); 8] = [
        (1, SectionKind::Manifest),
        (2, SectionKind::Graph),
        (3, SectionKind::Tokenizer),
        (4, SectionKind::GenerationConfig),
        (5, SectionKind::WeightIndex),
        (6, SectionKind::WeightData),
        (7, SectionKind::Plan),
        (8, SectionKind::Mlir),
    ];

    /// The kind with this code.
    pub fn from_code(code: u32) -> Option<SectionKind> {
        Self::ALL.iter().find(|(c, _)| *c == code).map(|&(_, k)| k)
    }

    /// Its code in the section table.
    pub fn code(self) -> u32 {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or(0, |&(c, _)| c)
    }

    /// A short name for messages and `kiln inspect`.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Manifest => "manifest",
            SectionKind::Graph => "graph",
            SectionKind::Tokenizer => "tokenizer",
            SectionKind::GenerationConfig => "generation_config",
            SectionKind::WeightIndex => "weight_index",
            SectionKind::WeightData => "weight_data",
            SectionKind::Plan => "plan",
            SectionKind::Mlir => "mlir",
        }
    }
}

/// One section-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// What it holds.
    pub kind: SectionKind,
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// XXH3-64 of its bytes.
    pub hash: u64,
}

/// The artifact's description of itself and of its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The kiln version that wrote it.
    pub kiln_version: String,
    /// The target it was compiled for (`cpu`, `cuda:sm_90`, ...).
    pub target: String,
    /// The precision it was lowered to (`f32`, `bf16`, `fp8`, ...).
    pub precision: String,
    /// The longest sequence it accepts, when limited at compile time.
    pub max_seq: Option<usize>,
    /// The largest batch it accepts, when limited at compile time.
    pub max_batch: Option<usize>,
    /// The graph sections' names in order: `prefill`, `decode` (causal LMs) or `encoder`.
    pub graphs: Vec<String>,
    /// The model's settings.
    pub model: ModelInfo,
}

/// Where one tensor lies in the weight data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightEntry {
    /// The parameter's name.
    pub name: String,
    /// Its element type (the IR's name, e.g. `f32`).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Offset in the weight data section (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Bytes (elements × element size; packed: the packed words' bytes).
    pub len: u64,
    /// Absent: the elements, row-major. Present: the tensor packed for the linear kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<Packing>,
}

/// How a packed weight is laid out: `kiln_kernels::gemm_bf16::PackedBf16`'s words for a bf16
/// 2-D tensor (`dtype` and `shape` of the [`WeightEntry`] are the tensor's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packing {
    /// The layout's name (`kiln_kernels::gemm_bf16::LAYOUT`).
    pub layout: String,
    /// Packed from the tensor as stored, `[n, k]` (a matmul with `transpose_b`), or from its
    /// transpose, for a tensor stored `[k, n]`.
    pub transposed: bool,
}

/// `n` rounded up to a multiple of [`ALIGN`], or `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGN - 1).map(|x| x / ALIGN * ALIGN)
}

/// Whether this runtime runs `target`: the CPU targets (`cpu`, `cpu-...`), whose graphs the
/// host executor runs on any x86-64 or ARM machine.
pub fn runs_here(target: &str) -> bool {
    target == HOST_TARGET
        || target
            .strip_prefix(HOST_TARGET)
            .is_some_and(|r| r.starts_with('-'))
}

/// The graph names a model with this head has, in order.
pub fn graph_names(causal: bool) -> &'static [&'static str] {
    if causal {
        &["prefill", "decode"]
    } else {
        &["encoder"]
    }
}

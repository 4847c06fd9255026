//! Reading an artifact, checking everything before trusting it: the magic number, the format
//! version, the header's and the table's checksums, the file length, every section's bounds,
//! alignment and checksum, the JSON and UTF-8 of the text sections, the graphs (parsed and
//! verified), the recorded CPU plan against the one this runtime derives, the weight index
//! against its bytes and against the graphs' parameters, the shape of the optional MLIR
//! section ([`super::mlir`]), and the target. Nothing is allocated
//! beyond what the file's own length justifies.
//!
//! The file is memory-mapped and the weights are used in place from the map (every tensor is
//! 64-byte aligned in the file), packed ones too (handed to the kernels as they are, after
//! checking their layout, size and padding): opening copies no weight. The weight data's checksum is
//! computed on its own thread meanwhile ([`WeightCheck`]); [`Artifact::verify`] waits for it.
//! The tokenizer is parsed on another, from the start.

use super::check::WeightCheck;
use super::checksum::xxh3;
use super::codec;
use super::format::{
    graph_names, runs_here, Manifest, Section, SectionKind, WeightEntry, ALIGN, ENTRY_LEN,
    FORMAT_VERSION, HEADER_LEN, HOST_TARGET, MAGIC, MAX_SECTIONS,
};
use super::mlir::MlirRecord;
use super::packed;
use super::plan::PlanRecord;
use super::ArtifactError;
use crate::background::Background;
use crate::deploy::parse_tokenizer;
use crate::info::{Assets, Head};
use crate::tensor::SharedBytes;
use crate::{Params, Tensor};
use kiln_ir::{DType, Graph};
use kiln_kernels::gemm_bf16::{PackedBf16, LAYOUT};
use std::collections::BTreeMap;
use std::ops::Range;
use tokenizers::Tokenizer;

/// A checked artifact, with its weights used in place from its bytes.
#[derive(Debug)]
pub struct Artifact {
    /// The file it came from (for messages).
    pub origin: String,
    /// Its length in bytes.
    pub file_len: u64,
    /// The section table.
    pub sections: Vec<Section>,
    /// The manifest.
    pub manifest: Manifest,
    /// The graphs, in the manifest's order.
    pub graphs: Vec<Graph>,
    /// The weight index.
    pub weights: Vec<WeightEntry>,
    /// The CPU execution and memory plans, as recorded (and found equal to this runtime's).
    pub plan: PlanRecord,
    /// The kernels' MLIR, when compiled with `--emit-mlir` (its shape checked, its modules
    /// opaque text here).
    pub mlir: Option<MlirRecord>,
    /// The weights, borrowing the artifact's bytes. Their checksum may still be being computed:
    /// call [`Artifact::verify`] before trusting anything computed from them.
    pub params: Params,
    /// The tokenizer and generation config.
    pub assets: Assets,
    /// The weight data's checksum (handed to the models built from the artifact).
    pub(crate) check: WeightCheck,
    /// The tokenizer, being parsed (handed to the models built from the artifact).
    pub(crate) tokenizer: Background<Option<Tokenizer>>,
}

struct Reader<'o> {
    bytes: &'o [u8],
    origin: &'o str,
    file_len: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl<'o> Reader<'o> {
    fn malformed(&self, message: impl Into<String>) -> ArtifactError {
        ArtifactError::Malformed {
            origin: self.origin.to_string(),
            message: message.into(),
        }
    }

    fn bounds(&self, message: impl Into<String>) -> ArtifactError {
        ArtifactError::Bounds {
            origin: self.origin.to_string(),
            message: message.into(),
        }
    }

    /// The bytes of a section, whose bounds `table` checked.
    fn range(&self, s: &Section) -> Result<Range<usize>, ArtifactError> {
        let start = usize::try_from(s.offset).map_err(|_| self.bounds("section too large"))?;
        let len = usize::try_from(s.len).map_err(|_| self.bounds("section too large"))?;
        Ok(start..start + len)
    }

    /// The header and section table, checked.
    fn table(&self) -> Result<Vec<Section>, ArtifactError> {
        let origin = self.origin.to_string();
        let head = &self.bytes[..self.bytes.len().min(HEADER_LEN)];
        let have = head.len();
        if have < MAGIC.len() || head[..MAGIC.len()] != MAGIC {
            return Err(ArtifactError::BadMagic { origin });
        }
        if have < HEADER_LEN {
            return Err(ArtifactError::Truncated {
                origin,
                expected: HEADER_LEN as u64,
                actual: self.file_len,
            });
        }
        let version = u32_at(head, 8);
        if version != FORMAT_VERSION {
            return Err(ArtifactError::Version {
                origin,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if xxh3(&head[..32]) != u64_at(head, 32) || head[40..].iter().any(|&b| b != 0) {
            return Err(ArtifactError::HeaderChecksum {
                origin,
                what: "header",
            });
        }
        let claimed = u64_at(head, 16);
        if claimed > self.file_len {
            return Err(ArtifactError::Truncated {
                origin,
                expected: claimed,
                actual: self.file_len,
            });
        }
        if claimed < self.file_len {
            return Err(ArtifactError::TrailingData {
                origin,
                expected: claimed,
                actual: self.file_len,
            });
        }
        let count = u32_at(head, 12);
        if count > MAX_SECTIONS {
            return Err(self.bounds(format!(
                "the header claims {count} sections; an artifact has at most {MAX_SECTIONS}"
            )));
        }
        let table_end = (HEADER_LEN + ENTRY_LEN * count as usize) as u64;
        if table_end > self.file_len {
            return Err(ArtifactError::Truncated {
                origin,
                expected: table_end,
                actual: self.file_len,
            });
        }
        let raw = &self.bytes[HEADER_LEN..table_end as usize];
        if xxh3(raw) != u64_at(head, 24) {
            return Err(ArtifactError::HeaderChecksum {
                origin,
                what: "section table",
            });
        }
        let mut sections = Vec::with_capacity(count as usize);
        let mut prev_end = table_end;
        for (i, e) in raw.chunks_exact(ENTRY_LEN).enumerate() {
            let code = u32_at(e, 0);
            let kind = SectionKind::from_code(code).ok_or_else(|| {
                self.malformed(format!(
                    "section {i} has unknown kind {code}: this kiln ({}) reads kinds 1–{}, so a \
                     newer kiln may have written it; compile the model again with this kiln, or \
                     update kiln",
                    env!("CARGO_PKG_VERSION"),
                    SectionKind::ALL.len()
                ))
            })?;
            if u32_at(e, 4) != 0 {
                return Err(self.malformed(format!("section {i}: reserved fields are not zero")));
            }
            let (offset, len) = (u64_at(e, 8), u64_at(e, 16));
            let end = offset.checked_add(len).ok_or_else(|| {
                self.bounds(format!(
                    "section {i} ({}) claims {len} bytes at offset {offset}: overflow",
                    kind.name()
                ))
            })?;
            if end > self.file_len {
                return Err(self.bounds(format!(
                    "section {i} ({}) claims bytes {offset}..{end}, past the end of the file ({} bytes)",
                    kind.name(),
                    self.file_len
                )));
            }
            if offset % ALIGN != 0 || offset < prev_end {
                return Err(self.bounds(format!(
                    "section {i} ({}) at offset {offset} is misaligned or overlaps what precedes it",
                    kind.name()
                )));
            }
            prev_end = end;
            sections.push(Section {
                kind,
                offset,
                len,
                hash: u64_at(e, 24),
            });
        }
        Ok(sections)
    }

    /// A whole section's bytes, checksum checked.
    fn section(&self, index: usize, s: &Section) -> Result<&'o [u8], ArtifactError> {
        let bytes = &self.bytes[self.range(s)?];
        let actual = xxh3(bytes);
        if actual != s.hash {
            return Err(ArtifactError::Checksum {
                origin: self.origin.to_string(),
                index,
                kind: s.kind.name(),
                expected: s.hash,
                actual,
            });
        }
        Ok(bytes)
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        index: usize,
        s: &Section,
    ) -> Result<T, ArtifactError> {
        let bytes = self.section(index, s)?;
        serde_json::from_slice(bytes)
            .map_err(|e| self.malformed(format!("section {index} ({}): {e}", s.kind.name())))
    }

    /// The weight index, checked against the data section's length: each tensor stored once,
    /// plain or packed (in one or both orientations, which agree on its dtype and shape).
    fn check_index(&self, index: &[WeightEntry], data_len: u64) -> Result<(), ArtifactError> {
        let mut stored: BTreeMap<&str, (&WeightEntry, [bool; 3])> = BTreeMap::new();
        let mut prev_end = 0u64;
        for w in index {
            let bad = |m: String| self.malformed(format!("weight {:?}: {m}", w.name));
            let form = w.packed.as_ref().map_or(2, |p| usize::from(p.transposed));
            let (first, forms) = stored.entry(&w.name).or_insert((w, [false; 3]));
            if forms[form] || (form == 2) != (first.packed.is_none()) {
                return Err(bad("listed twice".into()));
            }
            forms[form] = true;
            if (&first.dtype, &first.shape) != (&w.dtype, &w.shape) {
                return Err(bad(format!(
                    "packed as {} {:?} and as {} {:?}",
                    first.dtype, first.shape, w.dtype, w.shape
                )));
            }
            let dtype: DType = w
                .dtype
                .parse()
                .map_err(|_| bad(format!("unknown dtype {:?}", w.dtype)))?;
            let bytes = match &w.packed {
                None => w
                    .shape
                    .iter()
                    .try_fold(dtype.size_bytes() as u64, |n, &d| n.checked_mul(d as u64)),
                Some(p) => {
                    if p.layout != LAYOUT {
                        return Err(bad(format!(
                            "packed in layout {:?}; this build packs {LAYOUT:?} (recompile the artifact with this kiln)",
                            p.layout
                        )));
                    }
                    let (n, k) = packed_dims(dtype, &w.shape, p.transposed).ok_or_else(|| {
                        bad(format!(
                            "a packed {} {:?} tensor: only 2-D bf16 tensors are packed",
                            w.dtype, w.shape
                        ))
                    })?;
                    PackedBf16::words_for(n, k).and_then(|x| (x as u64).checked_mul(4))
                }
            };
            if bytes != Some(w.len) {
                return Err(bad(format!(
                    "{} bytes do not hold a {} tensor of shape {:?}{}",
                    w.len,
                    w.dtype,
                    w.shape,
                    if w.packed.is_some() { ", packed" } else { "" }
                )));
            }
            let end = w.offset.checked_add(w.len);
            if w.offset % ALIGN != 0 || w.offset < prev_end || end.is_none_or(|e| e > data_len) {
                return Err(self.bounds(format!(
                    "weight {:?} claims {} bytes at offset {} of the {data_len}-byte weight data: misaligned, overlapping or out of bounds",
                    w.name, w.len, w.offset
                )));
            }
            prev_end = end.unwrap_or(data_len);
        }
        Ok(())
    }

    /// The weights, borrowing `shared` (whose bytes these are) where they can: every dtype
    /// but bool, on a little-endian host, packed weights too; the others are decoded into owned
    /// tensors. The index was checked against the section (`check_index`).
    fn weights(
        &self,
        shared: &SharedBytes,
        s: &Section,
        index: &[WeightEntry],
    ) -> Result<Params, ArtifactError> {
        let data = self.range(s)?;
        let mut params = Params::with_capacity(index.len());
        let mut packed: BTreeMap<&str, (&WeightEntry, [Option<PackedBf16>; 2])> = BTreeMap::new();
        for w in index {
            let dtype: DType = w.dtype.parse().map_err(|_| self.malformed("dtype"))?;
            // In bounds of the section (checked by `check_index`), hence of the file.
            let start = data.start + w.offset as usize;
            let range = start..start + w.len as usize;
            let bad = |m: String| self.malformed(format!("weight {:?}: {m}", w.name));
            if let Some(p) = &w.packed {
                let (n, k) = packed_dims(dtype, &w.shape, p.transposed)
                    .ok_or_else(|| bad("not packable".into()))?;
                let form = packed::borrow(shared, range, n, k).map_err(|e| bad(e.to_string()))?;
                packed.entry(&w.name).or_insert((w, [None, None])).1[usize::from(p.transposed)] =
                    Some(form);
                continue;
            }
            let t = if dtype == DType::Bool || cfg!(target_endian = "big") {
                codec::decode(dtype, w.shape.clone(), &self.bytes[range]).map_err(bad)?
            } else {
                Tensor::borrowed(dtype, w.shape.clone(), shared, range)
                    .map_err(|e| bad(e.to_string()))?
            };
            params.insert(w.name.clone(), t);
        }
        for (name, (w, forms)) in packed {
            let t = Tensor::packed(w.shape.clone(), forms)
                .map_err(|e| self.malformed(format!("weight {name:?}: {e}")))?;
            params.insert(name.to_string(), t);
        }
        Ok(params)
    }
}

/// The `(n, k)` of the packed matrix of a 2-D bf16 tensor of `shape`, stored `[n, k]`
/// (`transposed`) or `[k, n]`; `None` for other tensors.
fn packed_dims(dtype: DType, shape: &[usize], transposed: bool) -> Option<(usize, usize)> {
    match (dtype, shape) {
        (DType::BF16, &[rows, cols]) if transposed => Some((rows, cols)),
        (DType::BF16, &[rows, cols]) => Some((cols, rows)),
        _ => None,
    }
}

/// Checks that every parameter of every graph has a tensor of its dtype and shape.
fn check_params(graphs: &[Graph], names: &[String], index: &[WeightEntry]) -> Result<(), String> {
    for (g, gname) in graphs.iter().zip(names) {
        for (name, _, ty) in g.params() {
            let w = index
                .iter()
                .find(|w| w.name == name)
                .ok_or_else(|| format!("the {gname} graph's parameter {name:?} has no weight"))?;
            let shape: Option<Vec<usize>> = ty
                .shape
                .iter()
                .map(|d| d.as_fixed().and_then(|n| usize::try_from(n).ok()))
                .collect();
            if w.dtype != ty.dtype.name() || shape.as_deref() != Some(&w.shape[..]) {
                return Err(format!(
                    "weight {name:?} is {} {:?}, but the {gname} graph declares {ty}",
                    w.dtype, w.shape
                ));
            }
        }
    }
    Ok(())
}

impl Artifact {
    /// Opens and checks the artifact at `path`, memory-mapping it and using its weights in place.
    /// The weight data's checksum is computed in the background: [`Artifact::verify`] (and the
    /// models made by [`Artifact::into_model`], before their first output) wait for it.
    pub fn open(path: &std::path::Path) -> Result<Artifact, ArtifactError> {
        let io = |source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let bytes = SharedBytes::map(&file).map_err(io)?;
        Artifact::parse(bytes, &path.display().to_string())
    }

    /// Checks an artifact held in memory (`origin` names it in messages), completely: the weight
    /// data's checksum too (its bytes are copied once, aligned, for the weights to borrow).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Artifact, ArtifactError> {
        let art = Artifact::parse(SharedBytes::copy_of(bytes), origin)?;
        art.verify()?;
        Ok(art)
    }

    /// The kernels' MLIR the artifact carries (`kiln compile --emit-mlir`), if any.
    pub fn mlir(&self) -> Option<&MlirRecord> {
        self.mlir.as_ref()
    }

    /// Waits for the weight data's checksum and compares it with the section table's:
    /// [`ArtifactError::Checksum`] if any weight byte is corrupt.
    pub fn verify(&self) -> Result<(), ArtifactError> {
        self.check.wait()
    }

    /// Checks the artifact `shared` and borrows its weights, starting their checksum.
    fn parse(shared: SharedBytes, origin: &str) -> Result<Artifact, ArtifactError> {
        let bytes = shared.as_slice();
        let file_len = bytes.len() as u64;
        let rd = Reader {
            bytes,
            origin,
            file_len,
        };
        let sections = rd.table()?;
        let find = |kind: SectionKind| -> Vec<usize> {
            (0..sections.len())
                .filter(|&i| sections[i].kind == kind)
                .collect()
        };
        let one = |rd: &Reader<'_>,
                   kind: SectionKind,
                   optional: bool|
         -> Result<Option<usize>, ArtifactError> {
            match find(kind)[..] {
                [] if optional => Ok(None),
                [i] => Ok(Some(i)),
                [] => Err(rd.malformed(format!("no {} section", kind.name()))),
                _ => Err(rd.malformed(format!("more than one {} section", kind.name()))),
            }
        };
        let (Some(mi), Some(ii), Some(di)) = (
            one(&rd, SectionKind::Manifest, false)?,
            one(&rd, SectionKind::WeightIndex, false)?,
            one(&rd, SectionKind::WeightData, false)?,
        ) else {
            return Err(rd.malformed("missing sections"));
        };
        let data = &sections[di];
        let check = WeightCheck::start(
            shared.clone(),
            rd.range(data)?,
            origin,
            di,
            data.kind.name(),
            data.hash,
        );
        let text_asset = |kind| -> Result<Option<Vec<u8>>, ArtifactError> {
            match one(&rd, kind, true)? {
                Some(i) => Ok(Some(rd.section(i, &sections[i])?.to_vec())),
                None => Ok(None),
            }
        };
        let assets = Assets {
            origin: origin.to_string(),
            tokenizer_json: text_asset(SectionKind::Tokenizer)?,
            generation_config_json: text_asset(SectionKind::GenerationConfig)?,
        };
        let tokenizer = parse_tokenizer(&assets);
        let manifest: Manifest = rd.json(mi, &sections[mi])?;
        if !runs_here(&manifest.target) {
            return Err(ArtifactError::WrongTarget {
                origin: origin.to_string(),
                target: manifest.target,
                host: HOST_TARGET,
            });
        }
        let expected = graph_names(manifest.model.head == Head::CausalLm);
        if manifest.graphs != expected {
            return Err(rd.malformed(format!(
                "a {:?} model has graphs {expected:?}, the manifest lists {:?}",
                manifest.model.head, manifest.graphs
            )));
        }
        let graph_sections = find(SectionKind::Graph);
        if graph_sections.len() != expected.len() {
            return Err(rd.malformed(format!(
                "{} graph sections for the manifest's {} graphs",
                graph_sections.len(),
                expected.len()
            )));
        }
        let mut graphs = Vec::with_capacity(expected.len());
        for (&i, name) in graph_sections.iter().zip(expected) {
            let bytes = rd.section(i, &sections[i])?;
            let text = std::str::from_utf8(bytes)
                .map_err(|e| rd.malformed(format!("the {name} graph is not UTF-8: {e}")))?;
            let g = kiln_ir::text::parse(text)
                .map_err(|e| rd.malformed(format!("the {name} graph: {e}")))?;
            graphs.push(g);
        }
        let plan = match one(&rd, SectionKind::Plan, false)? {
            Some(pi) => rd.json::<PlanRecord>(pi, &sections[pi])?,
            None => return Err(rd.malformed("no plan section")),
        };
        // The graphs verified when parsed; plan them as the CPU backend will.
        if let Some(difference) = plan.difference(&PlanRecord::derive(&manifest.graphs, &graphs)) {
            return Err(ArtifactError::PlanMismatch {
                origin: origin.to_string(),
                version: manifest.kiln_version,
                difference,
            });
        }
        let mlir = match one(&rd, SectionKind::Mlir, true)? {
            Some(i) => {
                let m: MlirRecord = rd.json(i, &sections[i])?;
                if let Some(why) = m.problem() {
                    return Err(rd.malformed(format!("section {i} (mlir): {why}")));
                }
                Some(m)
            }
            None => None,
        };
        let weights: Vec<WeightEntry> = rd.json(ii, &sections[ii])?;
        rd.check_index(&weights, sections[di].len)?;
        check_params(&graphs, &manifest.graphs, &weights).map_err(|m| rd.malformed(m))?;
        let params = rd.weights(&shared, data, &weights)?;
        Ok(Artifact {
            origin: origin.to_string(),
            file_len,
            sections,
            manifest,
            graphs,
            weights,
            plan,
            mlir,
            params,
            assets,
            check,
            tokenizer,
        })
    }
}

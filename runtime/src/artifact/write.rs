//! Writing an artifact: the sections laid out as [`format`](super::format) describes, in a
//! fixed order and with sorted weights, so the same inputs always give the same bytes. For a
//! CPU target the runtime's own plan is recorded ([`super::plan`]) and the weights it reads
//! only packed are stored packed ([`super::packed`]), by the runtime's own packing code. The
//! kernels' MLIR ([`super::mlir`]), when the caller has it, comes last, sorted by key.

use super::checksum::xxh3;
use super::codec;
use super::format::{
    align_up, runs_here, Manifest, Packing, Section, SectionKind, WeightEntry, ALIGN, ENTRY_LEN,
    FORMAT_VERSION, HEADER_LEN, MAGIC,
};
use super::mlir::MlirRecord;
use super::packed::{append_words, packed_forms};
use super::plan::PlanRecord;
use super::tokenizer;
use super::ArtifactError;
use crate::cpu::weights::pack;
use crate::info::Assets;
use crate::Tensor;
use kiln_ir::Graph;
use kiln_kernels::gemm_bf16::LAYOUT;
use std::collections::BTreeMap;

/// The bytes of an artifact holding `manifest`, the graphs it names (in its order; verified),
/// the parameters (any map; written sorted by name, packed where the target's plan reads them
/// packed), the assets and, when given, the kernels' MLIR (last).
pub fn to_bytes<'a>(
    manifest: &Manifest,
    graphs: &[Graph],
    params: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    assets: &Assets,
    mlir: Option<&MlirRecord>,
) -> Result<Vec<u8>, ArtifactError> {
    let fail = |m: String| ArtifactError::Write(m);
    if graphs.len() != manifest.graphs.len() {
        return Err(fail(format!(
            "{} graphs for the {} names of the manifest",
            graphs.len(),
            manifest.graphs.len()
        )));
    }
    let params: BTreeMap<&String, &Tensor> = params.into_iter().collect();
    let packed = if runs_here(&manifest.target) {
        for g in graphs {
            kiln_ir::verify(g).map_err(|e| fail(format!("a graph does not verify: {e}")))?;
        }
        packed_forms(graphs, |name| {
            params.get(&name.to_string()).map(|t| t.dtype())
        })
    } else {
        BTreeMap::new()
    };
    let mut index = Vec::with_capacity(params.len());
    let mut data = Vec::new();
    for (name, t) in &params {
        let forms: Vec<Option<bool>> = match packed.get(*name) {
            Some(forms) => forms.iter().map(|&tr| Some(tr)).collect(),
            None => vec![None],
        };
        for transposed in forms {
            let offset = data.len() as u64;
            match transposed {
                Some(tr) => {
                    let packed = t.packed_form(tr).cloned().or_else(|| pack(t, tr));
                    let p = packed.ok_or_else(|| fail(format!("cannot pack {name:?}")))?;
                    append_words(&p, &mut data);
                }
                None => codec::append(t, &mut data),
            }
            index.push(WeightEntry {
                name: (*name).clone(),
                dtype: t.dtype().name().to_string(),
                shape: t.shape().to_vec(),
                offset,
                len: data.len() as u64 - offset,
                packed: transposed.map(|transposed| Packing {
                    layout: LAYOUT.to_string(),
                    transposed,
                }),
            });
            data.resize(data.len().next_multiple_of(ALIGN as usize), 0);
        }
    }
    let mut sections: Vec<(SectionKind, Vec<u8>)> = vec![(SectionKind::Manifest, json(manifest)?)];
    for g in graphs {
        sections.push((SectionKind::Graph, kiln_ir::text::print(g).into_bytes()));
    }
    if let Some(t) = &assets.tokenizer_json {
        sections.push((SectionKind::Tokenizer, tokenizer::for_artifact(t)));
    }
    if let Some(g) = &assets.generation_config_json {
        sections.push((SectionKind::GenerationConfig, g.clone()));
    }
    sections.push((SectionKind::WeightIndex, json(&index)?));
    sections.push((SectionKind::WeightData, data));
    if runs_here(&manifest.target) {
        let plan = PlanRecord::derive(&manifest.graphs, graphs);
        sections.push((SectionKind::Plan, json(&plan)?));
    }
    if let Some(m) = mlir {
        if let Some(why) = m.problem() {
            return Err(fail(format!("the MLIR section: {why}")));
        }
        sections.push((SectionKind::Mlir, json(m)?));
    }
    Ok(assemble(&sections))
}

/// Lays out the header, the table and the sections.
pub fn assemble(sections: &[(SectionKind, Vec<u8>)]) -> Vec<u8> {
    let table_end = (HEADER_LEN + ENTRY_LEN * sections.len()) as u64;
    let mut offset = align_up(table_end).unwrap_or(table_end);
    let mut table = Vec::with_capacity(sections.len());
    for (kind, bytes) in sections {
        table.push(Section {
            kind: *kind,
            offset,
            len: bytes.len() as u64,
            hash: xxh3(bytes),
        });
        offset = align_up(offset + bytes.len() as u64).unwrap_or(offset);
    }
    let file_len = table
        .last()
        .map_or(table_end, |s| s.offset + s.len)
        .max(table_end);
    let mut out = Vec::with_capacity(file_len as usize);
    out.extend_from_slice(&header(sections.len() as u32, file_len, &table));
    out.extend_from_slice(&table_bytes(&table));
    for (s, (_, bytes)) in table.iter().zip(sections) {
        out.resize(s.offset as usize, 0);
        out.extend_from_slice(bytes);
    }
    out
}

/// The section table's bytes.
pub fn table_bytes(table: &[Section]) -> Vec<u8> {
    let mut out = Vec::with_capacity(table.len() * ENTRY_LEN);
    for s in table {
        out.extend_from_slice(&s.kind.code().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&s.offset.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
        out.extend_from_slice(&s.hash.to_le_bytes());
    }
    out
}

/// The header for a file of `file_len` bytes with this table.
pub fn header(count: u32, file_len: u64, table: &[Section]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&count.to_le_bytes());
    h[16..24].copy_from_slice(&file_len.to_le_bytes());
    h[24..32].copy_from_slice(&xxh3(&table_bytes(table)).to_le_bytes());
    let own = xxh3(&h[0..32]);
    h[32..40].copy_from_slice(&own.to_le_bytes());
    h
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ArtifactError> {
    serde_json::to_vec(v).map_err(|e| ArtifactError::Write(e.to_string()))
}

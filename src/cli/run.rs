//! `kiln run --graph FILE --weights W.safetensors --inputs I.safetensors [--out O.safetensors]`:
//! runs a graph with the reference executor and summarizes (and optionally saves) its outputs.

use super::inspect::load_graph;
use super::CliError;
use kiln::runtime::reference;
use kiln::runtime::weights::{Checkpoint, Convert};
use kiln::runtime::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Runs the command.
pub fn run(
    graph: &Path,
    weights: &[PathBuf],
    inputs: Option<&Path>,
    out: Option<&Path>,
) -> Result<(), CliError> {
    let g = load_graph(graph)?;
    let params = if weights.is_empty() {
        HashMap::new()
    } else {
        let ckpt = Checkpoint::open_many(weights).map_err(|e| CliError::Input(e.to_string()))?;
        ckpt.bind(&g, Convert::Exact)
            .map_err(|e| CliError::Input(e.to_string()))?
    };
    let mut bound = HashMap::new();
    let wanted: Vec<String> = g
        .inputs()
        .map(|(n, _, ty)| format!("{n:?}: {ty}"))
        .collect();
    if inputs.is_none() && !wanted.is_empty() {
        return Err(CliError::Input(format!(
            "the graph has inputs {}; pass --inputs FILE.safetensors holding them",
            wanted.join(", ")
        )));
    }
    if let Some(path) = inputs {
        let file = Checkpoint::open(path).map_err(|e| CliError::Input(e.to_string()))?;
        for (name, _, _) in g.inputs() {
            let t = file
                .load(name)
                .map_err(|e| CliError::Input(e.to_string()))?;
            bound.insert(name.to_string(), t);
        }
    }
    let outputs =
        reference::run(&g, &bound, &params).map_err(|e| CliError::Input(e.to_string()))?;
    for o in g.outputs() {
        println!("{}: {}", o.name, describe(&outputs[&o.name]));
    }
    if let Some(path) = out {
        save_f32(path, &outputs)?;
    }
    Ok(())
}

/// `f32[2, 7, 64] min -3.1 max 4.2 mean 0.01`.
pub fn describe(t: &Tensor) -> String {
    let v = t.to_f64_vec();
    let (min, max) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    format!(
        "{}{:?} min {min:.6} max {max:.6} mean {mean:.6}",
        t.dtype(),
        t.shape()
    )
}

/// Writes every output, converted to f32, to one safetensors file.
pub fn save_f32(path: &Path, outputs: &HashMap<String, Tensor>) -> Result<(), CliError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = outputs
        .iter()
        .map(|(name, t)| {
            let data = t
                .to_f64_vec()
                .into_iter()
                .flat_map(|x| (x as f32).to_le_bytes())
                .collect();
            (name.clone(), t.shape().to_vec(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::Internal(e.to_string()))?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| CliError::input(path.display(), e))
}

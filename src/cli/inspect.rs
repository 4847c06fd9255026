//! `kiln inspect --graph FILE`: parse, verify and print an IR file with a summary.

use super::CliError;
use kiln::ir::{text, Graph, Op};
use std::collections::BTreeMap;
use std::path::Path;

/// Reads and parses an IR text file, with the path in any error.
pub fn load_graph(path: &Path) -> Result<Graph, CliError> {
    let src = std::fs::read_to_string(path).map_err(|e| CliError::input(path.display(), e))?;
    text::parse(&src).map_err(|e| CliError::input(path.display(), e))
}

/// A one-screen summary: ops by kind, inputs, parameters and their bytes, outputs.
pub fn summary(g: &Graph) -> String {
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for n in g.nodes() {
        if !matches!(n.op, Op::Input { .. } | Op::Param { .. }) {
            *ops.entry(n.op.name()).or_default() += 1;
        }
    }
    let mut param_bytes: i128 = 0;
    let mut symbolic_params = 0;
    for (_, _, ty) in g.params() {
        match ty.numel().as_fixed() {
            Some(n) => param_bytes += i128::from(n) * ty.dtype.size_bytes() as i128,
            None => symbolic_params += 1,
        }
    }
    let mut s = format!("nodes: {}\nops:", g.nodes().len());
    for (name, count) in &ops {
        s += &format!(" {name}×{count}");
    }
    s += "\ninputs:";
    for (name, _, ty) in g.inputs() {
        s += &format!(" {name:?}: {ty}");
    }
    s += &format!(
        "\nparameters: {} ({} bytes{})\noutputs:",
        g.params().count(),
        param_bytes,
        if symbolic_params > 0 {
            format!(", {symbolic_params} with symbolic shapes")
        } else {
            String::new()
        }
    );
    for o in g.outputs() {
        s += &format!(" {:?}: {}", o.name, g.ty(o.value));
    }
    s
}

/// Prints the graph in the text format followed by its summary.
pub fn inspect(path: &Path) -> Result<(), CliError> {
    let g = load_graph(path)?;
    print!("{}", text::print(&g));
    // The summary is printed as comments, so the whole output still parses as IR.
    for line in summary(&g).lines() {
        println!("# {line}");
    }
    Ok(())
}

/// Prints the traced graph(s) of a model directory (needs only config.json) with summaries.
pub fn inspect_model(dir: &Path) -> Result<(), CliError> {
    let dir = kiln::models::ModelDir::open(dir).map_err(|e| CliError::Input(e.to_string()))?;
    let graphs: Vec<(&str, Graph)> = if dir.config.head == kiln::models::Head::CausalLm {
        let g = kiln::load::causal_graphs(&dir).map_err(|e| CliError::Input(e.to_string()))?;
        vec![("prefill", g.prefill), ("decode", g.decode)]
    } else {
        let g = kiln::models::encoder::trace_encoder(&dir.config)
            .map_err(|e| CliError::Input(e.to_string()))?;
        vec![("encoder", g.graph)]
    };
    for (name, g) in graphs {
        println!(
            "# ==== {name} graph of {} ({})",
            dir.path.display(),
            dir.config.model_type
        );
        print!("{}", text::print(&g));
        for line in summary(&g).lines() {
            println!("# {line}");
        }
    }
    Ok(())
}

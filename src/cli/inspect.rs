//! `kiln inspect`: an IR file (parse, verify and print it with a summary), a model directory
//! (its traced and optimized graphs, or the optimizer's passes) or an artifact (its sections,
//! target, sizes and kernels).

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

/// The number of ops of `g` that become kernels, by kind. Excluded as free: inputs,
/// parameters, constants, reshapes, and the parts of a `packed_linear` (a slice selecting one
/// group's heads, [`kiln::ir::decompose::group_part`]), which every backend replaces by that
/// group's own result when it expands the packed op (no copy).
fn kernels(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for (v, n) in g.iter() {
        let free = matches!(
            n.op,
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. }
        );
        if !free && kiln::ir::decompose::group_part(g, v).is_none() {
            *counts.entry(n.op.name()).or_default() += 1;
        }
    }
    counts
}

/// The traced graphs of a model directory, named (`prefill`/`decode`, or `encoder`).
pub(super) fn traced(dir: &kiln::models::ModelDir) -> Result<Vec<(&'static str, Graph)>, CliError> {
    if dir.config.head == kiln::models::Head::CausalLm {
        let g = kiln::load::causal_graphs(dir).map_err(|e| CliError::Input(e.to_string()))?;
        Ok(vec![("prefill", g.prefill), ("decode", g.decode)])
    } else {
        let g = kiln::models::encoder::trace_encoder(&dir.config)
            .map_err(|e| CliError::Input(e.to_string()))?;
        Ok(vec![("encoder", g.graph)])
    }
}

/// Prints what an artifact holds: format and kiln versions, target, precision, limits, the
/// model's settings, the section table, the carried MLIR (kernels, bytes), the weights by dtype, each graph's IR kernels and its
/// CPU execution plan (kernel per computed node) as recorded in the file.
pub fn inspect_artifact(path: &Path) -> Result<(), CliError> {
    use kiln::runtime::artifact::{format::FORMAT_VERSION, Artifact};
    let art = Artifact::open(path).map_err(|e| CliError::Input(e.to_string()))?;
    art.verify().map_err(|e| CliError::Input(e.to_string()))?;
    let m = &art.manifest;
    println!("artifact: {} ({} bytes)", path.display(), art.file_len);
    println!(
        "format version {FORMAT_VERSION}, written by kiln {}",
        m.kiln_version
    );
    println!(
        "target: {}
precision: {}",
        m.target, m.precision
    );
    let limit = |l: Option<usize>| l.map_or("none".to_string(), |n| n.to_string());
    println!(
        "limits: max seq {}, max batch {}",
        limit(m.max_seq),
        limit(m.max_batch)
    );
    let info = &m.model;
    println!(
        "model: {} ({:?} head), vocabulary {}, {} layers, max positions {}, pooling {} (normalize {})",
        info.model_type,
        info.head,
        info.vocab_size,
        info.num_layers,
        limit(info.max_positions),
        info.pooling.mode.name(),
        info.pooling.normalize
    );
    println!("sections:");
    for (i, s) in art.sections.iter().enumerate() {
        println!(
            "  {i:>2} {:<18} offset {:>12} length {:>12} xxh3 {:016x}",
            s.kind.name(),
            s.offset,
            s.len,
            s.hash
        );
    }
    match art.mlir() {
        Some(r) => println!(
            "mlir: {} kernels, {} bytes of module text (`--emit mlir` prints them)",
            r.kernels.len(),
            r.text_bytes()
        ),
        None => println!("mlir: none (`kiln compile --emit-mlir` carries it)"),
    }
    let mut by_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for w in &art.weights {
        let packed = if w.packed.is_some() { " packed" } else { "" };
        let e = by_dtype.entry(format!("{}{packed}", w.dtype)).or_default();
        e.0 += 1;
        e.1 += w.len;
    }
    let list: Vec<String> = by_dtype
        .iter()
        .map(|(d, (n, b))| format!("{d}: {n} tensors, {b} bytes"))
        .collect();
    println!("weights: {}", list.join("; "));
    for (name, g) in m.graphs.iter().zip(&art.graphs) {
        let counts = kernels(g);
        let total: usize = counts.values().sum();
        let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        println!(
            "{name} graph: {} nodes, IR kernels: {total} ({})",
            g.nodes().len(),
            list.join(" ")
        );
    }
    for p in &art.plan.graphs {
        println!(
            "{} CPU plan: {} kernels ({}), {} activation buffers",
            p.name,
            p.kernels.len(),
            p.summary(),
            p.buffers
        );
        for k in &p.kernels {
            println!("  %{}: {}", k.node, k.kernel);
        }
    }
    Ok(())
}

/// Prints each graph of a model directory as it is right after the optimizer pass `pass`, at
/// f32 (where precision lowering, between the default and the lowered passes, changes nothing).
pub fn dump_ir(dir: &Path, pass: &str) -> Result<(), CliError> {
    use kiln::compiler::pipeline::{default_passes, lowered_passes, run_passes, Limits};
    let dir = kiln::models::ModelDir::open(dir).map_err(|e| CliError::Input(e.to_string()))?;
    let mut passes = default_passes();
    passes.extend(lowered_passes());
    let Some(last) = passes.iter().position(|p| p.name == pass) else {
        let names: Vec<&str> = passes.iter().map(|p| p.name).collect();
        return Err(CliError::Input(format!(
            "--dump-ir: no pass named {pass:?} (the passes are: {})",
            names.join(", ")
        )));
    };
    let target = kiln::load::LoadOptions::default().target;
    for (name, g) in traced(&dir)? {
        let (g, _) = run_passes(&g, &passes[..=last], &target, &Limits::default())
            .map_err(|e| CliError::Internal(e.to_string()))?;
        println!(
            "# ==== {name} graph of {} after pass {pass}",
            dir.path.display()
        );
        print!("{}", text::print(&g));
    }
    Ok(())
}

/// Prints the graph(s) of a model directory (needs only config.json): optimized unless
/// `optimize` is false and lowered to `precision`, with summaries; with `passes`, the optimizer's report instead of the IR
/// (`json`: one object per graph, `{"graph", "passes": [...], "kernels": {...}, "total_kernels"}`).
pub fn inspect_model(
    dir: &Path,
    passes: bool,
    json: bool,
    optimize: bool,
    precision: kiln::compiler::Precision,
) -> Result<(), CliError> {
    if kiln::load::is_artifact(dir) {
        if passes || !optimize || precision != kiln::compiler::Precision::F32 {
            return Err(CliError::Input(format!(
                "{} is an artifact: --passes, --no-optimize and --precision apply to model \
                 directories (the artifact's precision was chosen when it was compiled)",
                dir.display()
            )));
        }
        return inspect_artifact(dir);
    }
    let dir = kiln::models::ModelDir::open(dir).map_err(|e| CliError::Input(e.to_string()))?;
    let (names, traced): (Vec<&str>, Vec<Graph>) = traced(&dir)?.into_iter().unzip();
    let opts = kiln::load::LoadOptions {
        optimize,
        precision,
        ..Default::default()
    };
    let (graphs, reports) =
        kiln::load::prepare(traced, &opts).map_err(super::forward::load_error)?;
    for (i, (name, g)) in names.iter().zip(&graphs).enumerate() {
        let report = reports.get(i);
        let counts = kernels(g);
        let total: usize = counts.values().sum();
        if passes && json {
            let passes: Vec<serde_json::Value> = report
                .map(|r| {
                    r.passes
                        .iter()
                        .map(|p| {
                            serde_json::json!({"name": p.name, "ms": p.time.as_secs_f64() * 1e3,
                                "ops_before": p.ops_before, "ops_after": p.ops_after})
                        })
                        .collect()
                })
                .unwrap_or_default();
            let out = serde_json::json!({"graph": name, "passes": passes, "kernels": counts, "total_kernels": total});
            println!("{out}");
            continue;
        }
        println!(
            "# ==== {name} graph of {} ({})",
            dir.path.display(),
            dir.config.model_type
        );
        if passes {
            match report {
                Some(r) => print!("{r}"),
                None => println!("(not optimized)"),
            }
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
            println!("kernels: {total} ({})", list.join(" "));
            continue;
        }
        print!("{}", text::print(g));
        for line in summary(g).lines() {
            println!("# {line}");
        }
    }
    Ok(())
}

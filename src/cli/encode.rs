//! The encoder commands: `kiln embed`, `kiln classify` and `kiln fill-mask`.

use super::forward::{deploy_error, load_error};
use super::opts::ModelOpts;
use super::CliError;
use kiln::load;
use kiln::models::Head;
use kiln::runtime::deploy::{Encoded, EncoderModel};

/// Loads the encoder, tokenizes `texts` and runs them as one padded batch. With `head`, the
/// model must have that head (`what` names it in the error).
fn run(
    opts: &ModelOpts,
    texts: &[String],
    head: Option<(Head, &str)>,
) -> Result<(EncoderModel, Encoded), CliError> {
    opts.check_target()?;
    if texts.is_empty() {
        return Err(CliError::Input("give at least one --text".into()));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(CliError::Input(format!("--text number {} is empty", i + 1)));
    }
    let enc = load::encoder_with(&opts.model, &opts.load_options()).map_err(load_error)?;
    ModelOpts::warn(&enc.reports);
    let enc = enc.model;
    if let Some((head, what)) = head.filter(|(h, _)| *h != enc.info.head) {
        return Err(CliError::Input(format!(
            "{} has no {what} head (its architecture gives {:?}; this command needs {head:?})",
            opts.model.display(),
            enc.info.head
        )));
    }
    let encoded = enc.encode(texts).map_err(deploy_error)?;
    Ok((enc, encoded))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}

/// `kiln embed`: one embedding per text (pooling and normalization as the directory's
/// sentence-transformers modules say; mean pooling otherwise).
pub fn embed(opts: &ModelOpts, texts: &[String], json: bool) -> Result<(), CliError> {
    let (enc, encoded) = run(opts, texts, None)?;
    let embeddings = encoded
        .out
        .pool(&enc.info.pooling)
        .map_err(|e| CliError::Internal(e.to_string()))?;
    if json {
        println!("{}", serde_json::json!({ "embeddings": embeddings }));
        return Ok(());
    }
    for (text, e) in texts.iter().zip(&embeddings) {
        let head: Vec<String> = e.iter().take(6).map(|x| format!("{x:.4}")).collect();
        println!("{text:?}: [{}, ...] ({} dims)", head.join(", "), e.len());
    }
    if embeddings.len() > 1 {
        println!("cosine similarity:");
        for (i, a) in embeddings.iter().enumerate() {
            let row: Vec<String> = embeddings
                .iter()
                .map(|b| format!("{:6.3}", cosine(a, b)))
                .collect();
            println!("  {i}: {}", row.join(" "));
        }
    }
    Ok(())
}

fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `kiln classify`: the label and class probabilities of each text.
pub fn classify(opts: &ModelOpts, texts: &[String], json: bool) -> Result<(), CliError> {
    let (enc, Encoded { out, .. }) = run(
        opts,
        texts,
        Some((Head::SequenceClassification, "classification")),
    )?;
    let labels = &enc.info.labels;
    let logits = out.logits.ok_or_else(|| {
        CliError::Input(format!(
            "{} has no classification head",
            opts.model.display()
        ))
    })?;
    let n = labels.len();
    let values = logits
        .as_f32()
        .filter(|v| v.len() == texts.len() * n)
        .ok_or_else(|| {
            CliError::Internal(format!("classifier logits have shape {:?}", logits.shape()))
        })?;
    let mut results = Vec::new();
    for (r, text) in texts.iter().enumerate() {
        let probs = softmax(&values[r * n..(r + 1) * n]);
        let best = (0..n).fold(0, |b, i| if probs[i] > probs[b] { i } else { b });
        if !json {
            let all: Vec<String> = labels
                .iter()
                .zip(&probs)
                .map(|(l, p)| format!("{l} {p:.4}"))
                .collect();
            println!("{text:?}: {} ({})", labels[best], all.join(", "));
        }
        results.push(serde_json::json!({"label": labels[best], "probs": probs}));
    }
    if json {
        println!("{}", serde_json::json!({ "results": results }));
    }
    Ok(())
}

/// `kiln fill-mask`: the five most likely tokens at each mask position of the text.
pub fn fill_mask(opts: &ModelOpts, text: &str, json: bool) -> Result<(), CliError> {
    let (enc, Encoded { ids, out }) = run(
        opts,
        &[text.to_string()],
        Some((Head::MaskedLm, "masked-LM")),
    )?;
    let tok = enc
        .tokenizer()
        .map_err(|e| CliError::Input(e.to_string()))?;
    let ids = &ids[0];
    let logits = out.logits.ok_or_else(|| {
        CliError::Input(format!("{} has no masked-LM head", opts.model.display()))
    })?;
    let values = logits
        .as_f32()
        .filter(|v| v.len() == ids.len() * enc.info.vocab_size)
        .ok_or_else(|| {
            CliError::Internal(format!("masked-LM logits have shape {:?}", logits.shape()))
        })?;
    let mask_id = ["[MASK]", "<mask>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .ok_or_else(|| {
            CliError::Input("the tokenizer has no mask token ([MASK] or <mask>)".into())
        })?;
    let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    if positions.is_empty() {
        return Err(CliError::Input(format!(
            "the text has no {} token to fill",
            tok.id_to_token(mask_id).unwrap_or_default()
        )));
    }
    let vocab = enc.info.vocab_size;
    let mut results = Vec::new();
    for pos in positions {
        let probs = softmax(&values[pos * vocab..(pos + 1) * vocab]);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let top: Vec<serde_json::Value> = order[..5.min(vocab)]
            .iter()
            .map(|&id| {
                let token = tok.id_to_token(id as u32).unwrap_or_default();
                serde_json::json!({"token_id": id, "token": token, "score": probs[id]})
            })
            .collect();
        if !json {
            println!("position {pos}:");
            for t in &top {
                println!(
                    "  {:>8.4}  {}",
                    t["score"].as_f64().unwrap_or(0.0),
                    t["token"].as_str().unwrap_or("")
                );
            }
        }
        results.push(serde_json::json!({"position": pos, "top": top}));
    }
    if json {
        println!("{}", serde_json::json!({ "masks": results }));
    }
    Ok(())
}

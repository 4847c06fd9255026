//! BERT and DistilBERT traced by `kiln_models::trace_encoder` and run by the reference executor,
//! against transformers (eager attention, f32) on tiny trained checkpoints
//! (`tests/fixtures/hf/{bert,bert_cls,distilbert,distilbert_cls}`, made by
//! `scripts/reference/hf_fixtures.py`): `last_hidden_state`, masked-LM logits and the
//! fill-mask top 5, a right-padded batch, and sequence-classification logits and probabilities.

mod common;

use common::{fixture, ints, max_abs, TOL};
use kiln_models::config;
use kiln_models::{nn, trace_encoder, EncoderGraph};
use kiln_runtime::reference;
use kiln_runtime::weights::{Checkpoint, Convert};
use kiln_runtime::Tensor;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

struct Encoder {
    enc: EncoderGraph,
    params: HashMap<String, Tensor>,
}

impl Encoder {
    fn load(name: &str) -> Encoder {
        let dir = fixture(name);
        let cfg = config::load(&dir.join("config.json")).unwrap();
        let enc = trace_encoder(&cfg).unwrap();
        let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
        let params = ckpt.bind(&enc.graph, Convert::Exact).unwrap();
        Encoder { enc, params }
    }

    /// Runs a batch (`ids`, `mask`, `types` each `[batch][seq]`); returns the outputs by name.
    fn run(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        types: Option<&[Vec<i64>]>,
    ) -> HashMap<String, Tensor> {
        let flat = |rows: &[Vec<i64>]| {
            Tensor::from_i64(vec![rows.len(), rows[0].len()], rows.concat()).unwrap()
        };
        let mut inputs = HashMap::from([
            ("input_ids".to_string(), flat(ids)),
            ("attention_mask".to_string(), flat(mask)),
        ]);
        if self.enc.uses_token_types {
            let zeros: Vec<Vec<i64>> = ids.iter().map(|r| vec![0; r.len()]).collect();
            inputs.insert("token_type_ids".to_string(), flat(types.unwrap_or(&zeros)));
        }
        reference::run(&self.enc.graph, &inputs, &self.params).unwrap()
    }
}

fn read_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(ints).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|&v| f64::from(v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The masked-LM fixtures: single text (hidden state, logits, fill-mask top 5) and a padded
/// batch (hidden states of each row at its real tokens, against the batched reference and
/// against the row run alone).
fn check_masked_lm(name: &str) {
    let m = Encoder::load(name);
    let dir = fixture(name);
    let json = read_json(&dir);
    let want = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let load = |n: &str| want.load(n).unwrap();

    let ids = vec![ints(&json["input_ids"])];
    let mask = vec![ints(&json["attention_mask"])];
    let types = json.get("token_type_ids").map(|v| vec![ints(v)]);
    let out = m.run(&ids, &mask, types.as_deref());
    let (hidden, logits) = (&out["last_hidden_state"], &out["logits"]);
    let (want_hidden, want_logits) = (load("last_hidden_state"), load("mlm_logits"));
    assert_eq!(hidden.shape(), want_hidden.shape());
    assert_eq!(logits.shape(), want_logits.shape());
    let err_h = max_abs(hidden.as_f32().unwrap(), want_hidden.as_f32().unwrap());
    let err_l = max_abs(logits.as_f32().unwrap(), want_logits.as_f32().unwrap());
    eprintln!("{name}: last_hidden_state max abs error {err_h:e}, MLM logits {err_l:e}");
    assert!(
        err_h <= TOL && err_l <= TOL,
        "{name}: errors {err_h:e}, {err_l:e} exceed {TOL:e}"
    );

    // fill-mask: softmax over the vocabulary at the mask, top 5 ids and scores.
    let vocab = logits.shape()[2];
    let pos = json["mask_position"].as_u64().unwrap() as usize;
    let row = &logits.as_f32().unwrap()[pos * vocab..(pos + 1) * vocab];
    let probs = softmax(row);
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut err_p: f64 = 0.0;
    for (k, want) in json["fill_mask"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            order[k] as i64,
            want["token_id"].as_i64().unwrap(),
            "{name}: fill-mask rank {k}"
        );
        err_p = err_p.max((probs[order[k]] - want["score"].as_f64().unwrap()).abs());
    }
    eprintln!("{name}: fill-mask top-5 ids match, probability max abs error {err_p:e}");
    assert!(
        err_p <= 1e-5,
        "{name}: fill-mask probability error {err_p:e}"
    );

    // The padded batch.
    let ids = rows(&json["batch_input_ids"]);
    let mask = rows(&json["batch_attention_mask"]);
    let types = json.get("batch_token_type_ids").map(rows);
    let out = m.run(&ids, &mask, types.as_deref());
    let got = &out["last_hidden_state"];
    let want_b = load("batch_last_hidden_state");
    assert_eq!(got.shape(), want_b.shape());
    let (s, h) = (got.shape()[1], got.shape()[2]);
    let (got, want_b) = (got.as_f32().unwrap(), want_b.as_f32().unwrap());
    let (mut err_real, mut err_pad, mut err_alone): (f64, f64, f64) = (0.0, 0.0, 0.0);
    for (r, row_mask) in mask.iter().enumerate() {
        let len = row_mask.iter().filter(|&&x| x != 0).count();
        assert!(
            row_mask[..len].iter().all(|&x| x == 1),
            "right padding expected"
        );
        let at = |v: &[f32], i: usize| v[(r * s + i) * h..(r * s + i + 1) * h].to_vec();
        for i in 0..s {
            let e = max_abs(&at(got, i), &at(want_b, i));
            if i < len {
                err_real = err_real.max(e);
            } else {
                err_pad = err_pad.max(e);
            }
        }
        let row_types = types.as_ref().map(|t| vec![t[r][..len].to_vec()]);
        let alone = m.run(
            &[ids[r][..len].to_vec()],
            &[vec![1; len]],
            row_types.as_deref(),
        );
        let alone = alone["last_hidden_state"].as_f32().unwrap().to_vec();
        for i in 0..len {
            err_alone = err_alone.max(max_abs(&at(got, i), &alone[i * h..(i + 1) * h]));
        }
    }
    eprintln!(
        "{name}: padded batch max abs error {err_real:e} at real tokens ({err_pad:e} at padding), \
         {err_alone:e} against each row alone"
    );
    assert!(
        err_real <= TOL,
        "{name}: batch error {err_real:e} exceeds {TOL:e}"
    );
    assert!(
        err_alone <= TOL,
        "{name}: batch vs alone error {err_alone:e} exceeds {TOL:e}"
    );
}

fn check_classification(name: &str) {
    let m = Encoder::load(name);
    let json = read_json(&fixture(name));
    let ids = rows(&json["input_ids"]);
    let mask = rows(&json["attention_mask"]);
    let types = json.get("token_type_ids").map(rows);
    let out = m.run(&ids, &mask, types.as_deref());
    let logits = &out["logits"];
    let want_logits: Vec<f32> = json["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    let want_probs: Vec<f64> = json["probs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .map(f64::from)
        .collect();
    let labels = json["id2label"].as_object().unwrap().len();
    assert_eq!(logits.shape(), &[ids.len(), labels]);
    let got = logits.as_f32().unwrap();
    let err_l = max_abs(got, &want_logits);
    let probs: Vec<f64> = got.chunks(labels).flat_map(softmax).collect();
    let err_p = probs
        .iter()
        .zip(&want_probs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = want_logits
        .iter()
        .fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    eprintln!(
        "{name}: logits max abs error {err_l:e} (logits up to {scale:e}), probabilities {err_p:e}"
    );
    assert!(
        err_l <= TOL && err_p <= TOL,
        "{name}: errors {err_l:e}, {err_p:e}"
    );
    let id2label = &json["id2label"];
    for (r, want) in json["labels"].as_array().unwrap().iter().enumerate() {
        let row = &probs[r * labels..(r + 1) * labels];
        let best = (0..labels).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert_eq!(&id2label[best.to_string()], want, "{name}: row {r} label");
    }
}

#[test]
fn bert_masked_lm_matches_transformers() {
    check_masked_lm("bert");
}

#[test]
fn distilbert_masked_lm_matches_transformers() {
    check_masked_lm("distilbert");
}

#[test]
fn bert_classification_matches_transformers() {
    check_classification("bert_cls");
}

#[test]
fn distilbert_classification_matches_transformers() {
    check_classification("distilbert_cls");
}

#[test]
fn token_type_ids_reach_the_embeddings() {
    // A sentence pair (segment B has token type 1) differs from the same ids with all-zero types.
    let m = Encoder::load("bert");
    let json = read_json(&fixture("bert"));
    let pair = &json["pair_example"];
    let ids = vec![ints(&pair["input_ids"])];
    let mask = vec![ints(&pair["attention_mask"])];
    let types = vec![ints(&pair["token_type_ids"])];
    let with = m.run(&ids, &mask, Some(&types));
    let without = m.run(&ids, &mask, None);
    let d = max_abs(
        with["last_hidden_state"].as_f32().unwrap(),
        without["last_hidden_state"].as_f32().unwrap(),
    );
    assert!(d > 1e-3, "token_type_ids had no effect ({d:e})");
}

#[test]
fn base_model_names_adapt_to_a_prefixed_checkpoint() {
    // A `BertModel` config traces bare names (`embeddings...`); against a checkpoint saved
    // from `BertForMaskedLM` (`bert.embeddings...`) the names adapt as transformers' loading
    // does, and the hidden state is the same as the masked-LM model's.
    let dir = fixture("bert");
    let text = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("BertForMaskedLM", "BertModel");
    let cfg = config::parse(&text, &dir.join("config.json")).unwrap();
    let enc = trace_encoder(&cfg).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let e = ckpt
        .bind(&enc.graph, Convert::Exact)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no tensor \"embeddings.word_embeddings.weight\""),
        "{e}"
    );
    let prefix = kiln_models::encoder::base_model_prefix(&cfg.model_type);
    let graph = nn::adapt_param_names(&enc.graph, prefix, |n| ckpt.info(n).is_some());
    let params = ckpt.bind(&graph, Convert::Exact).unwrap();
    let base = Encoder {
        enc: EncoderGraph {
            graph,
            uses_token_types: true,
        },
        params,
    };
    let json = read_json(&dir);
    let ids = vec![ints(&json["input_ids"])];
    let mask = vec![ints(&json["attention_mask"])];
    let got = base.run(&ids, &mask, None);
    let want = Checkpoint::open(&dir.join("reference.safetensors"))
        .unwrap()
        .load("last_hidden_state")
        .unwrap();
    let err = max_abs(
        got["last_hidden_state"].as_f32().unwrap(),
        want.as_f32().unwrap(),
    );
    assert!(err <= TOL, "{err:e}");
    assert!(!got.contains_key("logits"));
}

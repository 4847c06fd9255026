//! GPT-2 traced by `kiln_models::gpt2` and run by the reference executor, against transformers'
//! `GPT2LMHeadModel` (eager attention, f32) on a tiny trained checkpoint
//! (`tests/fixtures/hf/gpt2`, made by `scripts/reference/hf_fixtures.py`): prefill logits,
//! prefill + decode through the KV cache, greedy generation, and a left-padded batch.

mod common;

use common::{ints, max_abs, TOL};
use kiln_models::config::{self, Family};
use kiln_models::gpt2::Gpt2Config;
use kiln_models::CausalGraphs;
use kiln_runtime::reference;
use kiln_runtime::weights::{Checkpoint, Convert};
use kiln_runtime::Tensor;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    common::fixture("gpt2")
}

struct Model {
    cfg: Gpt2Config,
    graphs: CausalGraphs,
    prefill_params: HashMap<String, Tensor>,
    decode_params: HashMap<String, Tensor>,
}

/// The cache of every row: `present.*` of the last call, fed back as `past.*`.
type Cache = HashMap<String, Tensor>;

impl Model {
    fn load() -> Model {
        let dir = fixture();
        let mc = config::load(&dir.join("config.json")).unwrap();
        let Family::Gpt2(cfg) = mc.family else {
            panic!("not a gpt2 config")
        };
        let graphs = cfg.trace().unwrap();
        let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
        let prefill_params = ckpt.bind(&graphs.prefill, Convert::Exact).unwrap();
        let decode_params = ckpt.bind(&graphs.decode, Convert::Exact).unwrap();
        Model {
            cfg,
            graphs,
            prefill_params,
            decode_params,
        }
    }

    /// Runs one step: `ids`, `positions` `[batch, seq]`, `mask` `[batch, past + seq]`; `cache`
    /// holds `past` (the decode graph) or is empty (prefill). Returns logits
    /// `[batch][seq][vocab]` and the new cache.
    fn step(
        &self,
        ids: &[Vec<i64>],
        positions: &[Vec<i64>],
        mask: &[Vec<i64>],
        cache: Option<&Cache>,
    ) -> (Vec<Vec<Vec<f32>>>, Cache) {
        let (b, s) = (ids.len(), ids[0].len());
        let flat = |rows: &[Vec<i64>]| -> Tensor {
            let w = rows[0].len();
            Tensor::from_i64(vec![rows.len(), w], rows.concat()).unwrap()
        };
        let mut inputs = HashMap::from([
            ("input_ids".to_string(), flat(ids)),
            ("position_ids".to_string(), flat(positions)),
            ("attention_mask".to_string(), flat(mask)),
        ]);
        let (graph, params) = match cache {
            Some(c) => {
                for (name, t) in c {
                    inputs.insert(name.replacen("present.", "past.", 1), t.clone());
                }
                (&self.graphs.decode, &self.decode_params)
            }
            None => (&self.graphs.prefill, &self.prefill_params),
        };
        let mut out = reference::run(graph, &inputs, params).unwrap();
        let logits = out.remove("logits").unwrap();
        let v = self.cfg.vocab_size;
        assert_eq!(logits.shape(), &[b, s, v]);
        let data = logits.as_f32().unwrap();
        let rows = (0..b)
            .map(|r| {
                (0..s)
                    .map(|i| data[(r * s + i) * v..(r * s + i + 1) * v].to_vec())
                    .collect()
            })
            .collect();
        let cache = out
            .into_iter()
            .filter(|(k, _)| k.starts_with("present."))
            .collect();
        (rows, cache)
    }
}

fn reference() -> (Value, HashMap<String, Tensor>) {
    let dir = fixture();
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let ckpt = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let tensors = ckpt
        .names()
        .map(|n| (n.to_string(), ckpt.load(n).unwrap()))
        .collect();
    (json, tensors)
}

fn argmax(v: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as i64
}

/// transformers' reference logits of the prompt, `[seq][vocab]`.
fn reference_logits(tensors: &HashMap<String, Tensor>, vocab: usize) -> Vec<Vec<f32>> {
    let t = &tensors["logits"];
    t.as_f32()
        .unwrap()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn prefill_logits_match_transformers() {
    let m = Model::load();
    let (json, tensors) = reference();
    let prompt = ints(&json["prompt_ids"]);
    let n = prompt.len();
    let want = reference_logits(&tensors, m.cfg.vocab_size);
    assert_eq!(want.len(), n);
    let positions: Vec<i64> = (0..n as i64).collect();
    let (got, cache) = m.step(&[prompt], &[positions], &[vec![1; n]], None);
    let err = (0..n)
        .map(|i| max_abs(&got[0][i], &want[i]))
        .fold(0.0, f64::max);
    eprintln!("gpt2 prefill logits: max abs error {err:e}");
    assert!(err <= TOL, "max abs error {err:e} exceeds {TOL:e}");
    // The cache covers the prompt: [batch, heads, seq, head_dim].
    let k = &cache["present.0.key"];
    assert_eq!(
        k.shape(),
        &[1, m.cfg.n_head, n, m.cfg.n_embd / m.cfg.n_head]
    );
    assert_eq!(cache.len(), 2 * m.cfg.n_layer);
}

#[test]
fn prefill_then_decode_matches_full_forward() {
    let m = Model::load();
    let (json, tensors) = reference();
    let prompt = ints(&json["prompt_ids"]);
    let n = prompt.len();
    let want = reference_logits(&tensors, m.cfg.vocab_size);
    // Prefill 5 tokens, decode 3 tokens at once, then the rest one at a time.
    let (first, mut cache) = m.step(
        &[prompt[..5].to_vec()],
        &[(0..5).collect()],
        &[vec![1; 5]],
        None,
    );
    let mut got: Vec<Vec<f32>> = first[0].clone();
    let mut at = 5;
    while at < n {
        let len = if at == 5 { 3 } else { 1 };
        let (logits, next) = m.step(
            &[prompt[at..at + len].to_vec()],
            &[(at as i64..(at + len) as i64).collect()],
            &[vec![1; at + len]],
            Some(&cache),
        );
        assert_eq!(next["present.1.value"].shape()[2], at + len);
        got.extend(logits[0].iter().cloned());
        cache = next;
        at += len;
    }
    let err = (0..n)
        .map(|i| max_abs(&got[i], &want[i]))
        .fold(0.0, f64::max);
    eprintln!("gpt2 prefill+decode vs transformers' full forward: max abs error {err:e}");
    assert!(err <= TOL, "max abs error {err:e} exceeds {TOL:e}");
}

#[test]
fn greedy_generation_matches_transformers() {
    let m = Model::load();
    let (json, _) = reference();
    let prompt = ints(&json["prompt_ids"]);
    let want = ints(&json["greedy"]["new_ids"]);
    let n = prompt.len();
    let (logits, mut cache) = m.step(&[prompt], &[(0..n as i64).collect()], &[vec![1; n]], None);
    let mut next = argmax(&logits[0][n - 1]);
    let mut got = vec![next];
    while got.len() < want.len() {
        let pos = (n + got.len() - 1) as i64;
        let (logits, c) = m.step(
            &[vec![next]],
            &[vec![pos]],
            &[vec![1; pos as usize + 1]],
            Some(&cache),
        );
        cache = c;
        next = argmax(&logits[0][0]);
        got.push(next);
    }
    assert_eq!(
        got, want,
        "greedy continuation differs from transformers' generate()"
    );
}

#[test]
fn left_padded_batch_matches_each_row_alone() {
    let m = Model::load();
    let (json, _) = reference();
    let batch = &json["batch"];
    let rows: Vec<Vec<i64>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ints)
        .collect();
    let masks: Vec<Vec<i64>> = batch["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(ints)
        .collect();
    let want_new: Vec<Vec<i64>> = batch["new_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ints)
        .collect();
    let s = rows[0].len();
    // transformers' generate(): position_ids = cumsum(mask) - 1, 0 at padding.
    let positions: Vec<Vec<i64>> = masks
        .iter()
        .map(|m| {
            let mut c = 0;
            m.iter()
                .map(|&x| {
                    c += x;
                    if x == 0 {
                        0
                    } else {
                        c - 1
                    }
                })
                .collect()
        })
        .collect();
    let (batched, mut cache) = m.step(&rows, &positions, &masks, None);

    // Each row alone (no padding) gives the same logits at its real tokens.
    let mut err: f64 = 0.0;
    for (r, row) in rows.iter().enumerate() {
        let pad = masks[r].iter().take_while(|&&x| x == 0).count();
        let real = row[pad..].to_vec();
        let len = real.len();
        let (alone, _) = m.step(&[real], &[(0..len as i64).collect()], &[vec![1; len]], None);
        for i in 0..len {
            err = err.max(max_abs(&batched[r][pad + i], &alone[0][i]));
        }
    }
    eprintln!("gpt2 left-padded batch vs rows alone: max abs error {err:e}");
    assert!(err <= TOL, "max abs error {err:e} exceeds {TOL:e}");

    // Batched greedy decoding through the cache matches transformers' batched generate().
    let mut mask = masks.clone();
    let mut pos: Vec<i64> = positions.iter().map(|p| p[s - 1]).collect();
    let mut next: Vec<i64> = batched.iter().map(|r| argmax(&r[s - 1])).collect();
    let mut got: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
    while got[0].len() < want_new[0].len() {
        for (m, p) in mask.iter_mut().zip(pos.iter_mut()) {
            m.push(1);
            *p += 1;
        }
        let step_ids: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
        let step_pos: Vec<Vec<i64>> = pos.iter().map(|&p| vec![p]).collect();
        let (logits, c) = m.step(&step_ids, &step_pos, &mask, Some(&cache));
        cache = c;
        next = logits.iter().map(|r| argmax(&r[0])).collect();
        for (g, &t) in got.iter_mut().zip(&next) {
            g.push(t);
        }
    }
    assert_eq!(
        got, want_new,
        "batched greedy continuation differs from transformers"
    );
}

#[test]
fn too_long_input_is_an_error_not_a_panic() {
    let m = Model::load();
    let n = m.cfg.n_positions + 1;
    let inputs = HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::from_i64(vec![1, n], vec![1; n]).unwrap(),
        ),
        (
            "position_ids".to_string(),
            Tensor::from_i64(vec![1, n], (0..n as i64).collect()).unwrap(),
        ),
        (
            "attention_mask".to_string(),
            Tensor::from_i64(vec![1, n], vec![1; n]).unwrap(),
        ),
    ]);
    let e = reference::run(&m.graphs.prefill, &inputs, &m.prefill_params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}

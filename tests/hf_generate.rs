//! Generation against transformers' `generate` (fixtures from `scripts/reference/hf_fixtures.py`):
//! the tokenizer's ids, greedy continuations token for token, beam search, left-padded batches,
//! and seeded sampling reproducibility.

mod common;

use common::{fixture, ids, reference_json as reference};
use kiln::load::causal_lm;
use kiln::runtime::generate::{generate, EarlyStopping, GenerationConfig, Stopper};
use serde_json::Value;

const FAMILIES: [&str; 6] = ["llama", "llama_tied", "mistral", "qwen2", "mixtral", "gpt2"];

/// The model's generation config with the reference case's arguments applied.
fn config(name: &str, args: &Value) -> GenerationConfig {
    let file = std::fs::read_to_string(fixture(name).join("generation_config.json")).unwrap();
    let mut cfg = GenerationConfig::from_json_str(&file).unwrap();
    cfg.do_sample = false;
    cfg.max_new_tokens = args["max_new_tokens"].as_u64().map(|n| n as usize);
    if let Some(b) = args["num_beams"].as_u64() {
        cfg.num_beams = b as usize;
    }
    if let Some(lp) = args["length_penalty"].as_f64() {
        cfg.length_penalty = lp;
    }
    if let Some(es) = args["early_stopping"].as_bool() {
        cfg.early_stopping = if es {
            EarlyStopping::AllFinished
        } else {
            EarlyStopping::Heuristic
        };
    }
    if let Some(eos) = args["eos_token_id"].as_u64() {
        cfg.eos_token_id = vec![eos as u32];
    }
    cfg
}

#[test]
fn tokenizer_matches_transformers() {
    for name in FAMILIES {
        let r = reference(name);
        let model = causal_lm(&fixture(name)).unwrap();
        let tok = model.model.assets.tokenizer().unwrap();
        let prompt = r["prompt"].as_str().unwrap();
        let got = tok.encode(prompt, true).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&r["prompt_ids"]), "{name}: prompt ids");
        for case in r["tokenizer_cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let enc = tok.encode(text, true).unwrap();
            assert_eq!(enc.get_ids(), ids(&case["ids"]), "{name}: {text:?}");
            let decoded = tok.decode(enc.get_ids(), true).unwrap();
            assert_eq!(
                decoded,
                case["decoded_skip_special"].as_str().unwrap(),
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn greedy_matches_transformers_token_for_token() {
    for name in FAMILIES {
        let r = reference(name);
        let mut model = causal_lm(&fixture(name)).unwrap();
        let tok = model.model.assets.tokenizer().unwrap();
        let cfg = config(name, &r["greedy"]["args"]);
        let want = ids(&r["greedy_ids"]);
        let mut stopper = Stopper::from_config(&tok, &cfg, 1);
        let mut streamed = String::new();
        let out = generate(
            &mut model.model.lm,
            &[ids(&r["prompt_ids"])],
            &cfg,
            0,
            &mut |row, t| {
                let step = stopper.push(row, t).unwrap();
                streamed += &step.text;
                !step.stop
            },
        )
        .unwrap();
        streamed += &stopper.finish(0).unwrap();
        assert_eq!(out[0], want, "{name}: greedy ids");
        assert!(
            want.len() >= 16,
            "{name}: the fixture should hold a long continuation"
        );
        assert_eq!(
            streamed,
            r["greedy_text"].as_str().unwrap(),
            "{name}: streamed text"
        );
    }
}

#[test]
fn beam_search_matches_transformers() {
    for name in FAMILIES {
        let r = reference(name);
        let mut model = causal_lm(&fixture(name)).unwrap();
        for case in r["beam"].as_array().unwrap() {
            let cfg = config(name, &case["args"]);
            let out = generate(
                &mut model.model.lm,
                &[ids(&r["prompt_ids"])],
                &cfg,
                0,
                &mut |_, _| true,
            )
            .unwrap();
            assert_eq!(
                out[0],
                ids(&case["new_ids"]),
                "{name}: beam search {}",
                case["args"]
            );
        }
    }
}

#[test]
fn padded_batches_match_each_prompt_alone() {
    for name in FAMILIES {
        let r = reference(name);
        let b = &r["batch"];
        let mut model = causal_lm(&fixture(name)).unwrap();
        let tok = model.model.assets.tokenizer().unwrap();
        let prompts: Vec<Vec<u32>> = b["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                tok.encode(p.as_str().unwrap(), true)
                    .unwrap()
                    .get_ids()
                    .to_vec()
            })
            .collect();
        let cfg = config(name, &b["args"]);
        let out = generate(&mut model.model.lm, &prompts, &cfg, 0, &mut |_, _| true).unwrap();
        for (row, want) in b["unbatched_new_ids"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            assert_eq!(out[row], ids(want), "{name}: batch row {row}");
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let r = reference("llama");
    let mut model = causal_lm(&fixture("llama")).unwrap();
    let mut cfg = config("llama", &serde_json::json!({"max_new_tokens": 12}));
    cfg.set_temperature(0.9);
    cfg.top_k = 40;
    let prompt = [ids(&r["prompt_ids"])];
    let mut run =
        |seed| generate(&mut model.model.lm, &prompt, &cfg, seed, &mut |_, _| true).unwrap();
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed should sample differently");
}

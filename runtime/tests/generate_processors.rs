//! kiln's logits processors against transformers: every case of
//! `tests/fixtures/hf/processors.json` (made by `scripts/reference/hf_fixtures.py` with
//! transformers' own processor classes on CPU) is recomputed and compared.
//!
//! Tolerance: -inf positions must match exactly; finite values must agree to 1e-6 relative
//! (plus 1e-7 absolute). The processors only multiply or divide by f32-rounded parameters, so in
//! practice the values are bit-identical; the tolerance only guards against the fixture's
//! float printing.

use kiln_runtime::generate::processors::{self, LogitsPipeline, Processor};
use kiln_runtime::generate::GenerationConfig;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/hf/processors.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).expect("processors.json is JSON")
}

fn f32_of(v: &Value) -> f32 {
    match v {
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        Value::String(s) if s == "inf" => f32::INFINITY,
        Value::String(s) if s == "nan" => f32::NAN,
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32,
    }
}

fn rows_of(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_array().expect("row").iter().map(f32_of).collect())
        .collect()
}

fn ids_of(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

fn processor(name: &str, args: &Value) -> Processor {
    let f = |k: &str| {
        args[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: missing {k}"))
    };
    match name {
        "RepetitionPenaltyLogitsProcessor" => Processor::RepetitionPenalty(f("penalty")),
        "TemperatureLogitsWarper" => Processor::Temperature(f("temperature")),
        "TopKLogitsWarper" => Processor::TopK(f("top_k") as usize, 1),
        "TopPLogitsWarper" => Processor::TopP(f("top_p"), 1),
        "MinPLogitsWarper" => Processor::MinP(f("min_p"), 1),
        other => panic!("unknown processor {other}"),
    }
}

fn assert_rows_match(case: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{case}: row count");
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{case}: row {r} length");
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            if b == f32::NEG_INFINITY || a == f32::NEG_INFINITY {
                assert_eq!(
                    a, b,
                    "{case}: row {r} token {i}: -inf positions differ (kiln {a}, hf {b})"
                );
            } else {
                let tol = 1e-6 * b.abs() + 1e-7;
                assert!(
                    (a - b).abs() <= tol,
                    "{case}: row {r} token {i}: kiln {a}, hf {b}"
                );
            }
        }
    }
}

#[test]
fn every_fixture_case_matches_transformers() {
    let fx = fixture();
    let scores = rows_of(&fx["scores"]);
    let ids = ids_of(&fx["input_ids"]);
    let cases = fx["cases"].as_array().expect("cases");
    assert!(
        cases.len() >= 6,
        "expected the five processors and the combined pipeline"
    );
    for case in cases {
        let names: Vec<&str> = case["processors"]
            .as_array()
            .expect("processors")
            .iter()
            .map(|n| n.as_str().expect("name"))
            .collect();
        let args = case["args"].as_array().expect("args");
        let procs: Vec<Processor> = names
            .iter()
            .zip(args)
            .map(|(n, a)| processor(n, a))
            .collect();
        let mut pipeline = LogitsPipeline::new(procs);
        let got: Vec<Vec<f32>> = scores
            .iter()
            .zip(&ids)
            .map(|(row, hist)| {
                let mut row = row.clone();
                pipeline.apply(&mut row, hist, &[]);
                row
            })
            .collect();
        assert_rows_match(&names.join(" + "), &got, &rows_of(&case["output"]));
    }
}

#[test]
fn standalone_functions_match_the_pipeline() {
    let fx = fixture();
    let scores = rows_of(&fx["scores"]);
    let ids = ids_of(&fx["input_ids"]);
    for (row, hist) in scores.iter().zip(&ids) {
        let mut a = row.clone();
        processors::repetition_penalty(&mut a, &hist[..3], &hist[3..], 1.3);
        processors::temperature(&mut a, 0.7);
        processors::top_k(&mut a, 5, 1);
        processors::top_p(&mut a, 0.9, 1);
        processors::min_p(&mut a, 0.1, 1);
        let mut b = row.clone();
        LogitsPipeline::new(vec![
            Processor::RepetitionPenalty(1.3),
            Processor::Temperature(0.7),
            Processor::TopK(5, 1),
            Processor::TopP(0.9, 1),
            Processor::MinP(0.1, 1),
        ])
        .apply(&mut b, hist, &[]);
        assert_eq!(a, b);
    }
}

#[test]
fn config_builds_transformers_order() {
    let fx = fixture();
    let want: Vec<&str> = fx["generate_order"]
        .as_array()
        .expect("generate_order")
        .iter()
        .map(|n| n.as_str().expect("name"))
        .collect();
    let cfg = GenerationConfig {
        do_sample: true,
        temperature: 0.7,
        top_k: 5,
        top_p: 0.9,
        min_p: Some(0.1),
        repetition_penalty: 1.3,
        ..GenerationConfig::default()
    };
    let pipeline = LogitsPipeline::from_config(&cfg);
    let got: Vec<&str> = pipeline.processors().iter().map(|p| p.hf_name()).collect();
    assert_eq!(got, want);

    // Greedy and beam search use only the repetition penalty.
    let greedy = GenerationConfig {
        do_sample: false,
        ..cfg.clone()
    };
    let names: Vec<&str> = LogitsPipeline::from_config(&greedy)
        .processors()
        .iter()
        .map(|p| p.hf_name())
        .collect();
    assert_eq!(names, ["RepetitionPenaltyLogitsProcessor"]);
    // Defaults (do_sample with top_k 50 only): just top-k.
    let plain = GenerationConfig {
        do_sample: true,
        ..GenerationConfig::default()
    };
    assert_eq!(
        LogitsPipeline::from_config(&plain).processors(),
        [Processor::TopK(50, 1)]
    );
}

#[test]
fn top_k_keeps_ties_and_top_p_breaks_ties_by_index() {
    // Ties at the k-th value are all kept.
    let mut s = vec![1.0, 3.0, 2.0, 2.0, 2.0, 0.0];
    processors::top_k(&mut s, 2, 1);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(s, [ninf, 3.0, 2.0, 2.0, 2.0, ninf]);
    // min_tokens_to_keep raises k; k larger than the vocabulary keeps everything.
    let mut s = vec![1.0, 3.0, 2.0];
    processors::top_k(&mut s, 1, 2);
    assert_eq!(s, [ninf, 3.0, 2.0]);
    let mut s = vec![1.0, 3.0, 2.0];
    processors::top_k(&mut s, 10, 1);
    assert_eq!(s, [1.0, 3.0, 2.0]);

    // Four equal tokens, each 0.25: with top_p 0.5 the cumulative sums are 0.25, 0.5, 0.75, 1;
    // "<= 0.5" removes the first two of the ascending order, which are the lower indices.
    let mut s = vec![0.0; 4];
    processors::top_p(&mut s, 0.5, 1);
    assert_eq!(s, [ninf, ninf, 0.0, 0.0]);
    // top_p 0 keeps exactly one token (the last of the ascending order: the highest index).
    let mut s = vec![0.0; 4];
    processors::top_p(&mut s, 0.0, 1);
    assert_eq!(s, [ninf, ninf, ninf, 0.0]);
}

#[test]
fn repetition_penalty_counts_each_token_once_and_ignores_foreign_ids() {
    let mut s = vec![2.0, -2.0, 1.0, 0.0];
    processors::repetition_penalty(&mut s, &[0, 0, 1, 1, 99], &[0, 3], 2.0);
    assert_eq!(s, [1.0, -4.0, 1.0, 0.0]);
}

#[test]
fn min_p_keeps_the_most_likely_token() {
    // probabilities about 0.64, 0.24, 0.09, 0.03: min_p 0.2 keeps p >= 0.128.
    let mut s = vec![3.0, 2.0, 1.0, 0.0];
    processors::min_p(&mut s, 0.2, 1);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(s, [3.0, 2.0, ninf, ninf]);
    // min_p 1 keeps only the maximum.
    let mut s = vec![3.0, 2.0, 1.0, 0.0];
    processors::min_p(&mut s, 1.0, 1);
    assert_eq!(s, [3.0, ninf, ninf, ninf]);
}

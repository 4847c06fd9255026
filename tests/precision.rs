//! Precision lowering against transformers' f32 reference outputs (fixtures from
//! `scripts/reference/hf_fixtures.py`): bf16 within 2 % relative L2 error with ≥ 99 % top-1
//! agreement over all positions; fp8 (e4m3 weight storage with per-channel scales, the
//! key/value projections in bf16, an untied LM head in e4m3 refined by its e4m3 residual on
//! the candidate tokens (`refine_logits`), bf16 operands): top-1 agreement ≥ 95 % over all
//! positions of the causal fixtures pooled, and per family the regression bounds
//! [`FP8_TOP1`] / [`FP8_REL`]. The measured figures are printed (`cargo test --test precision
//! -- --nocapture`). These tiny fixtures flatter fp8: on the random-weight 125M Llama its
//! agreement is about 80 % (`scripts/reference/top1_agreement.py`, BENCHMARKS.md).

mod common;

use common::{argmax, fixture, ids, reference};
use kiln::compiler::Precision;
use kiln::load::{causal_lm_with, encoder_with, LoadOptions};

const CAUSAL: [&str; 6] = ["llama", "llama_tied", "mistral", "qwen2", "mixtral", "gpt2"];
const ENCODERS: [&str; 2] = ["bert", "distilbert"];

fn opts(precision: Precision) -> LoadOptions {
    LoadOptions {
        precision,
        ..Default::default()
    }
}

/// `‖a − b‖₂ / ‖b‖₂`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    (num / den).sqrt()
}

/// Rows of width `width` whose argmax agrees, and all rows.
fn top1(a: &[f32], b: &[f32], width: usize) -> (usize, usize) {
    let rows = b.len() / width;
    for (i, (x, y)) in a.chunks(width).zip(b.chunks(width)).enumerate() {
        let (ga, gb) = (argmax(x), argmax(y));
        if ga != gb {
            eprintln!(
                "  row {i}: ours {ga} ({} vs ref {}), ref {gb} ({} vs ref {})",
                x[ga], y[ga], x[gb], y[gb]
            );
        }
    }
    let same = a
        .chunks(width)
        .zip(b.chunks(width))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    (same, rows)
}

/// The fp8 target: top-1 agreement over all positions of the causal fixtures, pooled.
const FP8_TOP1_POOLED: f64 = 0.95;
/// fp8 per-family regression bounds. Measured (2026-11-28) with per-channel scales, the LM head
/// and the key/value projections kept in bf16: llama 91.2 %, llama_tied 94.1 %, mistral
/// 94.1 %, qwen2 100 %, mixtral 100 %, gpt2 93.75 % (pooled 178/186 = 95.7 %), at 0.8–4.0 %
/// relative error; with every weight in fp8 it was 94.1, 88.2, 94.1, 97.1, 91.2, 93.75 %
/// (pooled 93.0 %) at 0.9–5.3 %, with only the head in bf16 pooled 91.9 %. A fixture has 16–34
/// positions with near-ties, so one position moves a family by 3–6 %.
const FP8_TOP1: f64 = 0.85;
/// fp8 relative L2 error bound (see [`FP8_TOP1`]).
const FP8_REL: f64 = 0.07;

struct Figures {
    rel: f64,
    /// Agreeing positions and all positions.
    top1: Option<(usize, usize)>,
}

fn check(name: &str, what: &str, precision: Precision, f: &Figures) {
    let rate = f.top1.map(|(same, all)| same as f64 / all as f64);
    let top1 = rate.map_or("-".to_string(), |t| format!("{:.2}%", t * 100.0));
    eprintln!(
        "{name} {what} ({}): relative L2 error {:.3}%, top-1 agreement {top1}",
        precision.name(),
        f.rel * 100.0
    );
    match precision {
        Precision::Bf16 => {
            assert!(
                f.rel <= 0.02,
                "{name} {what}: bf16 relative error {}",
                f.rel
            );
            if let Some(t) = rate {
                assert!(t >= 0.99, "{name} {what}: bf16 top-1 agreement {t}");
            }
        }
        Precision::Fp8 => {
            assert!(
                f.rel <= FP8_REL,
                "{name} {what}: fp8 relative error {}",
                f.rel
            );
            if let Some(t) = rate {
                assert!(t >= FP8_TOP1, "{name} {what}: fp8 top-1 agreement {t}");
            }
        }
        _ => {}
    }
}

fn causal(name: &str, precision: Precision) -> Figures {
    let (r, tensors) = reference(name);
    let prompt = ids(&r["prompt_ids"]);
    let want = tensors.load("logits").unwrap();
    let got = causal_lm_with(&fixture(name), &opts(precision))
        .unwrap()
        .model
        .lm
        .forward(&prompt)
        .unwrap();
    assert_eq!(got.shape(), want.shape(), "{name}");
    let vocab = *want.shape().last().unwrap();
    let (a, b) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    Figures {
        rel: rel_l2(a, b),
        top1: Some(top1(a, b, vocab)),
    }
}

fn encoder(name: &str, precision: Precision) -> (Figures, Figures) {
    let (r, tensors) = reference(name);
    let input = ids(&r["input_ids"]);
    let enc = encoder_with(&fixture(name), &opts(precision)).unwrap();
    let out = enc.model.run(&[input]).unwrap();
    let want_h = tensors.load("last_hidden_state").unwrap();
    let want_l = tensors.load("mlm_logits").unwrap();
    let got_l = out.logits.expect("an MLM head");
    assert_eq!(out.last_hidden_state.shape(), want_h.shape(), "{name}");
    assert_eq!(got_l.shape(), want_l.shape(), "{name}");
    let vocab = *want_l.shape().last().unwrap();
    let (a, b) = (got_l.as_f32().unwrap(), want_l.as_f32().unwrap());
    (
        Figures {
            rel: rel_l2(
                out.last_hidden_state.as_f32().unwrap(),
                want_h.as_f32().unwrap(),
            ),
            top1: None,
        },
        Figures {
            rel: rel_l2(a, b),
            top1: Some(top1(a, b, vocab)),
        },
    )
}

#[test]
fn causal_families_in_bf16_and_fp8_agree_with_transformers() {
    for precision in [Precision::Bf16, Precision::Fp8] {
        let (mut same, mut all) = (0, 0);
        for name in CAUSAL {
            let f = causal(name, precision);
            check(name, "logits", precision, &f);
            let (s, a) = f.top1.unwrap_or_default();
            same += s;
            all += a;
        }
        let pooled = same as f64 / all as f64;
        eprintln!(
            "{precision:?}: top-1 agreement {same}/{all} = {:.1}% over every causal position",
            pooled * 100.0
        );
        if precision == Precision::Fp8 {
            assert!(
                pooled >= FP8_TOP1_POOLED,
                "fp8 pooled top-1 agreement {pooled}"
            );
        }
    }
}

#[test]
fn encoders_in_bf16_and_fp8_agree_with_transformers() {
    for precision in [Precision::Bf16, Precision::Fp8] {
        for name in ENCODERS {
            let (hidden, logits) = encoder(name, precision);
            check(name, "last_hidden_state", precision, &hidden);
            check(name, "mlm logits", precision, &logits);
        }
    }
}

#[test]
fn f32_is_unchanged_and_fp16_is_refused_on_the_cpu() {
    let (r, tensors) = reference("llama");
    let want = tensors.load("logits").unwrap();
    let got = causal_lm_with(&fixture("llama"), &opts(Precision::F32))
        .unwrap()
        .model
        .lm
        .forward(&ids(&r["prompt_ids"]))
        .unwrap();
    assert!(rel_l2(got.as_f32().unwrap(), want.as_f32().unwrap()) < 1e-5);
    let err = causal_lm_with(&fixture("llama"), &opts(Precision::Fp16))
        .err()
        .expect("fp16 is refused on the cpu target")
        .to_string();
    assert!(err.contains("fp16") && err.contains("cuda-sm90"), "{err}");
}

/// The lowered graphs declare the matmul weights narrow (so they are bound converted), and keep
/// norms and softmax in f32.
#[test]
fn weights_are_declared_narrow() {
    use kiln::ir::{DType, Op};
    let dir = kiln::models::ModelDir::open(&fixture("llama")).unwrap();
    for (precision, dtype) in [
        (Precision::Bf16, DType::BF16),
        (Precision::Fp8, DType::F8E4M3),
    ] {
        for optimize in [false, true] {
            let traced = kiln::load::causal_graphs(&dir).unwrap();
            let o = LoadOptions {
                optimize,
                ..opts(precision)
            };
            let (graphs, _) = kiln::load::prepare(vec![traced.prefill], &o).unwrap();
            let g = &graphs[0];
            let narrow = g.params().filter(|(_, _, t)| t.dtype == dtype).count();
            assert!(narrow > 0, "{precision:?}: no {dtype} parameters");
            for n in g.nodes() {
                if let Op::RmsNorm { .. } | Op::Softmax { .. } = n.op {
                    assert_eq!(n.ty.dtype, DType::F32);
                }
            }
        }
    }
}

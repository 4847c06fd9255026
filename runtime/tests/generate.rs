//! Generation over toy [`LanguageModel`]s: greedy, seeded sampling, EOS and length handling,
//! beam search (hand-checked cases and a grid compared with transformers' own `generate`), the
//! configuration (parsing and validation) and error reporting.

use kiln_runtime::generate::{
    self, ConfigError, EarlyStopping, GenerateError, GenerationConfig, RowSampler,
};
use kiln_runtime::{LanguageModel, ModelError};

/// Next-token logits as a function of a row's whole sequence.
type LogitsFn = Box<dyn Fn(&[u32]) -> Vec<f32>>;

/// A model whose next-token logits are a function of the row's whole sequence (prompt and
/// generated tokens), as the model tracks it through `prefill`, `decode` and `reorder`; a
/// mistake in cache bookkeeping changes the logits.
struct FnModel {
    vocab: usize,
    f: LogitsFn,
    rows: Vec<Vec<u32>>,
    prefills: usize,
    decodes: Vec<Vec<u32>>,
    reorders: Vec<Vec<usize>>,
}

impl FnModel {
    fn new(vocab: usize, f: impl Fn(&[u32]) -> Vec<f32> + 'static) -> Self {
        FnModel {
            vocab,
            f: Box::new(f),
            rows: Vec::new(),
            prefills: 0,
            decodes: Vec::new(),
            reorders: Vec::new(),
        }
    }

    fn logits(&self) -> Vec<Vec<f32>> {
        self.rows.iter().map(|r| (self.f)(r)).collect()
    }
}

impl LanguageModel for FnModel {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.prefills += 1;
        self.rows = prompts.to_vec();
        Ok(self.logits())
    }

    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        if tokens.len() != self.rows.len() {
            return Err(ModelError(format!(
                "{} tokens for {} rows",
                tokens.len(),
                self.rows.len()
            )));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ModelError(format!("token {t} outside the vocabulary")));
        }
        self.decodes.push(tokens.to_vec());
        for (row, &t) in self.rows.iter_mut().zip(tokens) {
            row.push(t);
        }
        Ok(self.logits())
    }

    fn reorder(&mut self, src: &[usize]) -> Result<(), ModelError> {
        if let Some(&s) = src.iter().find(|&&s| s >= self.rows.len()) {
            return Err(ModelError(format!("reorder from missing row {s}")));
        }
        self.reorders.push(src.to_vec());
        self.rows = src.iter().map(|&s| self.rows[s].clone()).collect();
        Ok(())
    }
}

/// Logits `ln p` for the given probabilities.
fn ln(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&x| x.ln() as f32).collect()
}

/// A bigram model: logits = table[last token].
fn bigram(table: Vec<Vec<f32>>) -> FnModel {
    let vocab = table.len();
    FnModel::new(vocab, move |seq| {
        table[*seq.last().unwrap() as usize].clone()
    })
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(max_new_tokens),
        ..GenerationConfig::default()
    }
}

fn run(
    model: &mut FnModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    seed: u64,
) -> Vec<Vec<u32>> {
    generate::generate(model, prompts, cfg, seed, &mut |_, _| true).expect("generate")
}

// ---------------------------------------------------------------------------------------------
// Greedy

#[test]
fn greedy_follows_the_argmax_and_calls_decode_once_per_step() {
    // From t the best next token is (t + 1) % 5.
    let table: Vec<Vec<f32>> = (0..5)
        .map(|t| {
            (0..5)
                .map(|v| if v == (t + 1) % 5 { 2.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let mut m = bigram(table);
    let out = run(&mut m, &[vec![3]], &greedy(6), 0);
    assert_eq!(out, [vec![4, 0, 1, 2, 3, 4]]);
    assert_eq!(m.prefills, 1);
    // The last token is never fed back: 6 tokens, 5 decode calls.
    assert_eq!(m.decodes.len(), 5);
    assert_eq!(m.rows[0], [3, 4, 0, 1, 2, 3]);
}

#[test]
fn greedy_ties_pick_the_first_index() {
    let mut m = FnModel::new(4, |_| vec![0.0, 1.0, 1.0, 1.0]);
    assert_eq!(run(&mut m, &[vec![0]], &greedy(2), 0), [vec![1, 1]]);
}

#[test]
fn rows_stop_on_eos_independently() {
    // Row with prompt [1]: 1 -> 2 -> 0 (EOS). Row with prompt [3]: 3 -> 3 -> 3 ...
    let mut table = vec![vec![0.0f32; 4]; 4];
    table[0][1] = 5.0;
    table[1][2] = 5.0;
    table[2][0] = 5.0;
    table[3][3] = 5.0;
    let mut m = bigram(table);
    let cfg = GenerationConfig {
        eos_token_id: vec![0],
        ..greedy(5)
    };
    let mut seen = Vec::new();
    let out = generate::generate(&mut m, &[vec![1], vec![3]], &cfg, 0, &mut |r, t| {
        seen.push((r, t));
        true
    })
    .unwrap();
    assert_eq!(out, [vec![2, 0], vec![3, 3, 3, 3, 3]]);
    // Every row's tokens were reported in order; the finished row got nothing after EOS.
    assert_eq!(seen.iter().filter(|(r, _)| *r == 0).count(), 2);
    assert_eq!(seen.iter().filter(|(r, _)| *r == 1).count(), 5);
    // One decode per step for the whole batch; the finished row is fed its EOS again.
    assert_eq!(m.decodes, [vec![2, 3], vec![0, 3], vec![0, 3], vec![0, 3]]);
}

#[test]
fn generation_ends_when_every_row_is_done() {
    let mut table = vec![vec![0.0f32; 3]; 3];
    table[1][2] = 5.0;
    table[2][0] = 5.0;
    let mut m = bigram(table);
    let cfg = GenerationConfig {
        eos_token_id: vec![0],
        ..greedy(50)
    };
    assert_eq!(
        run(&mut m, &[vec![1], vec![2]], &cfg, 0),
        [vec![2, 0], vec![0]]
    );
    assert_eq!(m.decodes.len(), 1);
}

#[test]
fn on_token_false_finishes_the_row_keeping_the_token() {
    let mut m = FnModel::new(3, |s| {
        let mut l = vec![0.0; 3];
        l[s.len() % 3] = 1.0;
        l
    });
    let out = generate::generate(
        &mut m,
        &[vec![0], vec![0, 0]],
        &greedy(6),
        0,
        &mut |r, _| r != 0,
    )
    .unwrap();
    assert_eq!(out[0].len(), 1);
    assert_eq!(out[1].len(), 6);
}

#[test]
fn length_budget_follows_transformers() {
    let mut m = FnModel::new(3, |_| vec![1.0, 0.0, 0.0]);
    // max_new_tokens wins over max_length.
    let cfg = GenerationConfig {
        max_new_tokens: Some(2),
        max_length: Some(100),
        ..GenerationConfig::default()
    };
    assert_eq!(run(&mut m, &[vec![1, 1, 1]], &cfg, 0)[0].len(), 2);
    // max_length counts the longest prompt of the batch.
    let cfg = GenerationConfig {
        max_length: Some(6),
        ..GenerationConfig::default()
    };
    let out = run(&mut m, &[vec![1], vec![1, 1, 1, 1]], &cfg, 0);
    assert_eq!((out[0].len(), out[1].len()), (2, 2));
    // Nothing set: 20 new tokens.
    assert_eq!(
        run(&mut m, &[vec![1; 30]], &GenerationConfig::default(), 0)[0].len(),
        20
    );
    // A prompt as long as max_length is an error.
    let cfg = GenerationConfig {
        max_length: Some(4),
        ..GenerationConfig::default()
    };
    let err = generate::generate(&mut m, &[vec![1; 4]], &cfg, 0, &mut |_, _| true).unwrap_err();
    assert!(err.to_string().contains("max_length is 4"), "{err}");
}

#[test]
fn repetition_penalty_applies_to_greedy() {
    // Token 1 is slightly preferred everywhere; with the penalty, once seen it loses to 2.
    let mut m = FnModel::new(3, |_| vec![0.0, 1.2, 1.0]);
    let cfg = GenerationConfig {
        repetition_penalty: 1.5,
        ..greedy(3)
    };
    // 1.2 / 1.5 = 0.8 < 1.0: after generating 1 the model picks 2, then both are penalized
    // (0.8 vs 0.667) and 1 wins again.
    assert_eq!(run(&mut m, &[vec![0]], &cfg, 0), [vec![1, 2, 1]]);
    // The prompt counts as history.
    assert_eq!(run(&mut m, &[vec![1]], &cfg, 0)[0][0], 2);
}

// ---------------------------------------------------------------------------------------------
// Sampling

fn sampling(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        do_sample: true,
        top_k: 0,
        max_new_tokens: Some(max_new_tokens),
        ..GenerationConfig::default()
    }
}

fn flat_model() -> FnModel {
    // Distinct logits (7 is prime to 50), spread over [0, 4.9].
    FnModel::new(50, |s| {
        (0..50)
            .map(|v| ((v * 7 + s.len() * 3) % 50) as f32 * 0.1)
            .collect()
    })
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let cfg = sampling(30);
    let a = run(&mut flat_model(), &[vec![1]], &cfg, 7);
    let b = run(&mut flat_model(), &[vec![1]], &cfg, 7);
    let c = run(&mut flat_model(), &[vec![1]], &cfg, 8);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a[0].len(), 30);
}

#[test]
fn sampling_rows_are_independent_of_the_batch() {
    let cfg = sampling(20);
    let alone = run(&mut flat_model(), &[vec![1]], &cfg, 3);
    let batch = run(&mut flat_model(), &[vec![1], vec![2, 2]], &cfg, 3);
    assert_eq!(alone[0], batch[0]);
    // The same prompt in another row draws from another stream.
    let twice = run(&mut flat_model(), &[vec![1], vec![1]], &cfg, 3);
    assert_ne!(twice[0], twice[1]);
}

#[test]
fn sampling_with_top_k_1_is_greedy() {
    let cfg = GenerationConfig {
        top_k: 1,
        temperature: 0.5,
        ..sampling(10)
    };
    let sampled = run(&mut flat_model(), &[vec![4]], &cfg, 11);
    let greedy_out = run(&mut flat_model(), &[vec![4]], &greedy(10), 0);
    assert_eq!(sampled, greedy_out);
}

#[test]
fn sampler_draws_with_the_softmax_probabilities() {
    // p = (0.75, 0.25, 0): 8000 draws.
    let scores = ln(&[0.75, 0.25])
        .into_iter()
        .chain([f32::NEG_INFINITY])
        .collect::<Vec<_>>();
    let mut s = RowSampler::new(42, 0);
    let mut counts = [0usize; 3];
    for _ in 0..8000 {
        counts[s.sample(&scores).unwrap() as usize] += 1;
    }
    assert_eq!(counts[2], 0);
    let f = counts[0] as f64 / 8000.0;
    assert!((f - 0.75).abs() < 0.02, "{counts:?}");
    // Fixed cross-platform stream: the first uniforms of seed 0, row 0 never change.
    let mut s = RowSampler::new(0, 0);
    let u: Vec<f64> = (0..3).map(|_| s.uniform()).collect();
    let mut again = RowSampler::new(0, 0);
    assert_eq!(u, (0..3).map(|_| again.uniform()).collect::<Vec<_>>());
    assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
}

#[test]
fn sampling_with_no_valid_token_is_an_error() {
    let mut m = FnModel::new(3, |_| vec![f32::NEG_INFINITY; 3]);
    let err =
        generate::generate(&mut m, &[vec![0]], &sampling(3), 1, &mut |_, _| true).unwrap_err();
    assert!(
        matches!(err, GenerateError::NoValidToken { row: 0 }),
        "{err}"
    );
    let mut m = FnModel::new(3, |_| vec![0.0, f32::NAN, 0.0]);
    assert!(generate::generate(&mut m, &[vec![0]], &sampling(3), 1, &mut |_, _| true).is_err());
}

// ---------------------------------------------------------------------------------------------
// Beam search, by hand

fn beams(num_beams: usize, max_new_tokens: usize, length_penalty: f64) -> GenerationConfig {
    GenerationConfig {
        num_beams,
        length_penalty,
        max_new_tokens: Some(max_new_tokens),
        ..GenerationConfig::default()
    }
}

/// a=0, b=1, c=2. After the prompt: a .5, b .4, c .1; after a: a .4, b .3, c .3; after b:
/// a .9, b .05, c .05. Greedy takes a, a (p = .2); the best two-token sequence is b, a (.36).
fn greedy_is_not_best() -> FnModel {
    FnModel::new(3, |s| match &s[1..] {
        [] => ln(&[0.5, 0.4, 0.1]),
        [0] => ln(&[0.4, 0.3, 0.3]),
        [1] => ln(&[0.9, 0.05, 0.05]),
        _ => ln(&[1.0 / 3.0; 3]),
    })
}

#[test]
fn beam_search_finds_the_better_sequence_greedy_misses() {
    assert_eq!(
        run(&mut greedy_is_not_best(), &[vec![2]], &greedy(2), 0),
        [vec![0, 0]]
    );
    let mut m = greedy_is_not_best();
    assert_eq!(run(&mut m, &[vec![2]], &beams(2, 2, 1.0), 0), [vec![1, 0]]);
    // The model was kept in sync: one prefill of the prompt, then one reorder + decode.
    assert_eq!(m.prefills, 1);
    assert_eq!(m.reorders, [vec![0, 0]]);
    assert_eq!(m.decodes.len(), 1);
}

/// EOS=0, a=1, b=2, c=3. After the prompt: EOS .40, a .35, b .20, c .05; after a: EOS .90;
/// after b: EOS .10, a/b/c .30 each.
fn eos_model() -> FnModel {
    FnModel::new(4, |s| match &s[1..] {
        [] => ln(&[0.40, 0.35, 0.20, 0.05]),
        [1] => ln(&[0.90, 0.04, 0.03, 0.03]),
        [2] => ln(&[0.10, 0.30, 0.30, 0.30]),
        _ => ln(&[0.25; 4]),
    })
}

#[test]
fn length_penalty_decides_between_finished_beams() {
    // "EOS" scores ln .40 = -0.92 (length 1); "a EOS" scores ln(.35 * .9) = -1.16 over length 2.
    // length_penalty 1: -1.16 / 2 = -0.58 wins. length_penalty 0: -0.92 wins.
    let cfg = |lp| GenerationConfig {
        eos_token_id: vec![0],
        ..beams(2, 5, lp)
    };
    assert_eq!(
        run(&mut eos_model(), &[vec![3]], &cfg(1.0), 0),
        [vec![1, 0]]
    );
    assert_eq!(run(&mut eos_model(), &[vec![3]], &cfg(0.0), 0), [vec![0]]);
    // length_penalty 2: "a EOS" scores -0.29, but the best running beam, -2.81 / 2^2 = -0.70,
    // could still beat the worst finished one (-0.92), so the search goes on, and the 5-token
    // "b c c c b" (ln(.2 * .3 * .25^3) / 5^2 = -0.28) wins. transformers gives the same.
    assert_eq!(
        run(&mut eos_model(), &[vec![3]], &cfg(2.0), 0),
        [vec![2, 3, 3, 3, 2]]
    );
    // Greedy stops at the first EOS.
    let g = GenerationConfig {
        eos_token_id: vec![0],
        ..greedy(5)
    };
    assert_eq!(run(&mut eos_model(), &[vec![3]], &g, 0), [vec![0]]);
    // Without an EOS id, beams run to max_new_tokens.
    assert_eq!(
        run(&mut eos_model(), &[vec![3]], &beams(2, 3, 1.0), 0)[0].len(),
        3
    );
}

#[test]
fn beam_search_runs_prompts_one_at_a_time_and_reports_tokens() {
    let mut m = greedy_is_not_best();
    let mut seen = Vec::new();
    let out = generate::generate(
        &mut m,
        &[vec![2], vec![2, 1]],
        &beams(2, 2, 1.0),
        0,
        &mut |r, t| {
            seen.push((r, t));
            !(r == 1 && seen.iter().filter(|(r, _)| *r == 1).count() == 1)
        },
    )
    .unwrap();
    assert_eq!(out[0], [1, 0]);
    // Row 1's callback said stop after its first token: the output is cut there.
    assert_eq!(out[1].len(), 1);
    assert_eq!(m.prefills, 2);
}

// ---------------------------------------------------------------------------------------------
// Beam search and greedy against transformers

const M64: u64 = u64::MAX;

fn splitmix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15) & M64;
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `toy_logits` of the script below: hashed, quantized (many exact ties), EOS (token 0) more
/// likely as the sequence grows.
fn toy_logits(seq: &[u32], vocab: usize, levels: u64) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in seq {
        h ^= u64::from(t);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (0..vocab as u64)
        .map(|v| {
            let x = splitmix(h ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut val = ((x >> 33) % levels) as f64 * 0.5 - 4.0;
            if v == 0 {
                val += seq.len() as f64 * 0.5 - 3.0;
            }
            val as f32
        })
        .collect()
}

/// (vocab, levels, prompt, num_beams, length_penalty, early_stopping (0 false, 1 true,
/// 2 "never"), eos ids, max_new_tokens, repetition_penalty, transformers' new tokens).
type Case = (
    usize,
    u64,
    &'static [u32],
    usize,
    f64,
    u8,
    &'static [u32],
    usize,
    f64,
    &'static [u32],
);

// Generated with transformers 5.24.0 / torch 2.15.0 (CPU) by the script below (`grid.py`,
// importing `toy.py`); `use_cache=False`, so transformers re-reads the whole sequence.
//
// # toy.py
// import torch, json, itertools, warnings
// warnings.filterwarnings("ignore")
// from transformers import PreTrainedModel, PretrainedConfig, GenerationMixin, GenerationConfig
// from transformers.modeling_outputs import CausalLMOutputWithPast
// from transformers.utils import logging
// logging.set_verbosity_error()
// M64 = (1 << 64) - 1
//
// def splitmix(x):
//     x = (x + 0x9E3779B97F4A7C15) & M64
//     x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
//     x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
//     return x ^ (x >> 31)
//
// def toy_logits(seq, V, levels):
//     h = 0xcbf29ce484222325
//     for t in seq:
//         h ^= t
//         h = (h * 0x100000001b3) & M64
//     out = []
//     for v in range(V):
//         x = splitmix(h ^ ((v * 0x9E3779B97F4A7C15) & M64))
//         val = ((x >> 33) % levels) * 0.5 - 4.0
//         if v == 0:
//             val += len(seq) * 0.5 - 3.0
//         out.append(val)
//     return torch.tensor(out, dtype=torch.float32)
//
// class ToyConfig(PretrainedConfig):
//     model_type = "toy"
//     def __init__(self, vocab_size=10, levels=17, **kw):
//         self.vocab_size = vocab_size
//         self.levels = levels
//         super().__init__(**kw)
//
// class Toy(PreTrainedModel, GenerationMixin):
//     config_class = ToyConfig
//     def __init__(self, config):
//         super().__init__(config)
//         self.dummy = torch.nn.Parameter(torch.zeros(1))
//     def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kw):
//         B, T = input_ids.shape
//         V = self.config.vocab_size
//         logits = torch.zeros(B, T, V)
//         for b in range(B):
//             logits[b, -1] = toy_logits(input_ids[b].tolist(), V, self.config.levels)
//         return CausalLMOutputWithPast(logits=logits)
//
// def run(V, levels, prompt, **gen):
//     model = Toy(ToyConfig(vocab_size=V, levels=levels))
//     model.generation_config = GenerationConfig()
//     ids = torch.tensor([prompt])
//     out = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **gen)
//     return out[0, len(prompt):].tolist()
//
// if __name__ == "__main__":
//     print(run(6, 17, [3, 1], max_new_tokens=4, num_beams=2, eos_token_id=0, pad_token_id=0))
//     print(run(6, 17, [3, 1], max_new_tokens=4, do_sample=False, eos_token_id=0, pad_token_id=0))
//
// # grid.py
// import random, time
// from toy import run
// rng = random.Random(1234)
// rows = []
// t0 = time.time()
// def fmt(x):
//     s = repr(float(x))
//     return s
// for i in range(170):
//     V = rng.choice([6, 6, 40, 300])
//     levels = rng.choice([17, 3])
//     plen = rng.choice([1, 2, 4])
//     prompt = [rng.randrange(V) for _ in range(plen)]
//     greedy = i >= 140
//     nb = 1 if greedy else rng.choice([2, 3, 4])
//     lp = rng.choice([1.0, 0.0, -0.5, 2.0])
//     es = rng.choice([0, 1, 2])
//     eos = rng.choice([[0], [0, 5], []])
//     mnt = rng.choice([1, 3, 7])
//     rp = rng.choice([1.0, 1.0, 1.5, 0.8])
//     kw = dict(max_new_tokens=mnt, num_beams=nb, do_sample=False, repetition_penalty=rp)
//     if nb > 1:
//         kw.update(length_penalty=lp, early_stopping={0: False, 1: True, 2: "never"}[es])
//     if eos:
//         kw.update(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=eos[0])
//     else:
//         kw.update(eos_token_id=None, pad_token_id=None)
//     out = run(V, levels, prompt, **kw)
//     rows.append(f"    ({V}, {levels}, &{prompt}, {nb}, {fmt(lp)}, {es}, &{eos}, {mnt}, {fmt(rp)}, &{out}),")
// print("\n".join(rows))
// import sys; print(time.time() - t0, file=sys.stderr)
const HF_CASES: &[Case] = &[
    (300, 17, &[46], 4, 1.0, 2, &[], 1, 1.0, &[120]),
    (40, 17, &[1], 2, -0.5, 2, &[], 3, 0.8, &[1, 8, 2]),
    (6, 17, &[5], 2, 1.0, 2, &[0, 5], 1, 1.0, &[5]),
    (
        300,
        17,
        &[45, 263, 296, 23],
        3,
        1.0,
        2,
        &[0, 5],
        3,
        1.5,
        &[136, 147, 56],
    ),
    (40, 17, &[12, 29, 33, 1], 4, 1.0, 0, &[0, 5], 1, 0.8, &[19]),
    (
        300,
        17,
        &[39],
        4,
        2.0,
        0,
        &[0],
        7,
        1.0,
        &[36, 76, 199, 40, 18, 30, 134],
    ),
    (6, 17, &[0, 4], 2, -0.5, 1, &[0], 3, 1.5, &[1, 3, 5]),
    (6, 17, &[1, 2], 2, 2.0, 0, &[], 3, 1.5, &[5, 2, 2]),
    (
        300,
        3,
        &[239, 243, 23, 241],
        4,
        0.0,
        1,
        &[],
        7,
        0.8,
        &[243, 23, 239, 243, 0, 0, 0],
    ),
    (40, 3, &[11], 3, 2.0, 0, &[], 1, 0.8, &[35]),
    (
        300,
        3,
        &[98, 176, 55, 80],
        4,
        -0.5,
        0,
        &[],
        3,
        0.8,
        &[98, 98, 176],
    ),
    (6, 17, &[1, 0], 3, 1.0, 0, &[], 1, 1.5, &[1]),
    (40, 3, &[37], 3, 1.0, 2, &[0, 5], 1, 1.0, &[27]),
    (
        300,
        17,
        &[235, 256, 120, 184],
        2,
        2.0,
        0,
        &[],
        1,
        1.5,
        &[30],
    ),
    (6, 3, &[1, 3, 4, 3], 3, 0.0, 0, &[0], 7, 1.0, &[4, 3, 0]),
    (6, 17, &[2, 1, 0, 5], 4, 1.0, 2, &[0], 1, 1.0, &[4]),
    (
        6,
        3,
        &[5, 2],
        2,
        2.0,
        1,
        &[],
        7,
        1.5,
        &[1, 4, 3, 0, 5, 0, 0],
    ),
    (
        300,
        3,
        &[295, 77, 272, 47],
        3,
        -0.5,
        1,
        &[0, 5],
        7,
        1.5,
        &[26, 7, 27, 0],
    ),
    (6, 3, &[1, 2], 4, 2.0, 0, &[0, 5], 3, 1.0, &[2, 3, 4]),
    (300, 17, &[157, 1], 2, 2.0, 1, &[0, 5], 3, 0.8, &[6, 10, 10]),
    (6, 3, &[3, 1, 2, 4], 3, -0.5, 0, &[0], 7, 0.8, &[1, 2, 0]),
    (
        300,
        17,
        &[239, 53, 13, 187],
        3,
        1.0,
        0,
        &[],
        3,
        1.5,
        &[36, 3, 69],
    ),
    (
        40,
        3,
        &[37, 21, 36, 18],
        4,
        0.0,
        2,
        &[],
        3,
        1.0,
        &[39, 7, 14],
    ),
    (6, 3, &[2, 2, 3, 2], 2, 1.0, 0, &[0, 5], 3, 1.0, &[4, 3, 0]),
    (6, 3, &[5], 2, 0.0, 2, &[0], 3, 1.5, &[3, 2, 1]),
    (300, 17, &[133, 248], 4, 0.0, 1, &[], 1, 1.0, &[57]),
    (
        40,
        17,
        &[30],
        3,
        0.0,
        2,
        &[],
        7,
        1.0,
        &[27, 13, 16, 18, 1, 19, 4],
    ),
    (
        6,
        17,
        &[1, 4, 4, 5],
        3,
        -0.5,
        0,
        &[],
        7,
        0.8,
        &[1, 5, 0, 2, 0, 4, 0],
    ),
    (6, 3, &[2], 4, 2.0, 0, &[], 7, 1.0, &[2, 4, 5, 5, 5, 4, 0]),
    (
        40,
        17,
        &[12, 22, 33, 24],
        4,
        2.0,
        0,
        &[0],
        3,
        1.0,
        &[2, 14, 28],
    ),
    (
        40,
        3,
        &[9, 31],
        4,
        0.0,
        2,
        &[0],
        7,
        1.5,
        &[13, 8, 23, 7, 35, 0],
    ),
    (
        40,
        3,
        &[4],
        4,
        1.0,
        0,
        &[0],
        7,
        1.0,
        &[29, 37, 29, 17, 14, 17, 30],
    ),
    (6, 3, &[5, 0, 4, 3], 3, -0.5, 1, &[0, 5], 3, 1.5, &[4, 2, 1]),
    (6, 3, &[2], 4, -0.5, 0, &[], 7, 1.0, &[2, 4, 5, 5, 5, 4, 0]),
    (6, 3, &[1, 2, 2, 2], 3, 0.0, 1, &[0], 1, 0.8, &[4]),
    (6, 17, &[2, 5], 2, -0.5, 2, &[], 3, 0.8, &[0, 1, 4]),
    (
        300,
        3,
        &[227, 190, 52, 270],
        3,
        0.0,
        0,
        &[0, 5],
        3,
        1.0,
        &[21, 28, 13],
    ),
    (6, 3, &[5], 2, -0.5, 1, &[0, 5], 7, 1.5, &[3, 2, 1, 0]),
    (
        300,
        17,
        &[242, 238, 163, 226],
        4,
        1.0,
        2,
        &[0, 5],
        1,
        1.0,
        &[121],
    ),
    (6, 17, &[2, 1, 3, 2], 4, 0.0, 1, &[0], 1, 1.5, &[0]),
    (6, 17, &[5], 3, 2.0, 1, &[0, 5], 3, 0.8, &[5]),
    (6, 3, &[0, 2], 4, -0.5, 2, &[0, 5], 7, 1.0, &[4, 5]),
    (6, 17, &[3, 4, 3, 3], 4, -0.5, 2, &[0, 5], 3, 0.8, &[5]),
    (40, 3, &[15, 18], 2, 0.0, 1, &[0], 1, 1.0, &[30]),
    (
        40,
        17,
        &[28, 1],
        4,
        2.0,
        0,
        &[],
        7,
        1.0,
        &[4, 1, 24, 31, 13, 35, 31],
    ),
    (6, 17, &[3, 5, 3, 3], 2, -0.5, 2, &[0, 5], 7, 0.8, &[3, 0]),
    (6, 3, &[4], 2, 0.0, 0, &[0, 5], 3, 1.0, &[5]),
    (6, 3, &[3], 4, -0.5, 2, &[0], 3, 0.8, &[3, 2, 2]),
    (300, 3, &[85, 33], 3, 0.0, 1, &[0], 1, 1.5, &[9]),
    (6, 3, &[3], 2, 0.0, 2, &[], 1, 1.0, &[3]),
    (40, 3, &[0, 33, 22, 12], 4, 0.0, 2, &[0], 1, 1.5, &[10]),
    (
        300,
        17,
        &[5, 212, 216, 254],
        3,
        -0.5,
        2,
        &[],
        7,
        1.0,
        &[8, 7, 56, 0, 10, 56, 0],
    ),
    (300, 3, &[8, 10], 3, 1.0, 1, &[], 1, 0.8, &[8]),
    (300, 17, &[220], 3, 1.0, 1, &[0], 1, 1.0, &[58]),
    (
        40,
        17,
        &[14, 4, 32, 24],
        2,
        0.0,
        1,
        &[],
        7,
        1.0,
        &[15, 36, 28, 27, 37, 14, 5],
    ),
    (
        40,
        17,
        &[33, 1],
        2,
        2.0,
        1,
        &[0],
        7,
        1.5,
        &[4, 6, 13, 28, 9, 18, 39],
    ),
    (6, 17, &[3, 4, 0, 2], 2, 2.0, 1, &[0], 3, 1.0, &[4, 3, 4]),
    (
        300,
        3,
        &[4, 149, 166, 105],
        2,
        1.0,
        2,
        &[0, 5],
        7,
        0.8,
        &[149, 4, 4, 166, 105, 0],
    ),
    (6, 3, &[3], 4, -0.5, 2, &[0, 5], 1, 1.0, &[3]),
    (
        300,
        3,
        &[19, 209, 226, 268],
        2,
        2.0,
        0,
        &[],
        7,
        1.5,
        &[5, 7, 2, 14, 0, 16, 0],
    ),
    (
        6,
        17,
        &[0, 2],
        4,
        0.0,
        2,
        &[0],
        7,
        1.5,
        &[3, 2, 3, 1, 4, 3, 0],
    ),
    (300, 3, &[32], 4, 2.0, 2, &[0], 3, 1.0, &[2, 18, 19]),
    (
        6,
        17,
        &[3, 5, 4, 1],
        4,
        1.0,
        1,
        &[],
        7,
        0.8,
        &[5, 4, 2, 0, 0, 5, 4],
    ),
    (40, 17, &[36, 21, 34, 21], 4, 0.0, 0, &[], 1, 1.0, &[32]),
    (40, 17, &[5], 2, -0.5, 2, &[], 3, 0.8, &[6, 5, 28]),
    (6, 3, &[0, 1], 2, -0.5, 2, &[0, 5], 3, 0.8, &[1, 5]),
    (
        40,
        17,
        &[8],
        2,
        2.0,
        1,
        &[],
        7,
        1.0,
        &[25, 31, 10, 2, 1, 9, 0],
    ),
    (6, 17, &[4, 1], 2, -0.5, 2, &[], 3, 1.0, &[3, 1, 0]),
    (
        300,
        3,
        &[215],
        3,
        0.0,
        2,
        &[0],
        7,
        1.0,
        &[12, 3, 24, 19, 14, 9, 16],
    ),
    (
        300,
        17,
        &[221, 255, 71, 194],
        4,
        2.0,
        2,
        &[],
        3,
        1.5,
        &[52, 197, 137],
    ),
    (40, 3, &[22], 2, -0.5, 2, &[0, 5], 1, 1.5, &[21]),
    (6, 17, &[5, 4, 5, 3], 2, -0.5, 1, &[0, 5], 1, 1.5, &[2]),
    (6, 17, &[4], 3, 0.0, 1, &[], 3, 1.5, &[2, 5, 2]),
    (
        40,
        3,
        &[17, 28],
        4,
        1.0,
        2,
        &[],
        7,
        1.5,
        &[33, 9, 5, 20, 18, 23, 0],
    ),
    (40, 17, &[6, 25], 4, -0.5, 1, &[0, 5], 3, 0.8, &[18, 25, 22]),
    (
        300,
        3,
        &[86, 232],
        4,
        -0.5,
        0,
        &[],
        7,
        1.0,
        &[12, 14, 28, 8, 33, 0, 0],
    ),
    (6, 3, &[3, 4, 5, 1], 2, 2.0, 1, &[0, 5], 3, 1.5, &[2, 2, 3]),
    (6, 3, &[3, 2, 5, 0], 4, 0.0, 2, &[], 3, 1.0, &[2, 1, 1]),
    (300, 3, &[141, 230], 2, 0.0, 2, &[0, 5], 3, 1.0, &[4, 21, 3]),
    (6, 3, &[3], 2, 2.0, 2, &[], 1, 1.0, &[3]),
    (6, 3, &[2, 1], 4, 2.0, 1, &[0], 1, 0.8, &[1]),
    (300, 17, &[27], 2, 1.0, 0, &[0], 1, 0.8, &[69]),
    (
        40,
        17,
        &[1, 5, 13, 8],
        3,
        2.0,
        1,
        &[],
        7,
        0.8,
        &[31, 6, 0, 34, 0, 10, 1],
    ),
    (40, 3, &[14, 4], 3, 1.0, 0, &[], 3, 0.8, &[15, 15, 15]),
    (
        40,
        3,
        &[19, 16, 10, 11],
        3,
        1.0,
        0,
        &[0, 5],
        7,
        1.5,
        &[23, 9, 1, 22, 0],
    ),
    (
        40,
        3,
        &[27],
        2,
        -0.5,
        2,
        &[0, 5],
        7,
        1.0,
        &[14, 4, 23, 39, 2, 29, 0],
    ),
    (40, 17, &[17, 30], 2, 2.0, 0, &[0, 5], 1, 1.0, &[11]),
    (6, 17, &[2, 2, 5, 3], 2, 1.0, 0, &[], 1, 1.0, &[2]),
    (
        6,
        3,
        &[4, 4],
        2,
        -0.5,
        1,
        &[],
        7,
        1.0,
        &[1, 3, 4, 3, 3, 0, 0],
    ),
    (6, 3, &[5, 2], 3, 2.0, 2, &[0], 3, 0.8, &[2, 4, 5]),
    (
        40,
        17,
        &[12],
        3,
        1.0,
        2,
        &[0, 5],
        7,
        1.0,
        &[9, 16, 27, 35, 26, 21, 36],
    ),
    (300, 17, &[221, 7], 4, 1.0, 2, &[], 3, 0.8, &[5, 5, 107]),
    (6, 17, &[1, 4], 2, 0.0, 2, &[0], 3, 1.0, &[2, 5, 5]),
    (6, 3, &[4, 0], 2, 0.0, 2, &[0], 3, 1.0, &[3, 4, 4]),
    (6, 17, &[3], 2, 0.0, 1, &[], 3, 1.0, &[5, 5, 1]),
    (40, 3, &[3], 3, 2.0, 1, &[], 1, 0.8, &[3]),
    (
        300,
        3,
        &[293, 167, 289, 146],
        3,
        1.0,
        2,
        &[0, 5],
        3,
        1.5,
        &[37, 4, 18],
    ),
    (300, 3, &[74], 2, 1.0, 1, &[0, 5], 3, 0.8, &[74, 74, 74]),
    (40, 3, &[35], 4, 1.0, 1, &[], 3, 0.8, &[14, 14, 35]),
    (6, 17, &[0], 2, 1.0, 0, &[0, 5], 3, 1.5, &[5]),
    (40, 17, &[12, 38], 4, 0.0, 2, &[0, 5], 3, 1.5, &[32, 5]),
    (
        300,
        17,
        &[238, 21, 217, 13],
        2,
        1.0,
        2,
        &[0, 5],
        1,
        1.5,
        &[3],
    ),
    (
        300,
        17,
        &[252, 35],
        4,
        1.0,
        0,
        &[0, 5],
        3,
        1.0,
        &[215, 264, 110],
    ),
    (
        300,
        17,
        &[254, 200],
        4,
        -0.5,
        1,
        &[0],
        3,
        1.0,
        &[85, 95, 125],
    ),
    (6, 3, &[1, 3, 2, 3], 4, -0.5, 0, &[0], 3, 1.0, &[3, 0]),
    (300, 17, &[103], 2, 2.0, 1, &[0], 3, 1.0, &[6, 5, 68]),
    (6, 17, &[1], 2, 1.0, 1, &[0, 5], 7, 1.0, &[4, 2, 5]),
    (6, 17, &[4, 2, 3, 2], 4, 2.0, 2, &[0], 1, 1.0, &[1]),
    (300, 3, &[162], 2, 0.0, 1, &[0, 5], 3, 1.5, &[10, 1, 12]),
    (6, 17, &[0], 3, -0.5, 2, &[0, 5], 7, 1.5, &[5]),
    (6, 3, &[2], 3, 2.0, 1, &[0], 1, 1.5, &[5]),
    (40, 17, &[37], 2, 2.0, 1, &[], 3, 1.5, &[5, 33, 18]),
    (
        300,
        17,
        &[200, 40],
        2,
        -0.5,
        1,
        &[],
        7,
        1.0,
        &[106, 128, 1, 66, 26, 36, 0],
    ),
    (6, 17, &[0, 0, 3, 5], 3, 0.0, 1, &[0], 1, 1.0, &[5]),
    (6, 3, &[0, 2, 2, 1], 3, 2.0, 2, &[0], 3, 0.8, &[5, 1, 0]),
    (6, 3, &[3], 4, 0.0, 1, &[], 7, 1.0, &[2, 5, 4, 2, 2, 0, 0]),
    (6, 17, &[0, 1, 2, 2], 2, 1.0, 0, &[0], 1, 1.0, &[5]),
    (6, 3, &[5, 5], 3, -0.5, 0, &[0, 5], 3, 1.5, &[1, 5]),
    (
        300,
        17,
        &[16],
        2,
        0.0,
        2,
        &[0],
        7,
        1.0,
        &[108, 64, 53, 48, 44, 103, 21],
    ),
    (6, 3, &[3, 4, 5, 2], 4, -0.5, 2, &[0, 5], 7, 1.0, &[5]),
    (300, 3, &[297, 91], 2, -0.5, 2, &[0, 5], 1, 1.5, &[3]),
    (
        300,
        3,
        &[273, 126, 60, 268],
        2,
        2.0,
        1,
        &[],
        7,
        1.5,
        &[9, 2, 5, 0, 18, 10, 0],
    ),
    (40, 17, &[26, 23], 2, -0.5, 1, &[0, 5], 3, 1.0, &[12, 9, 21]),
    (
        300,
        17,
        &[147, 183, 255, 86],
        2,
        1.0,
        1,
        &[],
        3,
        1.5,
        &[51, 140, 54],
    ),
    (6, 3, &[5, 2, 5, 5], 3, 0.0, 1, &[0], 7, 1.0, &[1, 5, 0]),
    (
        300,
        17,
        &[163, 61, 108, 132],
        3,
        2.0,
        0,
        &[0],
        7,
        1.5,
        &[62, 37, 19, 57, 46, 143, 0],
    ),
    (
        40,
        3,
        &[25, 28, 20, 15],
        2,
        2.0,
        0,
        &[0, 5],
        3,
        1.5,
        &[35, 9, 29],
    ),
    (
        40,
        3,
        &[17, 34, 23, 32],
        4,
        2.0,
        0,
        &[0, 5],
        7,
        1.0,
        &[30, 19, 27, 2, 28, 0],
    ),
    (6, 17, &[0], 3, -0.5, 2, &[], 7, 1.0, &[5, 3, 5, 1, 3, 4, 2]),
    (6, 3, &[3, 4, 5, 2], 3, 2.0, 0, &[0], 1, 0.8, &[4]),
    (
        300,
        3,
        &[133, 168, 270, 57],
        3,
        0.0,
        0,
        &[0, 5],
        3,
        1.0,
        &[11, 37, 8],
    ),
    (
        300,
        17,
        &[86, 255],
        3,
        0.0,
        0,
        &[],
        7,
        0.8,
        &[86, 135, 135, 29, 29, 86, 86],
    ),
    (300, 17, &[174], 3, 1.0, 1, &[], 3, 1.0, &[59, 36, 60]),
    (6, 3, &[4, 4, 1, 4], 3, 0.0, 1, &[], 3, 1.5, &[4, 2, 5]),
    (6, 3, &[4, 1], 2, 2.0, 0, &[], 3, 1.0, &[3, 4, 4]),
    (6, 3, &[5], 3, 0.0, 1, &[0, 5], 1, 1.0, &[2]),
    (6, 17, &[4, 2], 4, -0.5, 2, &[0, 5], 1, 1.0, &[5]),
    (40, 17, &[20, 6, 17, 36], 4, 0.0, 0, &[0], 1, 1.5, &[22]),
    (6, 17, &[0], 3, 2.0, 1, &[], 3, 1.0, &[5, 3, 5]),
    (
        300,
        17,
        &[237, 128, 178, 275],
        3,
        2.0,
        2,
        &[],
        3,
        1.0,
        &[60, 108, 1],
    ),
    (300, 3, &[112], 1, 2.0, 2, &[0, 5], 3, 1.0, &[6, 1, 4]),
    (
        40,
        3,
        &[39, 15, 30, 24],
        1,
        -0.5,
        1,
        &[],
        7,
        1.0,
        &[1, 4, 2, 3, 0, 0, 0],
    ),
    (6, 17, &[0, 0, 2, 4], 1, 1.0, 2, &[0, 5], 7, 1.5, &[2, 3, 0]),
    (
        40,
        3,
        &[16, 13, 33, 36],
        1,
        2.0,
        2,
        &[0],
        3,
        1.5,
        &[1, 5, 10],
    ),
    (
        6,
        17,
        &[5, 3, 2, 1],
        1,
        1.0,
        2,
        &[],
        7,
        1.0,
        &[0, 1, 2, 0, 5, 2, 3],
    ),
    (6, 3, &[3, 1], 1, 0.0, 0, &[0, 5], 3, 1.0, &[1, 1, 1]),
    (6, 17, &[5], 1, 1.0, 2, &[], 1, 0.8, &[5]),
    (
        300,
        17,
        &[128],
        1,
        2.0,
        1,
        &[0],
        7,
        1.0,
        &[49, 9, 5, 4, 10, 6, 5],
    ),
    (40, 3, &[34, 9], 1, -0.5, 1, &[0], 7, 1.5, &[3, 1, 2, 10, 0]),
    (6, 17, &[4, 1, 5, 3], 1, 0.0, 1, &[0, 5], 1, 1.0, &[1]),
    (
        300,
        17,
        &[62, 215],
        1,
        1.0,
        1,
        &[],
        7,
        1.0,
        &[15, 11, 21, 22, 12, 0, 0],
    ),
    (6, 17, &[4, 2, 3, 5], 1, -0.5, 2, &[0], 3, 1.0, &[0]),
    (6, 17, &[0, 3, 3, 3], 1, -0.5, 1, &[0, 5], 7, 1.5, &[0]),
    (6, 17, &[2, 1], 1, 0.0, 2, &[0, 5], 1, 1.0, &[5]),
    (40, 3, &[25, 19], 1, 2.0, 0, &[0, 5], 3, 1.5, &[1, 2, 4]),
    (6, 17, &[5], 1, 1.0, 2, &[0], 1, 1.5, &[2]),
    (40, 3, &[16], 1, -0.5, 1, &[0], 1, 1.0, &[1]),
    (300, 3, &[221, 296], 1, 0.0, 2, &[], 1, 1.0, &[3]),
    (6, 3, &[0, 4], 1, 0.0, 0, &[], 3, 0.8, &[4, 4, 4]),
    (
        6,
        3,
        &[3, 0],
        1,
        1.0,
        2,
        &[],
        7,
        1.0,
        &[1, 2, 4, 2, 1, 0, 0],
    ),
    (6, 3, &[4, 2, 4, 2], 1, 2.0, 2, &[], 1, 1.5, &[3]),
    (6, 3, &[2], 1, 1.0, 1, &[0], 1, 1.0, &[2]),
    (
        300,
        3,
        &[22],
        1,
        1.0,
        1,
        &[0, 5],
        7,
        1.0,
        &[2, 2, 1, 1, 1, 3, 0],
    ),
    (6, 3, &[1, 0, 0, 3], 1, 1.0, 2, &[0], 1, 1.5, &[5]),
    (40, 17, &[1, 1], 1, 2.0, 2, &[0], 1, 1.0, &[8]),
    (6, 3, &[3], 1, 2.0, 1, &[0, 5], 1, 1.0, &[2]),
    (6, 3, &[5, 0, 1, 2], 1, -0.5, 1, &[0, 5], 7, 1.5, &[3, 4, 0]),
    (40, 3, &[9], 1, -0.5, 2, &[], 3, 0.8, &[4, 3, 3]),
    (6, 17, &[4, 1], 1, -0.5, 2, &[0, 5], 3, 1.0, &[1, 5]),
    (6, 3, &[1, 4], 1, 0.0, 1, &[], 1, 0.8, &[1]),
];

#[test]
fn beam_search_and_greedy_match_transformers() {
    let mut beam_cases = 0;
    for (i, &(vocab, levels, prompt, nb, lp, es, eos, mnt, rp, want)) in HF_CASES.iter().enumerate()
    {
        let cfg = GenerationConfig {
            num_beams: nb,
            length_penalty: lp,
            early_stopping: match es {
                0 => EarlyStopping::Heuristic,
                1 => EarlyStopping::AllFinished,
                _ => EarlyStopping::Never,
            },
            eos_token_id: eos.to_vec(),
            max_new_tokens: Some(mnt),
            repetition_penalty: rp,
            ..GenerationConfig::default()
        };
        let mut m = FnModel::new(vocab, move |s| toy_logits(s, vocab, levels));
        let got = run(&mut m, &[prompt.to_vec()], &cfg, 0);
        assert_eq!(got[0], want, "case {i}: {:?}", HF_CASES[i]);
        beam_cases += usize::from(nb > 1);
    }
    assert!(beam_cases >= 100);
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn config_defaults_match_transformers() {
    let c = GenerationConfig::from_json_str("{}").unwrap();
    assert_eq!(c, GenerationConfig::default());
    assert_eq!(
        (
            c.do_sample,
            c.temperature,
            c.top_k,
            c.top_p,
            c.min_p,
            c.repetition_penalty
        ),
        (false, 1.0, 50, 1.0, None, 1.0)
    );
    assert_eq!(
        (c.num_beams, c.length_penalty, c.early_stopping),
        (1, 1.0, EarlyStopping::Heuristic)
    );
    assert_eq!((c.max_new_tokens, c.max_length), (None, None));
    c.validate().unwrap();
}

#[test]
fn config_parses_real_files() {
    // Llama 3 style: eos list, nulls, unknown keys.
    let c = GenerationConfig::from_json_str(
        r#"{"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009],
            "temperature": 0.6, "top_p": 0.9, "top_k": null, "pad_token_id": null,
            "transformers_version": "4.45.0", "some_future_key": {"a": 1}}"#,
    )
    .unwrap();
    assert_eq!(c.eos_token_id, [128001, 128008, 128009]);
    assert_eq!((c.bos_token_id, c.pad_token_id), (Some(128000), None));
    assert_eq!(
        (c.do_sample, c.temperature, c.top_p, c.top_k),
        (true, 0.6, 0.9, 50)
    );
    assert!(c.unsupported.is_empty());
    c.validate().unwrap();

    let c = GenerationConfig::from_json_str(
        r#"{"eos_token_id": 2, "num_beams": 4, "early_stopping": "never", "length_penalty": 0.6,
            "max_new_tokens": 64, "no_repeat_ngram_size": 3, "suppress_tokens": null,
            "min_p": 0.05, "stop_strings": "<END>", "pad_token_id": -1}"#,
    )
    .unwrap();
    assert_eq!(c.eos_token_id, [2]);
    assert_eq!(
        (c.num_beams, c.early_stopping, c.length_penalty),
        (4, EarlyStopping::Never, 0.6)
    );
    assert_eq!(
        (c.max_new_tokens, c.min_p, c.pad_token_id),
        (Some(64), Some(0.05), None)
    );
    assert_eq!(c.stop_strings, ["<END>"]);
    assert_eq!(c.unsupported, ["no_repeat_ngram_size"]);
    assert_eq!(
        GenerationConfig::from_json_str(r#"{"early_stopping": true}"#)
            .unwrap()
            .early_stopping,
        EarlyStopping::AllFinished
    );
    // The serde path gives the same result.
    let via_serde: GenerationConfig =
        serde_json::from_str(r#"{"eos_token_id": 2, "top_k": 5}"#).unwrap();
    assert_eq!((via_serde.eos_token_id, via_serde.top_k), (vec![2], 5));
}

#[test]
fn config_parse_errors_are_clear() {
    let err = |s: &str| GenerationConfig::from_json_str(s).unwrap_err().to_string();
    assert!(err(r#"{"early_stopping": "sometimes"}"#).contains("early_stopping"));
    assert!(err(r#"{"eos_token_id": -3}"#).contains("eos_token_id"));
    assert!(err(r#"{"max_new_tokens": -1}"#)
        .contains("max_new_tokens must be a non-negative integer, got -1"));
    assert!(err(r#"{"top_k": "many"}"#).contains("invalid generation config"));
    assert!(err("[1, 2]").contains("JSON object"));
    assert!(err("{").contains("invalid generation config"));
    let missing = GenerationConfig::from_file("/nonexistent/generation_config.json").unwrap_err();
    assert!(matches!(missing, ConfigError::Io { .. }), "{missing}");
}

fn invalid(cfg: GenerationConfig) -> String {
    match cfg.validate() {
        Err(ConfigError::Invalid(msg)) => msg,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn validation_rejects_out_of_range_values() {
    let s = GenerationConfig {
        do_sample: true,
        ..GenerationConfig::default()
    };
    assert_eq!(
        invalid(GenerationConfig {
            top_p: 1.5,
            ..s.clone()
        }),
        "top_p must be in [0, 1], got 1.5"
    );
    assert_eq!(
        invalid(GenerationConfig {
            top_p: -0.1,
            ..s.clone()
        }),
        "top_p must be in [0, 1], got -0.1"
    );
    assert_eq!(
        invalid(GenerationConfig {
            min_p: Some(2.0),
            ..s.clone()
        }),
        "min_p must be in [0, 1], got 2"
    );
    assert!(invalid(GenerationConfig {
        temperature: 0.0,
        ..s.clone()
    })
    .contains("temperature 0 means greedy"));
    assert_eq!(
        invalid(GenerationConfig {
            temperature: -1.0,
            ..s.clone()
        }),
        "temperature must be a finite number > 0, got -1"
    );
    assert!(invalid(GenerationConfig {
        temperature: f64::NAN,
        ..s.clone()
    })
    .starts_with("temperature"));
    assert_eq!(
        invalid(GenerationConfig {
            repetition_penalty: 0.0,
            ..GenerationConfig::default()
        }),
        "repetition_penalty must be a finite number > 0, got 0"
    );
    assert_eq!(
        invalid(GenerationConfig {
            num_beams: 0,
            ..GenerationConfig::default()
        }),
        "num_beams must be at least 1, got 0"
    );
    assert_eq!(
        invalid(GenerationConfig {
            max_new_tokens: Some(0),
            ..GenerationConfig::default()
        }),
        "max_new_tokens must be greater than 0, got 0"
    );
    assert!(invalid(GenerationConfig {
        num_beams: 4,
        ..s.clone()
    })
    .contains("beam sampling"));
    assert!(invalid(GenerationConfig {
        num_beams: 2,
        length_penalty: f64::INFINITY,
        ..GenerationConfig::default()
    })
    .starts_with("length_penalty"));
    // Sampling settings are not checked when not sampling (transformers only warns).
    GenerationConfig {
        top_p: 1.5,
        temperature: 0.0,
        ..GenerationConfig::default()
    }
    .validate()
    .unwrap();
    // top_p 0 and min_p 0 / 1 are in range; top_k 0 disables top-k.
    GenerationConfig {
        top_p: 0.0,
        min_p: Some(1.0),
        top_k: 0,
        ..s
    }
    .validate()
    .unwrap();
}

#[test]
fn cli_temperature_rule() {
    let mut c = GenerationConfig::default();
    c.set_temperature(0.7);
    assert!(c.do_sample && c.temperature == 0.7);
    c.set_temperature(0.0);
    assert!(!c.do_sample && c.temperature == 1.0);
    c.validate().unwrap();
}

#[test]
fn generate_reports_bad_inputs_as_errors() {
    let mut m = FnModel::new(4, |_| vec![0.0; 4]);
    let cfg = greedy(2);
    let err =
        generate::generate(&mut m, &[vec![1], vec![]], &cfg, 0, &mut |_, _| true).unwrap_err();
    assert_eq!(err.to_string(), "prompt 1: the prompt is empty");
    let err = generate::generate(&mut m, &[vec![9]], &cfg, 0, &mut |_, _| true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "prompt 0: token id 9 is outside the vocabulary (size 4)"
    );
    let bad = GenerationConfig {
        top_p: 2.0,
        do_sample: true,
        ..cfg.clone()
    };
    assert!(matches!(
        generate::generate(&mut m, &[vec![1]], &bad, 0, &mut |_, _| true),
        Err(GenerateError::Config(_))
    ));
    assert!(generate::generate(&mut m, &[], &cfg, 0, &mut |_, _| true)
        .unwrap()
        .is_empty());
    // A model returning the wrong number of logits.
    let mut short = FnModel::new(4, |_| vec![0.0; 3]);
    let err = generate::generate(&mut short, &[vec![1]], &cfg, 0, &mut |_, _| true).unwrap_err();
    assert!(matches!(err, GenerateError::BadLogits { .. }), "{err}");
    assert!(
        generate::generate(&mut short, &[vec![1]], &beams(2, 2, 1.0), 0, &mut |_, _| {
            true
        })
        .is_err()
    );
    // A model error is passed through.
    struct Broken;
    impl LanguageModel for Broken {
        fn vocab_size(&self) -> usize {
            4
        }
        fn prefill(&mut self, _: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
            Err(ModelError("out of memory".into()))
        }
        fn decode(&mut self, _: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
            unreachable!()
        }
        fn reorder(&mut self, _: &[usize]) -> Result<(), ModelError> {
            unreachable!()
        }
    }
    let err = generate::generate(&mut Broken, &[vec![1]], &cfg, 0, &mut |_, _| true).unwrap_err();
    assert_eq!(err.to_string(), "model error: out of memory");
}

//! A [`LanguageModel`] over a causal LM's two graphs (prefill and decode), run by a backend
//! ([`GraphExecutor`]: the CPU backend by default), keeping the KV cache between steps where
//! the backend holds it (on the device for CUDA).
//!
//! Graph interface (what kiln's model families trace): inputs `input_ids`, `position_ids`
//! (i64 `[batch, seq]`) and `attention_mask` (i64 0/1 `[batch, kv]` over all key positions);
//! outputs `logits` (f32 `[batch, seq, vocab]`; the prefill graph may also have `last_logits`,
//! the last position's, which generation then reads alone) and `present.{i}.key` /
//! `present.{i}.value`;
//! the decode graph also takes `past.{i}.key` / `past.{i}.value` (f32, or the compute dtype
//! after bf16/fp8 lowering, which stores the cache narrow). Each step's `present` values are
//! fed back unchanged as the next step's `past`: the CPU backend returns them as states that
//! grow in place ([`crate::cpu::state`]), the CUDA backend keeps them on the device. Prompts of
//! different lengths are left-padded; positions count real tokens only (as transformers'
//! `generate`).

use crate::executor::{GraphExecutor, Value};
use crate::lm::{LanguageModel, ModelError};
use crate::reference::{ExecError, ParamSource};
use crate::Tensor;
use kiln_ir::Graph;
use std::collections::HashMap;

/// The cache and bookkeeping of the current batch.
struct Batch {
    /// Per layer: keys and values `[rows, kv_heads, len, head_dim]`.
    cache: Vec<(Value, Value)>,
    /// Per row: 0/1 over all positions so far.
    mask: Vec<Vec<i64>>,
    /// Per row: the position id of the next token.
    next_pos: Vec<i64>,
}

/// A causal LM run by a backend.
pub struct GraphLm<P> {
    prefill: Box<dyn GraphExecutor>,
    decode: Box<dyn GraphExecutor>,
    params: P,
    vocab_size: usize,
    batch: Option<Batch>,
    /// Per graph (prefill, decode): the outputs a step reads — each layer's key and value
    /// cache, then the logits (`last_logits` where the graph has them).
    step_outputs: [Vec<String>; 2],
}

/// The outputs a step of `graph` reads ([`GraphLm`]'s `step_outputs`). Only the last
/// position's logits are read: a prefill graph that has them alone (`last_logits`) skips the
/// head on every other position.
fn step_outputs(graph: &Graph, num_layers: usize) -> Vec<String> {
    let logits = if graph.outputs().iter().any(|o| o.name == "last_logits") {
        "last_logits"
    } else {
        "logits"
    };
    (0..num_layers)
        .flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")])
        .chain([logits.to_string()])
        .collect()
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError(e.to_string())
}

impl<P: ParamSource> GraphLm<P> {
    /// A model from its two graphs already compiled for a backend.
    pub fn with_executors(
        prefill: Box<dyn GraphExecutor>,
        decode: Box<dyn GraphExecutor>,
        params: P,
        num_layers: usize,
        vocab_size: usize,
    ) -> Self {
        GraphLm {
            step_outputs: [
                step_outputs(prefill.graph(), num_layers),
                step_outputs(decode.graph(), num_layers),
            ],
            prefill,
            decode,
            params,
            vocab_size,
            batch: None,
        }
    }

    /// The bound parameters.
    pub fn params(&self) -> &P {
        &self.params
    }

    /// The compiled prefill and decode graphs.
    pub fn graphs(&self) -> [&dyn GraphExecutor; 2] {
        [self.prefill.as_ref(), self.decode.as_ref()]
    }

    /// The parameters, taken back (to compile the graphs for another backend).
    pub fn into_params(self) -> P {
        self.params
    }

    /// The prefill graph, the decode graph and the parameters.
    pub fn parts(&self) -> (&Graph, &Graph, &P) {
        (self.prefill.graph(), self.decode.graph(), &self.params)
    }

    /// One plain forward pass of a single sequence through the prefill graph: logits
    /// `[1, len, vocab]` for every position. The current batch is left as it is.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        let n = ids.len();
        if n == 0 {
            return Err(err("the sequence needs at least one token"));
        }
        let inputs = HashMap::from([
            (
                "input_ids".to_string(),
                ids_tensor(1, n, ids.iter().map(|&t| i64::from(t)).collect())?,
            ),
            (
                "position_ids".to_string(),
                ids_tensor(1, n, (0..n as i64).collect())?,
            ),
            ("attention_mask".to_string(), ids_tensor(1, n, vec![1; n])?),
        ]);
        let inputs = inputs
            .into_iter()
            .map(|(k, t)| (k, Value::Host(t)))
            .collect();
        let mut out = self
            .prefill
            .run_outputs(inputs, &self.params, &["logits"])
            .map_err(err)?;
        out.remove("logits")
            .ok_or_else(|| err("graph has no output logits"))?
            .into_host()
            .map_err(err)
    }

    /// Runs `graph` and returns the logits of each row's last position, storing the new cache.
    fn step(
        &mut self,
        decode: bool,
        mut inputs: HashMap<String, Value>,
        mask: Vec<Vec<i64>>,
        next_pos: Vec<i64>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let rows = mask.len();
        let kv = mask.first().map_or(0, Vec::len);
        let flat: Vec<i64> = mask.iter().flatten().copied().collect();
        inputs.insert(
            "attention_mask".into(),
            Value::Host(Tensor::from_i64(vec![rows, kv], flat).map_err(err)?),
        );
        let graph = if decode { &self.decode } else { &self.prefill };
        let names = &self.step_outputs[usize::from(decode)];
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut out = graph
            .run_outputs(inputs, &self.params, &wanted)
            .map_err(err)?;
        let mut take = |name: &str| {
            out.remove(name)
                .ok_or_else(|| err(format!("graph has no output {name}")))
        };
        let (cache_names, logits) = names.split_at(names.len() - 1);
        let cache = cache_names
            .chunks(2)
            .map(|kv| Ok((take(&kv[0])?, take(&kv[1])?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let logits = take(&logits[0])?.into_host().map_err(err)?;
        let values = logits.as_f32().ok_or_else(|| err("logits are not f32"))?;
        let vocab = self.vocab_size;
        let per_row = values.len() / rows.max(1);
        if per_row < vocab || !per_row.is_multiple_of(vocab) {
            return Err(err(format!(
                "logits have shape {:?}, expected [{rows}, seq, {vocab}]",
                logits.shape()
            )));
        }
        let last = (0..rows)
            .map(|r| values[(r + 1) * per_row - vocab..(r + 1) * per_row].to_vec())
            .collect();
        self.batch = Some(Batch {
            cache,
            mask,
            next_pos,
        });
        Ok(last)
    }
}

fn ids_tensor(rows: usize, cols: usize, data: Vec<i64>) -> Result<Tensor, ModelError> {
    Tensor::from_i64(vec![rows, cols], data).map_err(err)
}

fn ids_value(rows: usize, cols: usize, data: Vec<i64>) -> Result<Value, ModelError> {
    ids_tensor(rows, cols, data).map(Value::Host)
}

impl<P: ParamSource> LanguageModel for GraphLm<P> {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let rows = prompts.len();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if rows == 0 || prompts.iter().any(Vec::is_empty) {
            return Err(err("every prompt needs at least one token"));
        }
        let (mut ids, mut pos, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            let pad = len - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().map(|&t| i64::from(t))));
            pos.extend(std::iter::repeat_n(1, pad).chain(0..p.len() as i64));
            mask.push(
                std::iter::repeat_n(0, pad)
                    .chain(std::iter::repeat_n(1, p.len()))
                    .collect(),
            );
        }
        let next_pos = prompts.iter().map(|p| p.len() as i64).collect();
        let inputs = HashMap::from([
            ("input_ids".to_string(), ids_value(rows, len, ids)?),
            ("position_ids".to_string(), ids_value(rows, len, pos)?),
        ]);
        self.step(false, inputs, mask, next_pos)
    }

    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let batch = self
            .batch
            .take()
            .ok_or_else(|| err("decode before prefill"))?;
        let rows = batch.mask.len();
        if tokens.len() != rows {
            return Err(err(format!(
                "{} tokens for a batch of {rows} rows",
                tokens.len()
            )));
        }
        let mut inputs = HashMap::from([
            (
                "input_ids".to_string(),
                ids_value(rows, 1, tokens.iter().map(|&t| i64::from(t)).collect())?,
            ),
            (
                "position_ids".to_string(),
                ids_value(rows, 1, batch.next_pos.clone())?,
            ),
        ]);
        for (i, (k, v)) in batch.cache.into_iter().enumerate() {
            inputs.insert(format!("past.{i}.key"), k);
            inputs.insert(format!("past.{i}.value"), v);
        }
        let mask = batch
            .mask
            .into_iter()
            .map(|mut m| {
                m.push(1);
                m
            })
            .collect();
        let next_pos = batch.next_pos.iter().map(|p| p + 1).collect();
        self.step(true, inputs, mask, next_pos)
    }

    fn reorder(&mut self, src: &[usize]) -> Result<(), ModelError> {
        let batch = self
            .batch
            .as_mut()
            .ok_or_else(|| err("reorder before prefill"))?;
        let bad = || {
            err(format!(
                "reorder {src:?} out of range for {} rows",
                batch.mask.len()
            ))
        };
        if src.iter().any(|&r| r >= batch.mask.len()) {
            return Err(bad());
        }
        let graph = &self.decode;
        batch.cache = std::mem::take(&mut batch.cache)
            .into_iter()
            .map(|(k, v)| Ok((graph.select_rows(k, src)?, graph.select_rows(v, src)?)))
            .collect::<Result<_, ExecError>>()
            .map_err(err)?;
        batch.mask = src.iter().map(|&r| batch.mask[r].clone()).collect();
        batch.next_pos = src.iter().map(|&r| batch.next_pos[r]).collect();
        Ok(())
    }
}

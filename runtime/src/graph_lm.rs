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
//!
//! A step names nothing: the inputs and outputs are found by name once, when the model is made,
//! and run by position ([`GraphExecutor::run_indexed`]); the step's id, position and mask
//! tensors are rewritten in place, the cache moves from the outputs to the next step's inputs,
//! and [`LanguageModel::decode_into`] copies the logits into the caller's vectors, so that a
//! decode step on the CPU backend allocates nothing.

use crate::executor::{GraphExecutor, Value};
use crate::lm::{LanguageModel, ModelError};
use crate::reference::ParamSource;
use crate::{Storage, Tensor};
use kiln_ir::Graph;
use std::collections::HashMap;

/// The bookkeeping of the current batch (its KV cache and attention mask are the decode
/// graph's inputs, [`GraphLm`]'s `inputs[1]`).
struct Batch {
    /// Rows.
    rows: usize,
    /// Per row: the position id of the next token.
    next_pos: Vec<i64>,
}

/// Where a graph's step inputs and outputs sit ([`GraphExecutor::run_indexed`]'s positions),
/// found once, when the model is made, so that a step names nothing.
struct Ports {
    /// The input positions of `input_ids`, `position_ids` and `attention_mask`.
    ids: Option<usize>,
    pos: Option<usize>,
    mask: Option<usize>,
    /// Per layer: the input positions of `past.{i}.key` and `past.{i}.value`.
    past: Vec<[Option<usize>; 2]>,
    /// The output positions a step reads: each layer's `present.{i}.key` and
    /// `present.{i}.value`, then the logits (`last_logits` where the graph has them: only the
    /// last position's are read, and a prefill graph that has them alone skips the head on
    /// every other position); `Err`: the name of one the graph lacks.
    wanted: Result<Vec<usize>, String>,
}

impl Ports {
    fn new(graph: &Graph, num_layers: usize) -> Ports {
        let input = |name: &str| graph.inputs().position(|(n, _, _)| n == name);
        let output = |name: &str| {
            graph
                .outputs()
                .iter()
                .position(|o| o.name == name)
                .ok_or_else(|| name.to_string())
        };
        let logits = output("last_logits").or_else(|_| output("logits"));
        Ports {
            ids: input("input_ids"),
            pos: input("position_ids"),
            mask: input("attention_mask"),
            past: (0..num_layers)
                .map(|i| {
                    [
                        input(&format!("past.{i}.key")),
                        input(&format!("past.{i}.value")),
                    ]
                })
                .collect(),
            wanted: (0..num_layers)
                .flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")])
                .map(|name| output(&name))
                .chain([logits])
                .collect(),
        }
    }
}

/// The position of input `name`, or an error when the graph has no such input.
fn port(position: Option<usize>, name: &str) -> Result<usize, ModelError> {
    position.ok_or_else(|| err(format!("graph has no input {name}")))
}

/// A causal LM run by a backend.
pub struct GraphLm<P> {
    prefill: Box<dyn GraphExecutor>,
    decode: Box<dyn GraphExecutor>,
    params: P,
    vocab_size: usize,
    batch: Option<Batch>,
    /// Per graph (prefill, decode).
    ports: [Ports; 2],
    /// Per graph (prefill, decode): its inputs by position, kept from step to step (the
    /// decode graph's hold the KV cache and the last step's attention mask between steps).
    inputs: [Vec<Option<Value>>; 2],
    /// The outputs a step reads, by `ports[g].wanted` (the logits' tensor is rewritten in
    /// place by the CPU backend).
    outputs: Vec<Option<Value>>,
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError(e.to_string())
}

fn ids_tensor(rows: usize, cols: usize, data: Vec<i64>) -> Result<Tensor, ModelError> {
    Tensor::from_i64(vec![rows, cols], data).map_err(err)
}

/// Sets the input `slot` to the i64 tensor of `shape` holding `values`, rewriting the tensor
/// already there in place (a decode step's ids and positions allocate nothing).
fn set_i64(
    slot: &mut Option<Value>,
    shape: [usize; 2],
    values: impl Iterator<Item = i64>,
) -> Result<(), ModelError> {
    match slot {
        Some(Value::Host(t)) => t
            .rewrite(&shape, |storage| match storage {
                Storage::I64(v) => {
                    v.clear();
                    v.extend(values);
                }
                other => *other = Storage::I64(values.collect()),
            })
            .map_err(err),
        _ => {
            let t = Tensor::from_i64(shape.to_vec(), values.collect()).map_err(err)?;
            *slot = Some(Value::Host(t));
            Ok(())
        }
    }
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
        let inputs = |g: &dyn GraphExecutor| vec![None; g.graph().inputs().count()];
        GraphLm {
            ports: [
                Ports::new(prefill.graph(), num_layers),
                Ports::new(decode.graph(), num_layers),
            ],
            inputs: [inputs(prefill.as_ref()), inputs(decode.as_ref())],
            outputs: Vec::new(),
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

    /// Runs the prefill or decode graph on its inputs (set by the caller), moves the new
    /// cache into the decode graph's inputs and writes each row's logits for its last position
    /// into `logits`. The batch is dropped when the run fails.
    fn step(
        &mut self,
        decode: bool,
        rows: usize,
        logits: &mut Vec<Vec<f32>>,
    ) -> Result<(), ModelError> {
        let g = usize::from(decode);
        let ran = self.run(g);
        if ran.is_err() {
            self.batch = None;
        }
        ran?;
        let [_, decode_ports] = &self.ports;
        let n = self.outputs.len();
        let (cache, last) = self.outputs.split_at_mut(n - 1);
        for (past, present) in decode_ports.past.iter().zip(cache.chunks_exact_mut(2)) {
            for (k, (&position, value)) in past.iter().zip(present).enumerate() {
                let name = if k == 0 { "past key" } else { "past value" };
                self.inputs[1][port(position, name)?] = value.take();
            }
        }
        let out = &mut last[0];
        if let Some(Value::Device(_)) = out {
            *out = out
                .take()
                .map(Value::into_host)
                .transpose()
                .map_err(err)?
                .map(Value::Host);
        }
        let Some(Value::Host(t)) = out else {
            return Err(err("graph has no output logits"));
        };
        let values = t.as_f32().ok_or_else(|| err("logits are not f32"))?;
        let vocab = self.vocab_size;
        let per_row = values.len() / rows.max(1);
        if per_row < vocab || !per_row.is_multiple_of(vocab) {
            return Err(err(format!(
                "logits have shape {:?}, expected [{rows}, seq, {vocab}]",
                t.shape()
            )));
        }
        logits.resize_with(rows, Vec::new);
        for (r, row) in logits.iter_mut().enumerate() {
            row.clear();
            row.extend_from_slice(&values[(r + 1) * per_row - vocab..(r + 1) * per_row]);
        }
        Ok(())
    }

    /// Runs graph `g` (0: prefill, 1: decode) on its inputs into `self.outputs`.
    fn run(&mut self, g: usize) -> Result<(), ModelError> {
        let wanted = self.ports[g]
            .wanted
            .as_ref()
            .map_err(|name| err(format!("graph has no output {name}")))?;
        self.outputs.resize_with(wanted.len(), || None);
        let graph = if g == 1 { &self.decode } else { &self.prefill };
        graph
            .run_indexed(&mut self.inputs[g], &self.params, wanted, &mut self.outputs)
            .map_err(err)
    }
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
        self.batch = None;
        // The previous batch's cache goes now.
        self.inputs[1].iter_mut().for_each(|slot| *slot = None);
        let (mut ids, mut pos, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            let pad = len - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().map(|&t| i64::from(t))));
            pos.extend(std::iter::repeat_n(1, pad).chain(0..p.len() as i64));
            mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, p.len())));
        }
        let ports = &self.ports[0];
        let inputs = &mut self.inputs[0];
        let shape = [rows, len];
        set_i64(
            &mut inputs[port(ports.ids, "input_ids")?],
            shape,
            ids.into_iter(),
        )?;
        set_i64(
            &mut inputs[port(ports.pos, "position_ids")?],
            shape,
            pos.into_iter(),
        )?;
        let mask_at = port(ports.mask, "attention_mask")?;
        set_i64(&mut inputs[mask_at], shape, mask.into_iter())?;
        let mut logits = Vec::new();
        self.step(false, rows, &mut logits)?;
        // The decode graph's mask grows from the prompts'.
        let decode_mask = port(self.ports[1].mask, "attention_mask")?;
        self.inputs[1][decode_mask] = self.inputs[0][mask_at].take();
        self.batch = Some(Batch {
            rows,
            next_pos: prompts.iter().map(|p| p.len() as i64).collect(),
        });
        Ok(logits)
    }

    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut logits = Vec::new();
        self.decode_into(tokens, &mut logits)?;
        Ok(logits)
    }

    fn decode_into(
        &mut self,
        tokens: &[u32],
        logits: &mut Vec<Vec<f32>>,
    ) -> Result<(), ModelError> {
        let batch = self
            .batch
            .as_mut()
            .ok_or_else(|| err("decode before prefill"))?;
        let rows = batch.rows;
        if tokens.len() != rows {
            return Err(err(format!(
                "{} tokens for a batch of {rows} rows",
                tokens.len()
            )));
        }
        let ports = &self.ports[1];
        let inputs = &mut self.inputs[1];
        let ids = tokens.iter().map(|&t| i64::from(t));
        set_i64(&mut inputs[port(ports.ids, "input_ids")?], [rows, 1], ids)?;
        let pos = batch.next_pos.iter().copied();
        set_i64(
            &mut inputs[port(ports.pos, "position_ids")?],
            [rows, 1],
            pos,
        )?;
        // Each row's mask gains a 1 for the new token (rewritten in place).
        let Some(Value::Host(mask)) = &mut inputs[port(ports.mask, "attention_mask")?] else {
            return Err(err("decode before prefill"));
        };
        let kv = mask.shape().get(1).copied().unwrap_or(0);
        mask.rewrite(&[rows, kv + 1], |storage| {
            if let Storage::I64(m) = storage {
                m.resize(rows * (kv + 1), 1);
                for r in (0..rows).rev() {
                    m.copy_within(r * kv..(r + 1) * kv, r * (kv + 1));
                    m[r * (kv + 1) + kv] = 1;
                }
            }
        })
        .map_err(err)?;
        batch.next_pos.iter_mut().for_each(|p| *p += 1);
        self.step(true, rows, logits)
    }

    fn reorder(&mut self, src: &[usize]) -> Result<(), ModelError> {
        let batch = self
            .batch
            .as_mut()
            .ok_or_else(|| err("reorder before prefill"))?;
        if src.iter().any(|&r| r >= batch.rows) {
            return Err(err(format!(
                "reorder {src:?} out of range for {} rows",
                batch.rows
            )));
        }
        let ports = &self.ports[1];
        let inputs = &mut self.inputs[1];
        for &position in ports.past.iter().flatten().flatten() {
            if let Some(value) = inputs[position].take() {
                let rows = self.decode.select_rows(value, src).map_err(err)?;
                inputs[position] = Some(rows);
            }
        }
        let mask = &mut inputs[port(ports.mask, "attention_mask")?];
        if let Some(Value::Host(t)) = mask {
            let rows = t
                .select_rows(src)
                .ok_or_else(|| err(format!("reorder {src:?}: the mask has no such rows")))?;
            *mask = Some(Value::Host(rows));
        }
        batch.next_pos = src.iter().map(|&r| batch.next_pos[r]).collect();
        batch.rows = src.len();
        Ok(())
    }
}

//! An encoder (BERT, DistilBERT) run on right-padded batches of token ids: its one graph and
//! bound parameters, run by a backend ([`GraphExecutor`]: the CPU backend by default).
//!
//! Graph interface (what kiln's encoder families trace): inputs `input_ids`, `attention_mask`
//! (i64 0/1) and, when the model uses them, `token_type_ids` (i64 `[batch, seq]`, all 0 here);
//! outputs `last_hidden_state` (f32 `[batch, seq, hidden]`) and, with a head, `logits`.

use crate::executor::GraphExecutor;
use crate::lm::ModelError;
use crate::pooling::{pool, Pooling};
use crate::reference::ParamSource;
use crate::Tensor;
use kiln_ir::Graph;
use std::collections::HashMap;

/// An encoder ready to run.
pub struct EncoderRunner<P> {
    plan: Box<dyn GraphExecutor>,
    params: P,
    uses_token_types: bool,
}

/// An encoder's outputs for a batch padded on the right to `seq` tokens.
pub struct EncoderOutput {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// The head's logits, when the model has a head.
    pub logits: Option<Tensor>,
    /// `[batch * seq]` 0/1, 1 for real tokens.
    pub mask: Vec<i64>,
    /// The padded length.
    pub seq: usize,
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError(e.to_string())
}

impl<P: ParamSource> EncoderRunner<P> {
    /// An encoder from its graph already compiled for a backend.
    pub fn with_executor(plan: Box<dyn GraphExecutor>, params: P, uses_token_types: bool) -> Self {
        EncoderRunner {
            plan,
            params,
            uses_token_types,
        }
    }

    /// The parameters, taken back (to compile the graph for another backend).
    pub fn into_params(self) -> P {
        self.params
    }

    /// The graph it runs and its parameters.
    pub fn parts(&self) -> (&Graph, &P) {
        (self.plan.graph(), &self.params)
    }

    /// The compiled graph.
    pub fn plan(&self) -> &dyn GraphExecutor {
        self.plan.as_ref()
    }

    /// Runs a batch of token-id sequences (each non-empty), padded on the right with id 0.
    pub fn run(&self, batch: &[Vec<u32>]) -> Result<EncoderOutput, ModelError> {
        let rows = batch.len();
        if rows == 0 || batch.iter().any(Vec::is_empty) {
            return Err(err("every sequence needs at least one token"));
        }
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask) = (
            Vec::with_capacity(rows * seq),
            Vec::with_capacity(rows * seq),
        );
        for row in batch {
            let pad = seq - row.len();
            ids.extend(
                row.iter()
                    .map(|&t| i64::from(t))
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, pad)));
        }
        let tensor = |data: Vec<i64>| Tensor::from_i64(vec![rows, seq], data).map_err(err);
        let mut inputs = HashMap::from([
            ("input_ids".to_string(), tensor(ids)?),
            ("attention_mask".to_string(), tensor(mask.clone())?),
        ]);
        if self.uses_token_types {
            inputs.insert("token_type_ids".into(), tensor(vec![0; rows * seq])?);
        }
        let mut out = self.plan.run_host(&inputs, &self.params).map_err(err)?;
        let last_hidden_state = out
            .remove("last_hidden_state")
            .ok_or_else(|| err("the graph has no last_hidden_state output"))?;
        Ok(EncoderOutput {
            last_hidden_state,
            logits: out.remove("logits"),
            mask,
            seq,
        })
    }
}

impl EncoderOutput {
    /// One sentence embedding per row, pooled as `pooling` says.
    pub fn pool(&self, pooling: &Pooling) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = &self.last_hidden_state;
        let (&[batch, seq, dim], Some(values)) = (h.shape(), h.as_f32()) else {
            return Err(err(format!(
                "last_hidden_state is {:?} {:?}, expected f32 [batch, seq, hidden]",
                h.dtype(),
                h.shape()
            )));
        };
        if seq != self.seq || self.mask.len() != batch * seq {
            return Err(err("last_hidden_state does not match the batch"));
        }
        Ok(pool(values, &self.mask, batch, seq, dim, pooling))
    }
}

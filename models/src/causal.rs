//! The graph interface shared by the causal LM families (documented on
//! [`CausalGraphs`](crate::CausalGraphs)): the token, position and mask inputs, each layer's
//! `past.{i}.*` cache inputs (decode graph only) and `present.{i}.*` outputs.

use kiln_ir::trace::{Tensor, Tracer};
use kiln_ir::{DType, Dim};

/// A layer's key/value cache entry: `[batch, kv_heads, len, head_dim]` each.
pub struct KvPair {
    /// Keys (after RoPE where the family has it).
    pub key: Tensor,
    /// Values.
    pub value: Tensor,
}

/// The inputs of a causal LM graph.
pub struct CausalIo {
    /// `input_ids` i64 `[batch, seq]`.
    pub ids: Tensor,
    /// `attention_mask` i64 0/1 `[batch, kv]` (`kv = past + seq` with a cache, else `seq`).
    pub attention_mask: Tensor,
    /// `position_ids` i64 `[batch, seq]`.
    pub positions: Tensor,
    /// The symbolic batch size.
    pub batch: Dim,
    /// The symbolic number of new tokens.
    pub seq: Dim,
    with_cache: bool,
}

impl CausalIo {
    /// Declares the inputs; `with_cache` makes the decode graph's interface.
    pub fn new(t: &Tracer, with_cache: bool) -> Self {
        let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
        let kv = if with_cache {
            &Dim::sym("past") + &seq
        } else {
            seq.clone()
        };
        CausalIo {
            ids: t.input("input_ids", DType::I64, [batch.clone(), seq.clone()]),
            attention_mask: t.input("attention_mask", DType::I64, [batch.clone(), kv]),
            positions: t.input("position_ids", DType::I64, [batch.clone(), seq.clone()]),
            batch,
            seq,
            with_cache,
        }
    }

    /// Layer `layer`'s cache so far, `[batch, kv_heads, past, head_dim]` (decode graph only).
    pub fn past(
        &self,
        t: &Tracer,
        layer: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Option<KvPair> {
        let shape = || {
            [
                self.batch.clone(),
                Dim::from(kv_heads),
                Dim::sym("past"),
                Dim::from(head_dim),
            ]
        };
        self.with_cache.then(|| KvPair {
            key: t.input(&format!("past.{layer}.key"), DType::F32, shape()),
            value: t.input(&format!("past.{layer}.value"), DType::F32, shape()),
        })
    }

    /// Outputs the logits `head(x)` of the final hidden states `x` `[batch, seq, hidden]` as
    /// `logits`; the prefill graph also outputs `last_logits`, the head applied to the last
    /// position alone (`[batch, 1, vocab]`: what generation reads, so a backend asked for it
    /// alone skips the head on every other position — a quarter of a small model's weights).
    pub fn logits(
        &self,
        t: &Tracer,
        x: &Tensor,
        head: impl Fn(&Tensor) -> Result<Tensor, kiln_ir::OpError>,
    ) -> Result<(), kiln_ir::OpError> {
        t.output("logits", &head(x)?);
        if !self.with_cache {
            let last = x.slice(1, &self.seq - &Dim::from(1), self.seq.clone())?;
            t.output("last_logits", &head(&last)?);
        }
        Ok(())
    }

    /// Names layer `layer`'s updated cache as the graph's `present.{layer}.*` outputs.
    pub fn present(&self, t: &Tracer, layer: usize, kv: &KvPair) {
        t.output(&format!("present.{layer}.key"), &kv.key);
        t.output(&format!("present.{layer}.value"), &kv.value);
    }
}

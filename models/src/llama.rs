//! The Llama family and its relatives — `llama`, `mistral` (sliding-window attention), `qwen2`
//! (QKV bias) and `mixtral` (sparse MoE MLP) — traced as transformers' eager implementations:
//! pre-RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU MLP, residuals.

use crate::causal::{CausalIo, KvPair};
use crate::rope::{self, Rope};
use crate::{moe, nn, CausalGraphs, TraceError};
use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim, Graph};
use serde::Deserialize;

/// Sizes and options of one decoder layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LayerConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width (per expert for MoE).
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Bias on the q, k and v projections (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// Bias on the output projection too (`attention_bias` of Llama).
    #[serde(default)]
    pub o_bias: bool,
    /// Sliding-window attention size (Mistral).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Sparse MoE MLP (Mixtral).
    #[serde(default)]
    pub moe: Option<moe::MoeConfig>,
}

/// A whole decoder-only model of the Llama family.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Per-layer settings.
    pub layer: LayerConfig,
    /// RoPE settings.
    pub rope: Rope,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Positions the model was trained for.
    pub max_position_embeddings: usize,
}

/// Causal additive mask `[seq, seq]`: 0 where `col <= row`, the f32 minimum above the diagonal
/// (transformers' eager mask), for a layer traced on its own.
pub fn causal_mask(t: &Tracer, seq: &Dim) -> TraceResult {
    let shape = [seq.clone(), seq.clone()];
    let row = t.iota(DType::I64, shape.clone(), 0)?;
    let col = t.iota(DType::I64, shape, 1)?;
    let zero = t.scalar(DType::F32, 0.0);
    let min = t.scalar(DType::F32, f32::MIN.into());
    col.le(&row)?.where_(&zero, &min)
}

/// Self-attention of `x[batch, seq, hidden]` with RoPE `cos`/`sin[batch, seq, head_dim]`, an
/// additive `mask` broadcastable to `[batch, heads, seq, kv]`, and an optional cache of earlier
/// positions; returns the output and the updated cache. Weights under `prefix`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    t: &Tracer,
    cfg: &LayerConfig,
    prefix: &str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    past: Option<&KvPair>,
) -> Result<(Tensor, KvPair), kiln_ir::OpError> {
    let (b, s) = (x.dim(0)?, x.dim(1)?);
    let (h, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let heads = |name: &str, n: usize| -> TraceResult {
        let y = nn::linear(
            t,
            x,
            &nn::join(prefix, name),
            n * d,
            cfg.hidden_size,
            cfg.qkv_bias,
        )?;
        y.reshape(&[b.clone(), s.clone(), Dim::from(n), Dim::from(d)])?
            .transpose(1, 2)
    };
    let q = rope::apply(&heads("q_proj", h)?, cos, sin)?;
    let mut k = rope::apply(&heads("k_proj", hkv)?, cos, sin)?;
    let mut v = heads("v_proj", hkv)?;
    if let Some(p) = past {
        k = Tensor::cat(&[&p.key, &k], 2)?;
        v = Tensor::cat(&[&p.value, &v], 2)?;
    }
    let present = KvPair {
        key: k.clone(),
        value: v.clone(),
    };
    let k = repeat_kv(&k, h / hkv)?;
    let v = repeat_kv(&v, h / hkv)?;
    let scores = (&q.matmul_t(&k, false, true)? * (d as f64).powf(-0.5))?;
    let probs = scores.add(mask)?.softmax(-1)?;
    let out = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape(&[b, s, Dim::from(h * d)])?;
    let out = nn::linear(
        t,
        &out,
        &nn::join(prefix, "o_proj"),
        cfg.hidden_size,
        h * d,
        cfg.o_bias,
    )?;
    Ok((out, present))
}

/// transformers' `repeat_kv`: `[b, hkv, s, d]` → `[b, hkv*n, s, d]`, each head repeated `n` times.
pub fn repeat_kv(x: &Tensor, n: usize) -> TraceResult {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, s, d) = (x.dim(0)?, x.dim(1)?, x.dim(2)?, x.dim(3)?);
    x.unsqueeze(2)?
        .expand(&[b.clone(), hkv.clone(), Dim::from(n), s.clone(), d.clone()])?
        .reshape(&[b, &hkv * &Dim::from(n), s, d])
}

/// One decoder layer on `x[batch, seq, hidden]`; weights under `prefix` (e.g. `model.layers.0`).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    t: &Tracer,
    cfg: &LayerConfig,
    prefix: &str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    past: Option<&KvPair>,
) -> Result<(Tensor, KvPair), kiln_ir::OpError> {
    let normed = nn::rms_norm(
        t,
        x,
        &nn::join(prefix, "input_layernorm.weight"),
        cfg.rms_norm_eps,
    )?;
    let (attn, present) = attention(
        t,
        cfg,
        &nn::join(prefix, "self_attn"),
        &normed,
        cos,
        sin,
        mask,
        past,
    )?;
    let h = x.add(&attn)?;
    let normed = nn::rms_norm(
        t,
        &h,
        &nn::join(prefix, "post_attention_layernorm.weight"),
        cfg.rms_norm_eps,
    )?;
    let mlp = match &cfg.moe {
        Some(m) => moe::sparse_moe(t, &normed, &nn::join(prefix, "block_sparse_moe"), cfg, m)?,
        None => nn::swiglu_mlp(
            t,
            &normed,
            &nn::join(prefix, "mlp"),
            cfg.hidden_size,
            cfg.intermediate_size,
        )?,
    };
    Ok((h.add(&mlp)?, present))
}

/// One decoder layer as a graph of its own, with symbolic `batch` and `seq`: input
/// `input.hidden_states[batch, seq, hidden]`, positions `0..seq` and the causal mask built
/// in-graph, output `output.hidden_states`, weights named as in transformers' layer
/// (`self_attn.q_proj.weight`, ...).
pub fn standalone_layer(cfg: &LayerConfig) -> Result<Graph, TraceError> {
    let t = Tracer::new();
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    let x = t.input(
        "input.hidden_states",
        DType::F32,
        [b.clone(), s.clone(), Dim::from(cfg.hidden_size)],
    );
    let positions = t.iota(DType::I64, [b, s.clone()], 1)?;
    let rope = Rope {
        theta: cfg.rope_theta,
        dim: cfg.head_dim,
        scaling: rope::RopeScaling::Default,
    };
    let (cos, sin) = rope.cos_sin(&t, &positions)?;
    let mask = causal_mask(&t, &s)?;
    let (y, _) = decoder_layer(&t, cfg, "", &x, &cos, &sin, &mask, None)?;
    t.output("output.hidden_states", &y);
    Ok(t.finish()?)
}

/// Traces the causal LM: `with_cache` false gives the prefill graph, true the decode graph
/// (see [`CausalGraphs`] for the inputs and outputs).
pub fn trace(cfg: &DecoderConfig, with_cache: bool) -> Result<Graph, TraceError> {
    let t = Tracer::new();
    let l = &cfg.layer;
    let io = CausalIo::new(&t, with_cache);
    let embed = t.param(
        "model.embed_tokens.weight",
        DType::F32,
        [cfg.vocab_size, l.hidden_size],
    );
    let mut x = embed.index_select(0, &io.ids)?;
    let (cos, sin) = cfg.rope.cos_sin(&t, &io.positions)?;
    let mask = nn::attention_mask(&t, &io.attention_mask, &io.seq, true, l.sliding_window)?;
    for i in 0..cfg.num_hidden_layers {
        let past = io.past(&t, i, l.num_key_value_heads, l.head_dim);
        let (y, present) = decoder_layer(
            &t,
            l,
            &format!("model.layers.{i}"),
            &x,
            &cos,
            &sin,
            &mask,
            past.as_ref(),
        )?;
        io.present(&t, i, &present);
        x = y;
    }
    io.logits(&t, &x, |x| {
        let x = nn::rms_norm(&t, x, "model.norm.weight", l.rms_norm_eps)?;
        if cfg.tie_word_embeddings {
            x.matmul_t(&embed, false, true)
        } else {
            nn::linear(&t, &x, "lm_head", cfg.vocab_size, l.hidden_size, false)
        }
    })?;
    Ok(t.finish()?)
}

impl DecoderConfig {
    /// Both graphs of the causal LM.
    pub fn trace(&self) -> Result<CausalGraphs, TraceError> {
        Ok(CausalGraphs {
            prefill: trace(self, false)?,
            decode: trace(self, true)?,
            num_layers: self.num_hidden_layers,
            vocab_size: self.vocab_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_with_symbolic_batch_and_seq() {
        let cfg = LayerConfig {
            hidden_size: 64,
            intermediate_size: 176,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            moe: None,
        };
        let g = standalone_layer(&cfg).unwrap();
        assert_eq!(
            g.ty(g.outputs()[0].value).to_string(),
            "f32[batch, seq, 64]"
        );
        assert_eq!(g.params().count(), 9);
        let bad = LayerConfig {
            num_key_value_heads: 3,
            ..cfg
        };
        let e = standalone_layer(&bad).unwrap_err().to_string();
        assert!(
            e.contains("matmul(f32[batch, 4, seq, 16], f32[batch, 3, seq, 16])"),
            "{e}"
        );
    }
}

//! The Llama decoder layer, traced as transformers' `LlamaDecoderLayer` (eager attention):
//! pre-RMSNorm, RoPE, grouped-query attention with an additive mask, SwiGLU MLP, residuals.

use crate::{nn, rope};
use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim, Graph};
use serde::Deserialize;

/// The sizes of one decoder layer (the keys of transformers' `LlamaConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LayerConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
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
}

/// Causal additive mask `[seq, seq]`: 0 where `col <= row`, the f32 minimum above the diagonal
/// (transformers' eager mask).
pub fn causal_mask(t: &Tracer, seq: &Dim) -> TraceResult {
    let shape = [seq.clone(), seq.clone()];
    let row = t.iota(DType::I64, shape.clone(), 0)?;
    let col = t.iota(DType::I64, shape, 1)?;
    let zero = t.scalar(DType::F32, 0.0);
    let min = t.scalar(DType::F32, f32::MIN.into());
    col.le(&row)?.where_(&zero, &min)
}

/// Self-attention of `x[batch, seq, hidden]` with RoPE `cos`/`sin[batch, seq, head_dim]` and an
/// additive `mask` broadcastable to `[batch, heads, seq, seq]`; weights under `prefix`.
pub fn attention(
    t: &Tracer,
    cfg: &LayerConfig,
    prefix: &str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
) -> TraceResult {
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
            &nn::join(prefix, &format!("{name}.weight")),
            n * d,
            cfg.hidden_size,
        )?;
        y.reshape(&[b.clone(), s.clone(), Dim::from(n), Dim::from(d)])?
            .transpose(1, 2)
    };
    let q = rope::apply(&heads("q_proj", h)?, cos, sin)?;
    let k = rope::apply(&heads("k_proj", hkv)?, cos, sin)?;
    let v = heads("v_proj", hkv)?;
    let k = repeat_kv(&k, h / hkv)?;
    let v = repeat_kv(&v, h / hkv)?;
    let scores = (&q.matmul_t(&k, false, true)? * (d as f64).powf(-0.5))?;
    let probs = scores.add(mask)?.softmax(-1)?;
    let out = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape(&[b, s, Dim::from(h * d)])?;
    nn::linear(
        t,
        &out,
        &nn::join(prefix, "o_proj.weight"),
        cfg.hidden_size,
        h * d,
    )
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
pub fn decoder_layer(
    t: &Tracer,
    cfg: &LayerConfig,
    prefix: &str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
) -> TraceResult {
    let normed = nn::rms_norm(
        t,
        x,
        &nn::join(prefix, "input_layernorm.weight"),
        cfg.rms_norm_eps,
    )?;
    let h = x.add(&attention(
        t,
        cfg,
        &nn::join(prefix, "self_attn"),
        &normed,
        cos,
        sin,
        mask,
    )?)?;
    let normed = nn::rms_norm(
        t,
        &h,
        &nn::join(prefix, "post_attention_layernorm.weight"),
        cfg.rms_norm_eps,
    )?;
    let mlp = nn::swiglu_mlp(
        t,
        &normed,
        &nn::join(prefix, "mlp"),
        cfg.hidden_size,
        cfg.intermediate_size,
    )?;
    h.add(&mlp)
}

/// One decoder layer as a graph of its own, with symbolic `batch` and `seq`: input
/// `input.hidden_states[batch, seq, hidden]`, positions `0..seq` and the causal mask built
/// in-graph, output `output.hidden_states`, weights named as in transformers' layer
/// (`self_attn.q_proj.weight`, ...).
pub fn standalone_layer(cfg: &LayerConfig) -> Result<Graph, crate::TraceError> {
    let t = Tracer::new();
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    let x = t.input(
        "input.hidden_states",
        DType::F32,
        [b.clone(), s.clone(), Dim::from(cfg.hidden_size)],
    );
    let positions = t.iota(DType::I64, [b, s.clone()], 1)?;
    let inv_freq = rope::inv_freq(cfg.rope_theta, cfg.head_dim);
    let (cos, sin) = rope::cos_sin(&t, &positions, &inv_freq)?;
    let mask = causal_mask(&t, &s)?;
    let y = decoder_layer(&t, cfg, "", &x, &cos, &sin, &mask)?;
    t.output("output.hidden_states", &y);
    Ok(t.finish()?)
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

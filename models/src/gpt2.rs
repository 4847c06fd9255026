//! GPT-2: learned absolute positions, pre-LayerNorm blocks with fused `c_attn` (Conv1D weight
//! layout `[in, out]`), tanh-GELU MLP, tied `lm_head`.
//!
//! Traced as transformers' `GPT2LMHeadModel` with eager attention. Parameter names are those of
//! a `GPT2LMHeadModel` checkpoint: `transformer.wte.weight`, `transformer.wpe.weight`,
//! `transformer.h.{i}.ln_1.{weight,bias}`, `transformer.h.{i}.attn.c_attn.{weight,bias}`,
//! `transformer.h.{i}.attn.c_proj.*`, `transformer.h.{i}.ln_2.*`,
//! `transformer.h.{i}.mlp.c_fc.*`, `transformer.h.{i}.mlp.c_proj.*`, `transformer.ln_f.*`; the
//! LM head multiplies by `transformer.wte.weight` (tied, the default: transformers does not save
//! `lm_head.weight` then) or by `lm_head.weight` when `tie_word_embeddings` is false.

use crate::causal::{CausalIo, KvPair};
use crate::config::{yes, FamilyConfig};
use crate::nn::{self, Activation};
use crate::{CausalGraphs, ModelError, TraceError};
use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim, Graph};
use serde::Deserialize;
use std::path::Path;

/// GPT-2's `config.json` (sizes required; options default as transformers' `GPT2Config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Positions (the longest input).
    pub n_positions: usize,
    /// Model width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// MLP width (`4 * n_embd` when absent).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores by `layer_idx + 1`.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute scores with the scale folded into the product, upcast to f32 (the same values
    /// in f32, which is all kiln runs GPT-2 in).
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// `lm_head` shares `wte`.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Cross-attention layers (encoder-decoder use; not supported).
    #[serde(default)]
    pub add_cross_attention: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_act() -> String {
    "gelu_new".into()
}

impl Gpt2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The MLP activation (GELU-tanh for an unknown name; [`Gpt2Config::validate`] refuses
    /// those).
    pub fn activation(&self) -> Activation {
        Activation::from_name(&self.activation_function).unwrap_or(Activation::GeluTanh)
    }

    /// The factor applied to `q·k` in layer `layer` (transformers' `GPT2Attention.scaling`).
    pub fn attn_scale(&self, layer: usize) -> f64 {
        let mut s = 1.0;
        if self.scale_attn_weights {
            s = (self.head_dim() as f64).powf(-0.5);
        }
        if self.scale_attn_by_inverse_layer_idx {
            s /= (layer + 1) as f64;
        }
        s
    }

    /// Both graphs of the causal LM.
    pub fn trace(&self) -> Result<CausalGraphs, TraceError> {
        Ok(CausalGraphs {
            prefill: trace(self, false)?,
            decode: trace(self, true)?,
            num_layers: self.n_layer,
            vocab_size: self.vocab_size,
        })
    }
}

impl FamilyConfig for Gpt2Config {
    /// Checks sizes and options (the path is for messages).
    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let unsupported = |message: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let malformed = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(malformed(format!(
                "n_embd ({}) must be a positive multiple of n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if self.n_positions == 0 || self.vocab_size == 0 || self.n_inner == Some(0) {
            return Err(malformed(
                "vocab_size, n_positions and n_inner must be positive".into(),
            ));
        }
        if Activation::from_name(&self.activation_function).is_none() {
            return Err(unsupported(format!(
                "activation_function {:?} is not supported (kiln supports {})",
                self.activation_function,
                Activation::NAMES
            )));
        }
        if self.add_cross_attention {
            return Err(unsupported(
                "add_cross_attention = true (GPT-2 with cross-attention, for encoder-decoder \
                 models) is not supported"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The checkpoint prefix of the base model under `GPT2LMHeadModel`.
pub const BASE_PREFIX: &str = "transformer.";

/// Self-attention of block `layer` on `x[batch, seq, n_embd]` with an additive `mask`
/// (`[batch, 1, seq, kv]`) and optional cache `(key, value)` of earlier positions; returns the
/// output and the new cache. Weights under `prefix` (`transformer.h.{i}.attn`).
pub fn attention(
    t: &Tracer,
    cfg: &Gpt2Config,
    layer: usize,
    prefix: &str,
    x: &Tensor,
    mask: &Tensor,
    past: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor), kiln_ir::OpError> {
    let (b, s) = (x.dim(0)?, x.dim(1)?);
    let (n, h, d) = (cfg.n_embd, cfg.n_head, cfg.head_dim());
    let qkv = nn::conv1d(t, x, &nn::join(prefix, "c_attn"), n, 3 * n)?;
    let heads = |i: usize| -> TraceResult {
        qkv.slice(-1, i * n, (i + 1) * n)?
            .reshape(&[b.clone(), s.clone(), Dim::from(h), Dim::from(d)])?
            .transpose(1, 2)
    };
    let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
    if let Some((pk, pv)) = past {
        k = Tensor::cat(&[pk, &k], 2)?;
        v = Tensor::cat(&[pv, &v], 2)?;
    }
    let mut scores = q.matmul_t(&k, false, true)?;
    let scale = cfg.attn_scale(layer);
    if scale != 1.0 {
        scores = (&scores * scale)?;
    }
    let probs = scores.add(mask)?.softmax(-1)?;
    let out = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape(&[b, s, Dim::from(n)])?;
    let out = nn::conv1d(t, &out, &nn::join(prefix, "c_proj"), n, n)?;
    Ok((out, k, v))
}

/// One GPT-2 block (`transformer.h.{layer}`): `x + attn(ln_1(x))`, then `+ mlp(ln_2(.))`.
pub fn block(
    t: &Tracer,
    cfg: &Gpt2Config,
    layer: usize,
    x: &Tensor,
    mask: &Tensor,
    past: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor), kiln_ir::OpError> {
    let p = format!("{BASE_PREFIX}h.{layer}");
    let eps = cfg.layer_norm_epsilon;
    let normed = nn::layer_norm(t, x, &nn::join(&p, "ln_1"), eps)?;
    let (attn, k, v) = attention(t, cfg, layer, &nn::join(&p, "attn"), &normed, mask, past)?;
    let h = attn.add(x)?;
    let normed = nn::layer_norm(t, &h, &nn::join(&p, "ln_2"), eps)?;
    let (n, inner) = (cfg.n_embd, cfg.inner());
    let up = nn::conv1d(t, &normed, &nn::join(&p, "mlp.c_fc"), n, inner)?;
    let act = cfg.activation().apply(&up)?;
    let down = nn::conv1d(t, &act, &nn::join(&p, "mlp.c_proj"), inner, n)?;
    Ok((h.add(&down)?, k, v))
}

/// Traces `GPT2LMHeadModel`: `with_cache` false gives the prefill graph, true the decode graph
/// (see [`CausalGraphs`] for the inputs and outputs). Positions come from `position_ids`
/// (`transformer.wpe` lookup; ids at or beyond `n_positions` are a run-time gather error, as
/// transformers' `IndexError`).
pub fn trace(cfg: &Gpt2Config, with_cache: bool) -> Result<Graph, TraceError> {
    let t = Tracer::new();
    let io = CausalIo::new(&t, with_cache);
    let (ids, positions) = (&io.ids, &io.positions);
    let n = cfg.n_embd;
    let wte = t.param(
        &format!("{BASE_PREFIX}wte.weight"),
        DType::F32,
        [cfg.vocab_size, n],
    );
    let wpe = t.param(
        &format!("{BASE_PREFIX}wpe.weight"),
        DType::F32,
        [cfg.n_positions, n],
    );
    let mut x = wte
        .index_select(0, ids)?
        .add(&wpe.index_select(0, positions)?)?;
    let mask = nn::attention_mask(&t, &io.attention_mask, &io.seq, true, None)?;
    for i in 0..cfg.n_layer {
        let past = io.past(&t, i, cfg.n_head, cfg.head_dim());
        let (y, key, value) = block(
            &t,
            cfg,
            i,
            &x,
            &mask,
            past.as_ref().map(|p| (&p.key, &p.value)),
        )?;
        io.present(&t, i, &KvPair { key, value });
        x = y;
    }
    io.logits(&t, &x, |x| {
        let x = nn::layer_norm(&t, x, &format!("{BASE_PREFIX}ln_f"), cfg.layer_norm_epsilon)?;
        if cfg.tie_word_embeddings {
            x.matmul_t(&wte, false, true)
        } else {
            nn::linear(&t, &x, "lm_head", cfg.vocab_size, n, false)
        }
    })?;
    Ok(t.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Family};

    fn parse(extra: &str) -> Result<config::ModelConfig, ModelError> {
        let text = format!(
            r#"{{"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 8,
                "n_layer": 2, "n_head": 2{extra}}}"#
        );
        config::parse(&text, Path::new("config.json"))
    }

    fn gpt2(extra: &str) -> Gpt2Config {
        match parse(extra).unwrap().family {
            Family::Gpt2(c) => c,
            other => panic!("not gpt2: {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_gpt2config() {
        let c = gpt2("");
        assert_eq!(c.inner(), 32);
        assert_eq!(c.activation(), Activation::GeluTanh);
        assert!(c.scale_attn_weights && c.tie_word_embeddings);
        assert_eq!(c.attn_scale(0), 0.5);
        let c = gpt2(r#", "scale_attn_by_inverse_layer_idx": true"#);
        assert_eq!(c.attn_scale(1), 0.25);
        let c = gpt2(r#", "scale_attn_weights": false"#);
        assert_eq!(c.attn_scale(1), 1.0);
        assert_eq!(
            gpt2(r#", "activation_function": "gelu""#).activation(),
            Activation::Gelu
        );
    }

    #[test]
    fn refuses_unsupported_configs() {
        let e = parse(r#", "activation_function": "quick_gelu""#).unwrap_err();
        assert!(matches!(e, ModelError::Unsupported { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("activation_function \"quick_gelu\" is not supported"),
            "{msg}"
        );
        let msg = parse(r#", "add_cross_attention": true"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("add_cross_attention"), "{msg}");
        let msg = parse(r#", "n_head": 3"#).unwrap_err().to_string();
        assert!(msg.contains("multiple of n_head (3)"), "{msg}");
        let msg = parse(r#", "n_head": 0"#).unwrap_err().to_string();
        assert!(msg.contains("n_head (0)"), "{msg}");
    }

    #[test]
    fn names_adapt_to_unprefixed_and_legacy_checkpoints() {
        // openai-community/gpt2 saves `wte.weight`, `h.0.ln_1.weight`, ... without the
        // `transformer.` prefix; very old checkpoints name LayerNorm parameters gamma/beta.
        let g = trace(&gpt2(""), false).unwrap();
        let has = |n: &str| {
            !n.starts_with("transformer.") && !n.ends_with("ln_f.weight") || n == "ln_f.gamma"
        };
        let adapted = nn::adapt_param_names(&g, BASE_PREFIX, has);
        let names: Vec<&str> = adapted.params().map(|(n, _, _)| n).collect();
        assert!(names.contains(&"wte.weight") && names.contains(&"h.1.mlp.c_fc.bias"));
        assert!(names.contains(&"ln_f.gamma") && names.contains(&"ln_f.bias"));
        assert_eq!(adapted.nodes().len(), g.nodes().len());
        assert_eq!(adapted.outputs(), g.outputs());
        // Names found nowhere stay as traced, for binding to report.
        let none = nn::adapt_param_names(&g, BASE_PREFIX, |_| false);
        assert_eq!(none, g);
    }

    #[test]
    fn traces_both_graphs_with_hf_names() {
        let g = gpt2("").trace().unwrap();
        assert_eq!(g.num_layers, 2);
        let names: Vec<&str> = g.prefill.params().map(|(n, _, _)| n).collect();
        assert!(names.contains(&"transformer.wte.weight"));
        assert!(names.contains(&"transformer.h.1.attn.c_attn.weight"));
        assert!(!names.iter().any(|n| n.starts_with("lm_head")));
        let ty = |g: &Graph, name: &str| {
            let o = g.outputs().iter().find(|o| o.name == name).unwrap();
            g.ty(o.value).to_string()
        };
        assert_eq!(ty(&g.prefill, "logits"), "f32[batch, seq, 50]");
        assert_eq!(ty(&g.prefill, "present.1.key"), "f32[batch, 2, seq, 4]");
        assert_eq!(
            ty(&g.decode, "present.0.value"),
            "f32[batch, 2, past+seq, 4]"
        );
        let inputs: Vec<&str> = g.decode.inputs().map(|(n, _, _)| n).collect();
        assert!(inputs.contains(&"past.1.value") && inputs.contains(&"attention_mask"));
        let untied = gpt2(r#", "tie_word_embeddings": false"#).trace().unwrap();
        assert!(untied
            .prefill
            .params()
            .any(|(n, _, _)| n == "lm_head.weight"));
    }
}

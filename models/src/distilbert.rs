//! DistilBERT: word + position embeddings, post-LayerNorm encoder layers with a padding mask,
//! and the masked-LM and sequence-classification heads.
//!
//! Traced as transformers' eager `DistilBertModel` / `DistilBertForMaskedLM` /
//! `DistilBertForSequenceClassification`. Parameter names are the checkpoint's: the base
//! model's `embeddings.{word,position}_embeddings.weight`, `embeddings.LayerNorm.*`,
//! `transformer.layer.{i}.attention.{q_lin,k_lin,v_lin,out_lin}.*`,
//! `transformer.layer.{i}.sa_layer_norm.*`, `transformer.layer.{i}.ffn.{lin1,lin2}.*`,
//! `transformer.layer.{i}.output_layer_norm.*`, prefixed `distilbert.` under a head; the
//! masked-LM head's `vocab_transform.*`, `vocab_layer_norm.*` and `vocab_projector.bias`, with
//! `vocab_projector.weight` tied to `distilbert.embeddings.word_embeddings.weight` (not saved by
//! transformers; used when `tie_word_embeddings` is false); the classifier's
//! `pre_classifier.*` and `classifier.*`. Every LayerNorm has eps 1e-12 (fixed in
//! transformers). Sinusoidal position embeddings are stored in the checkpoint like learned
//! ones, so `sinusoidal_pos_embds` needs nothing special.

use crate::config::{yes, FamilyConfig};
use crate::encoder::{self, EncoderHead};
use crate::nn::{self, Activation};
use crate::{ModelError, TraceError};
use kiln_ir::trace::{Tensor, Tracer};
use kiln_ir::{DType, Dim, Graph};
use serde::Deserialize;
use std::path::Path;

/// DistilBERT's `config.json` (sizes required; options default as `DistilBertConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DistilBertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub dim: usize,
    /// Layers.
    pub n_layers: usize,
    /// Heads.
    pub n_heads: usize,
    /// MLP width.
    pub hidden_dim: usize,
    /// Positions.
    #[serde(default = "crate::config::positions_512")]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "crate::config::gelu")]
    pub activation: String,
    /// Sinusoidal (fixed) position embeddings.
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
    /// `vocab_projector` shares the word embeddings.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

/// DistilBERT's LayerNorm epsilon (hard-coded in transformers).
pub const LAYER_NORM_EPS: f64 = 1e-12;

impl DistilBertConfig {
    /// The MLP activation (erf GELU for an unknown name; [`DistilBertConfig::validate`] refuses
    /// those).
    pub fn act(&self) -> Activation {
        Activation::from_name(&self.activation).unwrap_or(Activation::Gelu)
    }
}

impl FamilyConfig for DistilBertConfig {
    /// Checks sizes and options (the path is for messages).
    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "dim ({}) must be a positive multiple of n_heads ({})",
                    self.dim, self.n_heads
                ),
            });
        }
        if Activation::from_name(&self.activation).is_none() {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "activation {:?} is not supported (kiln supports {})",
                    self.activation,
                    Activation::NAMES
                ),
            });
        }
        Ok(())
    }
}

/// One transformer block (`{prefix}transformer.layer.{i}`) on `x[batch, seq, dim]`.
pub fn layer(
    t: &Tracer,
    cfg: &DistilBertConfig,
    p: &str,
    x: &Tensor,
    mask: &Tensor,
) -> Result<Tensor, kiln_ir::OpError> {
    let names = encoder::LayerNames {
        attention: "attention",
        qkv: ["q_lin", "k_lin", "v_lin"],
        attention_out: "attention.out_lin",
        attention_norm: "sa_layer_norm",
        mlp_in: "ffn.lin1",
        mlp_out: "ffn.lin2",
        output_norm: "output_layer_norm",
    };
    let sizes = encoder::LayerSizes {
        hidden: cfg.dim,
        heads: cfg.n_heads,
        intermediate: cfg.hidden_dim,
        eps: LAYER_NORM_EPS,
        act: cfg.act(),
    };
    encoder::post_ln_layer(t, x, mask, p, &names, &sizes)
}

/// Traces DistilBERT with `head` (inputs and outputs as in [`crate::encoder`]; no
/// `token_type_ids`).
pub fn trace(cfg: &DistilBertConfig, head: EncoderHead) -> Result<Graph, TraceError> {
    let t = Tracer::new();
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    let ids = t.input("input_ids", DType::I64, [b.clone(), s.clone()]);
    let mask_in = t.input("attention_mask", DType::I64, [b, s.clone()]);
    let pre = head.prefix("distilbert");
    let d = cfg.dim;
    let words = t.param(
        &format!("{pre}embeddings.word_embeddings.weight"),
        DType::F32,
        [cfg.vocab_size, d],
    );
    let pos_table = t.param(
        &format!("{pre}embeddings.position_embeddings.weight"),
        DType::F32,
        [cfg.max_position_embeddings, d],
    );
    let positions = t.iota(DType::I64, [s.clone()], 0)?;
    let x = words
        .index_select(0, &ids)?
        .add(&pos_table.index_select(0, &positions)?)?;
    let mut x = nn::layer_norm(
        &t,
        &x,
        &format!("{pre}embeddings.LayerNorm"),
        LAYER_NORM_EPS,
    )?;
    let mask = nn::attention_mask(&t, &mask_in, &s, false, None)?;
    for i in 0..cfg.n_layers {
        x = layer(&t, cfg, &format!("{pre}transformer.layer.{i}"), &x, &mask)?;
    }
    t.output("last_hidden_state", &x);
    match head {
        EncoderHead::Base => {}
        EncoderHead::MaskedLm => {
            let y = nn::linear(&t, &x, "vocab_transform", d, d, true)?;
            let y = cfg.act().apply(&y)?;
            let y = nn::layer_norm(&t, &y, "vocab_layer_norm", LAYER_NORM_EPS)?;
            let logits = if cfg.tie_word_embeddings {
                let bias = t.param("vocab_projector.bias", DType::F32, [cfg.vocab_size]);
                y.matmul_t(&words, false, true)?.add(&bias)?
            } else {
                nn::linear(&t, &y, "vocab_projector", cfg.vocab_size, d, true)?
            };
            t.output("logits", &logits);
        }
        EncoderHead::SequenceClassification { num_labels } => {
            let first = encoder::first_token(&x)?;
            let pooled = nn::linear(&t, &first, "pre_classifier", d, d, true)?.relu()?;
            let logits = nn::linear(&t, &pooled, "classifier", num_labels, d, true)?;
            t.output("logits", &logits);
        }
    }
    Ok(t.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn parse(arch: &str, extra: &str) -> Result<config::ModelConfig, ModelError> {
        let text = format!(
            r#"{{"model_type": "distilbert", "architectures": ["{arch}"], "vocab_size": 40,
                "dim": 8, "n_layers": 1, "n_heads": 2, "hidden_dim": 16{extra}}}"#
        );
        config::parse(&text, Path::new("config.json"))
    }

    #[test]
    fn refuses_unsupported_configs() {
        let m = parse("DistilBertModel", r#", "activation": "quick_gelu""#)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("activation \"quick_gelu\" is not supported"),
            "{m}"
        );
        let m = parse("DistilBertModel", r#", "n_heads": 3"#)
            .unwrap_err()
            .to_string();
        assert!(m.contains("n_heads (3)"), "{m}");
    }

    #[test]
    fn names_follow_the_architecture() {
        let names = |arch: &str, extra: &str| -> Vec<String> {
            let cfg = parse(arch, extra).unwrap();
            let g = encoder::trace_encoder(&cfg).unwrap();
            assert!(!g.uses_token_types);
            assert!(!g.graph.inputs().any(|(n, _, _)| n == "token_type_ids"));
            g.graph.params().map(|(n, _, _)| n.to_string()).collect()
        };
        let base = names("DistilBertModel", "");
        assert!(base.contains(&"transformer.layer.0.attention.q_lin.weight".to_string()));
        assert!(base.iter().all(|n| !n.starts_with("distilbert.")));
        let mlm = names("DistilBertForMaskedLM", "");
        assert!(mlm.contains(&"distilbert.embeddings.word_embeddings.weight".to_string()));
        assert!(mlm.contains(&"vocab_projector.bias".to_string()));
        assert!(!mlm.contains(&"vocab_projector.weight".to_string()));
        let untied = names("DistilBertForMaskedLM", r#", "tie_word_embeddings": false"#);
        assert!(untied.contains(&"vocab_projector.weight".to_string()));
        let cls = names(
            "DistilBertForSequenceClassification",
            r#", "id2label": {"0": "a", "1": "b"}"#,
        );
        assert!(cls.contains(&"pre_classifier.weight".to_string()));
        assert!(cls.contains(&"classifier.weight".to_string()));
    }
}

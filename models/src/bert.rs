//! BERT: word + position + token-type embeddings, post-LayerNorm encoder layers with a padding
//! mask, and the masked-LM and sequence-classification heads.
//!
//! Traced as transformers' eager `BertModel` / `BertForMaskedLM` /
//! `BertForSequenceClassification`. Parameter names are the checkpoint's: the base model's
//! `embeddings.{word,position,token_type}_embeddings.weight`, `embeddings.LayerNorm.*`,
//! `encoder.layer.{i}.attention.self.{query,key,value}.*`, `encoder.layer.{i}.attention.output.
//! {dense,LayerNorm}.*`, `encoder.layer.{i}.intermediate.dense.*`,
//! `encoder.layer.{i}.output.{dense,LayerNorm}.*` and `pooler.dense.*`, prefixed `bert.` under a
//! head; the masked-LM head's `cls.predictions.transform.{dense,LayerNorm}.*` and
//! `cls.predictions.bias`, with the decoder tied to `bert.embeddings.word_embeddings.weight`
//! (transformers saves neither `cls.predictions.decoder.weight` nor `.bias` then; untied, the
//! head uses both); the classifier's `classifier.*`.

use crate::config::{yes, FamilyConfig};
use crate::encoder::{self, EncoderHead};
use crate::nn::{self, Activation};
use crate::{ModelError, TraceError};
use kiln_ir::trace::{Tensor, Tracer};
use kiln_ir::{DType, Dim, Graph};
use serde::Deserialize;
use std::path::Path;

/// BERT's `config.json` (sizes required; options default as transformers' `BertConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Positions.
    #[serde(default = "crate::config::positions_512")]
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// MLP activation.
    #[serde(default = "crate::config::gelu")]
    pub hidden_act: String,
    /// The masked-LM decoder shares the word embeddings (and its bias is `cls.predictions.bias`).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Causal (decoder) self-attention; not supported.
    #[serde(default)]
    pub is_decoder: bool,
    /// Cross-attention layers; not supported.
    #[serde(default)]
    pub add_cross_attention: bool,
    /// transformers 4's position scheme (`absolute`, `relative_key`, `relative_key_query`);
    /// transformers 5 dropped the key and implements only absolute positions.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// The MLP activation (erf GELU for an unknown name; [`BertConfig::validate`] refuses
    /// those).
    pub fn activation(&self) -> Activation {
        Activation::from_name(&self.hidden_act).unwrap_or(Activation::Gelu)
    }
}

impl FamilyConfig for BertConfig {
    /// Checks sizes and options (the path is for messages).
    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let unsupported = |message: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let (h, n) = (self.hidden_size, self.num_attention_heads);
        if n == 0 || h % n != 0 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "hidden_size ({h}) must be a positive multiple of num_attention_heads ({n})"
                ),
            });
        }
        if Activation::from_name(&self.hidden_act).is_none() {
            return Err(unsupported(format!(
                "hidden_act {:?} is not supported (kiln supports {})",
                self.hidden_act,
                Activation::NAMES
            )));
        }
        if self.is_decoder || self.add_cross_attention {
            return Err(unsupported(
                "BERT as a decoder (is_decoder or add_cross_attention = true) is not supported; \
                 kiln runs BERT as a bidirectional encoder"
                    .into(),
            ));
        }
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "position_embedding_type {other:?} is not supported (only \"absolute\"; \
                     transformers 5 implements no other)"
                )))
            }
        }
        Ok(())
    }
}

/// One encoder layer (`{prefix}encoder.layer.{i}`) on `x[batch, seq, hidden]`.
pub fn layer(
    t: &Tracer,
    cfg: &BertConfig,
    p: &str,
    x: &Tensor,
    mask: &Tensor,
) -> Result<Tensor, kiln_ir::OpError> {
    let names = encoder::LayerNames {
        attention: "attention.self",
        qkv: ["query", "key", "value"],
        attention_out: "attention.output.dense",
        attention_norm: "attention.output.LayerNorm",
        mlp_in: "intermediate.dense",
        mlp_out: "output.dense",
        output_norm: "output.LayerNorm",
    };
    let sizes = encoder::LayerSizes {
        hidden: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        intermediate: cfg.intermediate_size,
        eps: cfg.layer_norm_eps,
        act: cfg.activation(),
    };
    encoder::post_ln_layer(t, x, mask, p, &names, &sizes)
}

/// Traces BERT with `head` (inputs and outputs as in [`crate::encoder`]).
pub fn trace(cfg: &BertConfig, head: EncoderHead) -> Result<Graph, TraceError> {
    let t = Tracer::new();
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    let ids = t.input("input_ids", DType::I64, [b.clone(), s.clone()]);
    let mask_in = t.input("attention_mask", DType::I64, [b.clone(), s.clone()]);
    let types = t.input("token_type_ids", DType::I64, [b, s.clone()]);
    let pre = head.prefix("bert");
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let emb = |name: &str, rows: usize| {
        t.param(
            &format!("{pre}embeddings.{name}.weight"),
            DType::F32,
            [rows, h],
        )
    };
    let words = emb("word_embeddings", cfg.vocab_size);
    let positions = t.iota(DType::I64, [s.clone()], 0)?;
    // inputs_embeds + token_type_embeddings, then + position_embeddings (transformers' order).
    let x = words
        .index_select(0, &ids)?
        .add(&emb("token_type_embeddings", cfg.type_vocab_size).index_select(0, &types)?)?
        .add(
            &emb("position_embeddings", cfg.max_position_embeddings).index_select(0, &positions)?,
        )?;
    let mut x = nn::layer_norm(&t, &x, &format!("{pre}embeddings.LayerNorm"), eps)?;
    let mask = nn::attention_mask(&t, &mask_in, &s, false, None)?;
    for i in 0..cfg.num_hidden_layers {
        x = layer(&t, cfg, &format!("{pre}encoder.layer.{i}"), &x, &mask)?;
    }
    t.output("last_hidden_state", &x);
    match head {
        EncoderHead::Base => {}
        EncoderHead::MaskedLm => {
            let p = "cls.predictions";
            let y = nn::linear(&t, &x, &format!("{p}.transform.dense"), h, h, true)?;
            let y = cfg.activation().apply(&y)?;
            let y = nn::layer_norm(&t, &y, &format!("{p}.transform.LayerNorm"), eps)?;
            let logits = if cfg.tie_word_embeddings {
                let bias = t.param(&format!("{p}.bias"), DType::F32, [cfg.vocab_size]);
                y.matmul_t(&words, false, true)?.add(&bias)?
            } else {
                nn::linear(&t, &y, &format!("{p}.decoder"), cfg.vocab_size, h, true)?
            };
            t.output("logits", &logits);
        }
        EncoderHead::SequenceClassification { num_labels } => {
            let first = encoder::first_token(&x)?;
            let pooled =
                nn::linear(&t, &first, &format!("{pre}pooler.dense"), h, h, true)?.tanh()?;
            let logits = nn::linear(&t, &pooled, "classifier", num_labels, h, true)?;
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
            r#"{{"model_type": "bert", "architectures": ["{arch}"], "vocab_size": 40,
                "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 16{extra}}}"#
        );
        config::parse(&text, Path::new("config.json"))
    }

    #[test]
    fn refuses_unsupported_configs() {
        let msg = |arch: &str, extra: &str| parse(arch, extra).unwrap_err().to_string();
        let m = msg("BertModel", r#", "hidden_act": "quick_gelu""#);
        assert!(
            m.contains("hidden_act \"quick_gelu\" is not supported"),
            "{m}"
        );
        let m = msg("BertModel", r#", "is_decoder": true"#);
        assert!(m.contains("BERT as a decoder"), "{m}");
        let m = msg(
            "BertModel",
            r#", "position_embedding_type": "relative_key""#,
        );
        assert!(
            m.contains("position_embedding_type \"relative_key\""),
            "{m}"
        );
        let m = msg("BertModel", r#", "num_attention_heads": 3"#);
        assert!(m.contains("num_attention_heads (3)"), "{m}");
        assert!(parse("BertModel", r#", "position_embedding_type": "absolute""#).is_ok());
    }

    #[test]
    fn names_follow_the_architecture() {
        let names = |arch: &str, extra: &str| -> Vec<String> {
            let cfg = parse(arch, extra).unwrap();
            let g = encoder::trace_encoder(&cfg).unwrap();
            assert!(g.uses_token_types);
            g.graph.params().map(|(n, _, _)| n.to_string()).collect()
        };
        let base = names("BertModel", "");
        assert!(base.contains(&"embeddings.word_embeddings.weight".to_string()));
        assert!(base
            .iter()
            .all(|n| !n.starts_with("bert.") && !n.starts_with("cls.")));
        let mlm = names("BertForMaskedLM", "");
        assert!(mlm.contains(&"bert.encoder.layer.0.attention.self.query.weight".to_string()));
        assert!(mlm.contains(&"cls.predictions.bias".to_string()));
        assert!(!mlm
            .iter()
            .any(|n| n.contains("decoder") || n.contains("pooler")));
        let untied = names("BertForMaskedLM", r#", "tie_word_embeddings": false"#);
        assert!(untied.contains(&"cls.predictions.decoder.weight".to_string()));
        assert!(untied.contains(&"cls.predictions.decoder.bias".to_string()));
        let cls = names(
            "BertForSequenceClassification",
            r#", "id2label": {"0": "a", "1": "b", "2": "c"}"#,
        );
        assert!(cls.contains(&"bert.pooler.dense.weight".to_string()));
        assert!(cls.contains(&"classifier.bias".to_string()));
    }

    #[test]
    fn classification_labels_default_as_transformers() {
        let cfg = parse("BertForSequenceClassification", "").unwrap();
        assert_eq!(cfg.labels, ["LABEL_0", "LABEL_1"]);
        assert!(encoder::trace_encoder(&cfg).is_ok());
        let cfg = parse("BertForSequenceClassification", r#", "num_labels": 3"#).unwrap();
        assert_eq!(cfg.labels.len(), 3);
        let e = parse("BertForSequenceClassification", r#", "num_labels": 0"#).unwrap_err();
        assert!(e.to_string().contains("num_labels"), "{e}");
    }
}

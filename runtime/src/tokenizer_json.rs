//! Parsing `tokenizer.json` into a `tokenizers::Tokenizer`, section by section, as the
//! `tokenizers` crate's own deserializer does (same sections, same builder, same added tokens)
//! but without its slow path for the model: the crate reads a typed model (`"type": "BPE"`)
//! through a `serde_json::Value` of the whole vocabulary before building it, which made parsing
//! a 32,000-token Llama tokenizer take ~60 ms — the largest part of an artifact's start. Here a
//! BPE model is read by the crate's own `BPE` deserializer straight from the JSON text; other
//! models (WordPiece, Unigram, ...) take the crate's general path.
//!
//! Every section but the model is checked as strict JSON first (a few hundred bytes): the crate
//! panics instead of failing on some malformed decoders (its `expect("Helper")`).

use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use tokenizers::models::bpe::BPE;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder,
};

/// An entry of `added_tokens`: its `id` must be there, but the token gets the one the
/// vocabulary gives it (the crate only warns when they differ).
#[derive(Deserialize)]
struct AddedTokenWithId {
    #[serde(rename = "id")]
    _id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

/// The model's `type`, when it has one.
#[derive(Deserialize)]
struct ModelType {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Parses `tokenizer.json`'s bytes, without its truncation and padding settings (the caller
/// switches them off anyway).
pub fn parse(json: &[u8]) -> Result<Tokenizer, String> {
    let sections: BTreeMap<String, &RawValue> =
        serde_json::from_slice(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let section = |name: &str| sections.get(name).map(|raw| raw.get());
    let strict = |name: &str| -> Result<Option<&str>, String> {
        let Some(text) = section(name) else {
            return Ok(None);
        };
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| format!("{name}: not valid JSON: {e}"))?;
        Ok(Some(text))
    };
    fn typed<'a, T: Deserialize<'a>>(name: &str, text: &'a str) -> Result<T, String> {
        serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))
    }
    if let Some(v) = strict("version")? {
        let v: String = typed("version", v)?;
        if v != "1.0" {
            return Err(format!("Unknown tokenizer version '{v}'"));
        }
    }
    let mut builder = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new();
    if let Some(text) = section("model") {
        let kind = typed::<ModelType>("model", text)?.kind;
        let model = if kind.as_deref() == Some("BPE") {
            ModelWrapper::BPE(typed::<BPE>("model", text)?)
        } else {
            typed::<ModelWrapper>("model", strict("model")?.unwrap_or(text))?
        };
        builder = builder.with_model(model);
    }
    if let Some(t) = strict("normalizer")? {
        builder = builder.with_normalizer(typed("normalizer", t)?);
    }
    if let Some(t) = strict("pre_tokenizer")? {
        builder = builder.with_pre_tokenizer(typed("pre_tokenizer", t)?);
    }
    if let Some(t) = strict("post_processor")? {
        builder = builder.with_post_processor(typed("post_processor", t)?);
    }
    if let Some(t) = strict("decoder")? {
        builder = builder.with_decoder(typed("decoder", t)?);
    }
    let added: Vec<AddedTokenWithId> = match strict("added_tokens")? {
        Some(t) => typed("added_tokens", t)?,
        None => Vec::new(),
    };
    let mut tokenizer = Tokenizer::from(builder.build().map_err(|e| e.to_string())?);
    let added: Vec<AddedToken> = added.into_iter().map(|a| a.token).collect();
    tokenizer.add_tokens(&added);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> Vec<(String, Vec<u8>)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&root).unwrap() {
            let path = dir.unwrap().path().join("tokenizer.json");
            if let Ok(bytes) = std::fs::read(&path) {
                out.push((path.display().to_string(), bytes));
            }
        }
        assert!(out.len() >= 5, "tokenizer fixtures: {}", out.len());
        out
    }

    /// Every fixture tokenizer (BPE with byte fallback, byte-level BPE, WordPiece), as the
    /// checkpoint has it and as an artifact stores it, parses to one that encodes and decodes
    /// exactly as the crate's own parse does, with every id and token of the vocabulary,
    /// special tokens included.
    #[test]
    fn parses_as_the_crate_does() {
        let forms = fixtures().into_iter().flat_map(|(name, bytes)| {
            let stored = crate::artifact::tokenizer::for_artifact(&bytes);
            [
                (name.clone(), bytes),
                (format!("{name} (artifact)"), stored),
            ]
        });
        for (name, bytes) in forms {
            let ours = parse(&bytes).unwrap();
            let theirs = Tokenizer::from_bytes(&bytes).unwrap();
            assert_eq!(
                ours.get_vocab(true),
                theirs.get_vocab(true),
                "{name}: vocabulary"
            );
            assert_eq!(
                ours.get_added_tokens_decoder(),
                theirs.get_added_tokens_decoder(),
                "{name}: added tokens"
            );
            for text in [
                "The little robot walked home.",
                "  héllo, wörld!\n\t12345 <s> </s> [CLS] <|endoftext|>",
                "🦀 unknown ŋ ZZZZ",
                "",
            ] {
                for special in [false, true] {
                    let a = ours.encode(text, special).unwrap();
                    let b = theirs.encode(text, special).unwrap();
                    assert_eq!(a.get_ids(), b.get_ids(), "{name}: {text:?}");
                    assert_eq!(a.get_offsets(), b.get_offsets(), "{name}: {text:?}");
                    assert_eq!(
                        ours.decode(a.get_ids(), !special).unwrap(),
                        theirs.decode(b.get_ids(), !special).unwrap(),
                        "{name}: {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_what_the_crate_refuses_or_panics_on() {
        for bad in [
            &b"not json"[..],
            br#"{"version": "2.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}}"#,
            br#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#,
            br#"{"model": {"type": "Nope"}}"#,
            br#"{"pre_tokenizer": null}"#,
            br#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "Replace", "pattern": {"String": "\ud800"}, "content": " "}}"#,
            br#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": [{"content": "x"}]}"#,
        ] {
            assert!(
                parse(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

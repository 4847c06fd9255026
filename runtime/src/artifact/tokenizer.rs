//! The tokenizer section: `tokenizer.json` rewritten, with the same meaning, in the shape the
//! `tokenizers` crate parses fastest, since parsing it is on the way to every first token. A BPE
//! model's merges become `"a b"` strings instead of `["a", "b"]` pairs (the crate reads both;
//! strings parse about a quarter faster on a 32,000-token Llama tokenizer) and the JSON is
//! compact. A file that does not parse, is not BPE, or has a merge that the string form cannot
//! say (a part holding a space, or a line the crate would skip as a `#version` header) is kept
//! byte for byte.

use serde_json::Value;

/// `tokenizer.json`'s bytes in the artifact's form.
pub fn for_artifact(json: &[u8]) -> Vec<u8> {
    let Ok(mut t) = serde_json::from_slice::<Value>(json) else {
        return json.to_vec();
    };
    let model = &mut t["model"];
    if model["type"] != "BPE" {
        return json.to_vec();
    }
    let Some(merges) = model["merges"].as_array() else {
        return json.to_vec();
    };
    let joined: Option<Vec<Value>> = merges
        .iter()
        .map(|m| match m.as_array().map(Vec::as_slice) {
            Some([Value::String(a), Value::String(b)])
                if !a.contains(' ') && !b.contains(' ') && !a.starts_with("#version") =>
            {
                Some(Value::String(format!("{a} {b}")))
            }
            _ => None,
        })
        .collect();
    let Some(joined) = joined else {
        return json.to_vec();
    };
    model["merges"] = Value::Array(joined);
    serde_json::to_vec(&t).unwrap_or_else(|_| json.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::Tokenizer;

    fn fixture(name: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read(
            root.join("tests/fixtures/hf")
                .join(name)
                .join("tokenizer.json"),
        )
        .unwrap()
    }

    #[test]
    fn the_rewritten_tokenizer_tokenizes_alike() {
        let original = fixture("llama");
        let rewritten = for_artifact(&original);
        assert_ne!(rewritten, original);
        let merges =
            |j: &[u8]| serde_json::from_slice::<Value>(j).unwrap()["model"]["merges"][0].clone();
        assert!(merges(&original).is_array() && merges(&rewritten).is_string());
        let (a, b) = (
            Tokenizer::from_bytes(&original).unwrap(),
            Tokenizer::from_bytes(&rewritten).unwrap(),
        );
        for text in [
            "The little robot",
            "  héllo, wörld!\n\t12345 <s> </s>",
            "ðŸ¦€ unknown ŋ",
        ] {
            let (x, y) = (a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
            assert_eq!(x.get_ids(), y.get_ids(), "{text:?}");
            assert_eq!(
                a.decode(x.get_ids(), false).unwrap(),
                b.decode(y.get_ids(), false).unwrap()
            );
        }
    }

    #[test]
    fn what_the_string_form_cannot_say_is_kept() {
        let keep =
            |json: &str| assert_eq!(for_artifact(json.as_bytes()), json.as_bytes(), "{json}");
        keep(r#"{"model": {"type": "BPE", "merges": [["a b", "c"]]}}"#);
        keep(r##"{"model": {"type": "BPE", "merges": [["#version", "c"]]}}"##);
        keep(r#"{"model": {"type": "WordPiece", "vocab": {}}}"#);
        keep("not json");
        assert_eq!(
            for_artifact(br#"{"model": {"type": "BPE", "merges": [["a", "b"]]}}"#),
            br#"{"model":{"merges":["a b"],"type":"BPE"}}"#
        );
    }
}

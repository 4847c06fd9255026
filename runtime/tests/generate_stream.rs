//! Incremental detokenization and stop strings with tokenizers built in the test: a GPT-2 style
//! byte-level BPE (multi-byte characters split across tokens, some merges that cut characters in
//! the middle) and a Llama-2 style SentencePiece BPE (`▁` spaces, byte fallback, `Strip`).

use kiln_runtime::generate::{IncrementalDecoder, StopStep, Stopper, StreamError};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// GPT-2's byte → printable character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(&cs) {
        table[*b as usize] = char::from_u32(*c).unwrap();
    }
    table
}

fn byte_str(bytes: &[u8]) -> String {
    let t = bytes_to_unicode();
    bytes.iter().map(|&b| t[b as usize]).collect()
}

const ENDOFTEXT: u32 = 300;

/// Byte-level BPE: the 256 bytes, then merges for a few English pieces, the first two bytes of
/// "中" (E4 B8 | AD), the halves of "😀" (F0 9F | 98 80) and " caf".
fn byte_level() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_str(&[b]), json!(b));
    }
    let merges: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"h".to_vec(), b"e".to_vec()),
        (b"l".to_vec(), b"l".to_vec()),
        (b"he".to_vec(), b"ll".to_vec()),
        (b"hell".to_vec(), b"o".to_vec()),
        (b" ".to_vec(), b"w".to_vec()),
        (b" w".to_vec(), b"o".to_vec()),
        (b"r".to_vec(), b"l".to_vec()),
        (b"rl".to_vec(), b"d".to_vec()),
        (vec![0xE4], vec![0xB8]),
        (vec![0xF0], vec![0x9F]),
        (vec![0x98], vec![0x80]),
        (b" ".to_vec(), b"c".to_vec()),
        (b" c".to_vec(), b"a".to_vec()),
        (b" ca".to_vec(), b"f".to_vec()),
    ];
    let mut merge_list = Vec::new();
    for (next, (a, b)) in (256u32..).zip(&merges) {
        let joined: Vec<u8> = a.iter().chain(b).copied().collect();
        merge_list.push(json!([byte_str(a), byte_str(b)]));
        vocab.insert(byte_str(&joined), json!(next));
    }
    let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": ENDOFTEXT, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": bl,
        "post_processor": null,
        "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": Value::Object(vocab), "merges": merge_list}
    });
    Tokenizer::from_bytes(serde_json::to_vec(&spec).unwrap()).expect("byte-level tokenizer")
}

/// SentencePiece-style BPE with byte fallback (decoding only: ids are chosen by hand).
fn sentencepiece() -> (Tokenizer, impl Fn(&str) -> u32) {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    for p in [
        "▁",
        "▁Hello",
        "▁world",
        "world",
        "!",
        "▁caf",
        "é",
        "▁naïve",
        "▁the",
        "end",
    ] {
        pieces.push(p.into());
    }
    let vocab: serde_json::Map<String, Value> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), json!(i)))
        .collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": Value::Object(vocab), "merges": []}
    });
    let tok =
        Tokenizer::from_bytes(serde_json::to_vec(&spec).unwrap()).expect("sentencepiece tokenizer");
    let ids = move |p: &str| {
        pieces
            .iter()
            .position(|x| x == p)
            .unwrap_or_else(|| panic!("no piece {p}")) as u32
    };
    (tok, ids)
}

/// Streams `ids` one at a time; returns the chunks (after `finish`, its output is the last).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut d = IncrementalDecoder::new(tok);
    let mut chunks: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    chunks.push(d.finish().unwrap());
    assert_eq!(d.ids(), ids);
    chunks
}

fn full(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, true).unwrap()
}

const TEXTS: [&str; 5] = [
    "hello world",
    "hello 中文字 world",
    "café naïve — Ωmega",
    "emoji 😀👍🏽 and flags 🇫🇷!",
    " leading  spaces\nand\ttabs 中😀é",
];

#[test]
fn byte_level_streaming_equals_full_decode() {
    let tok = byte_level();
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(full(&tok, &ids), text, "the tokenizer round-trips");
        let chunks = stream(&tok, &ids);
        assert_eq!(chunks.concat(), text);
        for c in &chunks {
            assert!(
                !c.contains('\u{FFFD}'),
                "{text:?}: broken character in chunk {c:?}"
            );
        }
        // The emoji are split over several tokens: fewer non-empty chunks than tokens.
        if text.contains('😀') {
            assert!(chunks.iter().filter(|c| !c.is_empty()).count() < ids.len());
        }
    }
}

#[test]
fn byte_level_holds_back_partial_characters() {
    let tok = byte_level();
    let ids = tok.encode("中", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 2, "E4 B8 merged, AD alone");
    let mut d = IncrementalDecoder::new(&tok);
    assert_eq!(d.push(ids[0]).unwrap(), "");
    assert_eq!(d.push(ids[1]).unwrap(), "中");
    // "é" = C3 A9, two single-byte tokens.
    let ids = tok.encode("é", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 2);
    let mut d = IncrementalDecoder::new(&tok);
    assert_eq!(d.push(ids[0]).unwrap(), "");
    assert_eq!(d.push(ids[1]).unwrap(), "é");
    assert_eq!(d.text(), "é");
}

#[test]
fn byte_level_special_tokens_and_truncated_characters() {
    let tok = byte_level();
    let mut ids = tok.encode("hello", false).unwrap().get_ids().to_vec();
    ids.push(ENDOFTEXT);
    ids.extend(tok.encode(" world", false).unwrap().get_ids());
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.concat(), "hello world");
    // Generation stopped in the middle of "😀": finish releases the replacement character, as
    // the full decode has it.
    let mut ids = tok.encode("ok😀", false).unwrap().get_ids().to_vec();
    ids.pop();
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.concat(), full(&tok, &ids));
    assert_eq!(chunks.last().unwrap(), "\u{FFFD}");
}

/// A small deterministic generator for random id sequences.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_id_sequences_stream_exactly() {
    // Any ids at all, including lone continuation bytes, half characters and special tokens:
    // the chunks always add up to the full decode.
    let tok = byte_level();
    let (sp, _) = sentencepiece();
    let sp_vocab = sp.get_vocab_size(true) as u64;
    let mut s = 0x1234_5678_9abc_def0u64;
    for round in 0..300 {
        let n = 1 + (xorshift(&mut s) % 25) as usize;
        let ids: Vec<u32> = (0..n)
            .map(|_| {
                let r = xorshift(&mut s);
                if round % 2 == 0 {
                    (r % 271) as u32
                        + if r.is_multiple_of(41) {
                            ENDOFTEXT - 270
                        } else {
                            0
                        }
                } else {
                    (r % sp_vocab) as u32
                }
            })
            .collect();
        let t = if round % 2 == 0 { &tok } else { &sp };
        assert_eq!(stream(t, &ids).concat(), full(t, &ids), "ids {ids:?}");
    }
}

#[test]
fn sentencepiece_spaces_match_the_full_decode() {
    let (tok, id) = sentencepiece();
    let seqs: Vec<Vec<&str>> = vec![
        vec!["▁Hello", "▁world", "!"],
        vec!["▁", "world", "▁Hello"],
        vec!["▁Hello", "</s>", "▁world"],
        vec!["<s>", "▁Hello", "▁", "▁world"],
        vec!["▁caf", "<0xC3>", "<0xA9>", "▁naïve", "▁the", "end"],
        vec![
            "▁Hello", "<0xE4>", "<0xB8>", "<0xAD>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!",
        ],
    ];
    for seq in seqs {
        let ids: Vec<u32> = seq.iter().map(|p| id(p)).collect();
        let chunks = stream(&tok, &ids);
        let want = full(&tok, &ids);
        assert_eq!(chunks.concat(), want, "{seq:?}");
        assert!(
            chunks.iter().all(|c| !c.contains('\u{FFFD}')),
            "{seq:?}: {chunks:?}"
        );
    }
    // The first piece's space is dropped (Strip), later ones are kept.
    let ids: Vec<u32> = ["▁Hello", "▁world"].iter().map(|p| id(p)).collect();
    assert_eq!(stream(&tok, &ids), ["Hello", " world", ""]);
}

// ---------------------------------------------------------------------------------------------
// Stop strings

/// Feeds all ids to row 0 of a stopper; returns the chunks, whether it stopped, and the
/// number of tokens consumed before it said stop.
fn run_stopper(stopper: &mut Stopper, ids: &[u32]) -> (Vec<String>, bool, usize) {
    let mut chunks = Vec::new();
    for (n, &id) in ids.iter().enumerate() {
        let StopStep { text, stop } = stopper.push(0, id).unwrap();
        chunks.push(text);
        if stop {
            chunks.push(stopper.finish(0).unwrap());
            return (chunks, true, n + 1);
        }
    }
    chunks.push(stopper.finish(0).unwrap());
    (chunks, false, ids.len())
}

#[test]
fn stop_string_across_tokens_cuts_the_text() {
    let tok = byte_level();
    let ids = tok
        .encode("hello world, more", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let stops = vec!["o wo".to_string()];
    let mut s = Stopper::new(&tok, &stops, &[], 1);
    let (chunks, stopped, used) = run_stopper(&mut s, &ids);
    assert!(stopped && s.hit_stop_string(0) && s.is_stopped(0));
    assert_eq!(s.text(0), "hell");
    assert_eq!(chunks.concat(), "hell");
    // It stopped on the token that completed "o wo" (" wo" is one token after "hello").
    assert_eq!(used, 2);
}

#[test]
fn text_that_may_start_a_stop_string_is_held_back() {
    let tok = byte_level();
    let stops = vec!["\n\nUser:".to_string()];
    let mut s = Stopper::new(&tok, &stops, &[], 1);
    let ids = tok.encode("hi\n\nUs", false).unwrap().get_ids().to_vec();
    let mut out = String::new();
    for &id in &ids {
        let step = s.push(0, id).unwrap();
        assert!(!step.stop);
        out.push_str(&step.text);
    }
    assert_eq!(out, "hi", "\\n\\nUs could still become the stop string");
    // It did not: the held text is released.
    let more = tok.encode("ually", false).unwrap().get_ids().to_vec();
    for &id in &more {
        out.push_str(&s.push(0, id).unwrap().text);
    }
    out.push_str(&s.finish(0).unwrap());
    assert_eq!(out, "hi\n\nUsually");
    assert_eq!(s.text(0), "hi\n\nUsually");
    assert!(!s.hit_stop_string(0));
}

#[test]
fn earliest_stop_string_wins_and_multibyte_stops_work() {
    let tok = byte_level();
    let stops = vec!["world".to_string(), "lo w".to_string(), "中".to_string()];
    let mut s = Stopper::new(&tok, &stops, &[], 2);
    let ids = tok.encode("hello world", false).unwrap().get_ids().to_vec();
    let mut text = String::new();
    for &id in &ids {
        let step = s.push(0, id).unwrap();
        text.push_str(&step.text);
        if step.stop {
            break;
        }
    }
    assert_eq!(text, "hel");
    assert_eq!(s.text(0), "hel");
    // Row 1: the stop string is a Chinese character split over two tokens.
    let ids = tok.encode("ab中cd", false).unwrap().get_ids().to_vec();
    let mut text = String::new();
    let mut stopped_at = None;
    for (n, &id) in ids.iter().enumerate() {
        let step = s.push(1, id).unwrap();
        text.push_str(&step.text);
        if step.stop {
            stopped_at = Some(n);
            break;
        }
    }
    assert_eq!(text, "ab");
    assert_eq!(stopped_at, Some(3), "a, b, E4 B8, AD");
    // Pushing to a finished row does nothing.
    assert_eq!(
        s.push(1, ids[0]).unwrap(),
        StopStep {
            text: String::new(),
            stop: true
        }
    );
}

#[test]
fn eos_ends_the_row_without_text() {
    let tok = byte_level();
    let mut s = Stopper::new(&tok, &[], &[ENDOFTEXT], 1);
    let mut ids = tok.encode("hello 中", false).unwrap().get_ids().to_vec();
    ids.push(ENDOFTEXT);
    ids.extend(tok.encode(" world", false).unwrap().get_ids());
    let eos_at = ids.iter().position(|&t| t == ENDOFTEXT).unwrap();
    let (chunks, stopped, used) = run_stopper(&mut s, &ids);
    assert!(stopped && !s.hit_stop_string(0));
    assert_eq!(used, eos_at + 1);
    assert_eq!(chunks.concat(), "hello 中");
    assert_eq!(s.text(0), "hello 中");
}

#[test]
fn no_stop_strings_streams_everything() {
    let tok = byte_level();
    let empty = vec![String::new()];
    let mut s = Stopper::new(&tok, &empty, &[], 1);
    let text = "emoji 😀👍🏽 and 中文";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let (chunks, stopped, _) = run_stopper(&mut s, &ids);
    assert!(!stopped);
    assert_eq!(chunks.concat(), text);
    assert_eq!(s.text(0), text);
}

#[test]
fn bad_rows_are_errors() {
    let tok = byte_level();
    let mut s = Stopper::new(&tok, &[], &[], 1);
    assert_eq!(
        s.push(3, 1).unwrap_err(),
        StreamError::BadRow { row: 3, rows: 1 }
    );
    assert!(s.finish(1).is_err());
    assert_eq!(s.text(5), "");
}

#[test]
fn stopper_drives_generate_through_the_callback() {
    use kiln_runtime::generate::{generate, GenerationConfig};
    use kiln_runtime::{LanguageModel, ModelError};

    // A model that spells "hello world, more" whatever the prompt.
    struct Spell(Vec<u32>, usize);
    impl Spell {
        fn logits(&self) -> Vec<Vec<f32>> {
            let mut l = vec![0.0; 310];
            l[self.0[self.1.min(self.0.len() - 1)] as usize] = 10.0;
            vec![l]
        }
    }
    impl LanguageModel for Spell {
        fn vocab_size(&self) -> usize {
            310
        }
        fn prefill(&mut self, _: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.1 = 0;
            Ok(self.logits())
        }
        fn decode(&mut self, _: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.1 += 1;
            Ok(self.logits())
        }
        fn reorder(&mut self, _: &[usize]) -> Result<(), ModelError> {
            Ok(())
        }
    }
    let tok = byte_level();
    let ids = tok
        .encode("hello world, more", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut model = Spell(ids, 0);
    let cfg = GenerationConfig {
        max_new_tokens: Some(50),
        stop_strings: vec![", m".into()],
        ..GenerationConfig::default()
    };
    let mut stopper = Stopper::from_config(&tok, &cfg, 1);
    let mut streamed = String::new();
    let mut failure = None;
    let tokens = generate(
        &mut model,
        &[vec![1]],
        &cfg,
        0,
        &mut |row, t| match stopper.push(row, t) {
            Ok(step) => {
                streamed.push_str(&step.text);
                !step.stop
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        },
    )
    .unwrap();
    assert!(failure.is_none());
    streamed.push_str(&stopper.finish(0).unwrap());
    assert_eq!(streamed, "hello world");
    assert_eq!(stopper.text(0), "hello world");
    // The token that completed the stop string is still in the token output.
    assert_eq!(tok.decode(&tokens[0], true).unwrap(), "hello world, m");
}

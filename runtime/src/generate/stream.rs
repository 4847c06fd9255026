//! Incremental detokenization: [`IncrementalDecoder`] is fed token ids one at a time and returns
//! only complete new text.
//!
//! The reference text is `tokenizer.decode(all_ids, skip_special_tokens = true)` of the
//! `tokenizers` crate (transformers' fast tokenizers call the same code; transformers'
//! optional `clean_up_tokenization_spaces` post-processing is not applied). The concatenation
//! of everything [`IncrementalDecoder::push`] and [`IncrementalDecoder::finish`] return equals
//! that decode of all the ids pushed.
//!
//! Technique (prefix offset / read offset, as text-generation-inference does): the decoder
//! keeps two positions in the id list. `prefix_text = decode(ids[prefix..read])` is text
//! already emitted; `new_text = decode(ids[prefix..])`; when `new_text` is longer, starts with
//! `prefix_text` and does not end in U+FFFD (an incomplete multi-byte character: byte-level
//! tokens split characters), the difference is emitted and the window moves (`prefix = read`,
//! `read = len`). Decoding a window that starts one emission back, rather than only the new
//! ids, keeps context-dependent decoders right (SentencePiece's `▁` → space, dropped only at
//! the very start of the text). Output ending in U+FFFD is held back until the character is
//! complete, and nothing is emitted while the last id is a SentencePiece byte-fallback token
//! (`<0xAB>`): the `ByteFallback` decoder turns a whole run of byte tokens into U+FFFDs when the
//! run is not valid UTF-8, so text from an unfinished run is not final.
//! [`IncrementalDecoder::finish`] releases whatever is left (including a genuinely incomplete
//! character at the end, as U+FFFD). If a decoder ever breaks the prefix property, the decoder
//! falls back to decoding all ids each step (slower, still exact as long as the full text only
//! grows; text already emitted cannot be taken back).

use tokenizers::Tokenizer;

/// Why text could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The tokenizer failed to decode.
    #[error("cannot decode tokens: {0}")]
    Decode(String),
    /// A row index outside the batch.
    #[error("row {row} is out of range (the batch has {rows} rows)")]
    BadRow {
        /// The row asked for.
        row: usize,
        /// The number of rows.
        rows: usize,
    },
}

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a stream of token ids into complete text chunks (see the module documentation).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted: String,
    full_decode: bool,
}

impl<'t> IncrementalDecoder<'t> {
    /// A decoder that skips special tokens, as `decode(ids, skip_special_tokens=True)`.
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self::with_special_tokens(tokenizer, true)
    }

    /// A decoder that skips special tokens or not.
    pub fn with_special_tokens(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
            full_decode: false,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, StreamError> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| StreamError::Decode(e.to_string()))
    }

    /// A SentencePiece byte-fallback token (`<0xAB>`), which the `ByteFallback` decoder groups
    /// with its neighbours.
    fn is_byte_token(&self, id: u32) -> bool {
        self.tokenizer.id_to_token(id).is_some_and(|t| {
            let b = t.as_bytes();
            b.len() == 6
                && t.starts_with("<0x")
                && b[5] == b'>'
                && b[3..5].iter().all(u8::is_ascii_hexdigit)
        })
    }

    /// Emits `text[emitted..]` when `text` extends what was emitted.
    fn emit_from_full(&mut self, full: &str) -> String {
        match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => {
                let rest = rest.to_string();
                self.emitted.push_str(&rest);
                rest
            }
            None => String::new(),
        }
    }

    /// Adds one token id; returns the new complete text (often empty).
    pub fn push(&mut self, id: u32) -> Result<String, StreamError> {
        self.ids.push(id);
        if self.is_byte_token(id) {
            // A byte-fallback group is decoded as a whole (all of it becomes U+FFFD if it is
            // not valid UTF-8), so nothing is final until a token that ends the group.
            return Ok(String::new());
        }
        if self.full_decode {
            let full = self.decode(&self.ids)?;
            if full.ends_with(REPLACEMENT) {
                return Ok(String::new());
            }
            return Ok(self.emit_from_full(&full));
        }
        let prefix_text = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = self.decode(&self.ids[self.prefix_offset..])?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        match new_text.strip_prefix(prefix_text.as_str()) {
            Some(chunk) => {
                let chunk = chunk.to_string();
                self.emitted.push_str(&chunk);
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(chunk)
            }
            None => {
                self.full_decode = true;
                let full = self.decode(&self.ids)?;
                Ok(self.emit_from_full(&full))
            }
        }
    }

    /// Releases the text still held back (an incomplete character at the end comes out as
    /// U+FFFD). After it, everything returned adds up to the decode of all ids. More ids may
    /// still be pushed afterwards.
    pub fn finish(&mut self) -> Result<String, StreamError> {
        let full = self.decode(&self.ids)?;
        let rest = self.emit_from_full(&full);
        if !rest.is_empty() {
            // The window no longer matches what was emitted; should more ids come, decode all.
            self.full_decode = true;
        }
        Ok(rest)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

//! Ending rows on EOS ids and stop strings, on top of the tokenizer-free
//! [`generate`](super::generate) loop.
//!
//! [`generate`](super::generate) already ends a row on the EOS ids of its configuration. A
//! [`Stopper`] adds text: it decodes each row incrementally ([`IncrementalDecoder`]), ends the
//! row when an EOS id arrives or when the row's generated text contains one of the stop strings,
//! and returns only text that is final. It is meant to be driven from `generate`'s callback:
//!
//! ```text
//! let mut stopper = Stopper::from_config(&tokenizer, &cfg, prompts.len());
//! let mut failure = None;
//! let tokens = generate(model, &prompts, &cfg, seed, &mut |row, token| {
//!     match stopper.push(row, token) {
//!         Ok(step) => { print!("{}", step.text); !step.stop }
//!         Err(e) => { failure = Some(e); false }
//!     }
//! })?;
//! for row in 0..prompts.len() { print!("{}", stopper.finish(row)?); }
//! // stopper.text(row) is each row's final text.
//! ```
//!
//! Exact rules:
//!
//! * Only the generated text is searched (a stop string that would start inside the prompt is
//!   not seen). The text is `decode(generated_ids, skip_special_tokens=true)`, with EOS ids not
//!   decoded at all.
//! * The row stops at the first token after which its text contains any stop string; the text
//!   is cut at the earliest occurrence, so the stop string and everything after it (including
//!   the rest of the token that completed it) are dropped from the returned text. The token
//!   that completed the stop string is still part of `generate`'s token output (as in
//!   transformers' `StopStringCriteria`, which stops after the completing token but returns
//!   tokens, not cut text).
//! * Streaming never emits text that a stop string could still remove: a suffix of the text
//!   that is a proper prefix of some stop string is held back until it is resolved, and text
//!   ending in an incomplete UTF-8 character is held back by the decoder. The chunks returned by
//!   [`Stopper::push`] and [`Stopper::finish`] add up to [`Stopper::text`].
//! * Empty stop strings are ignored.
//!
//! Differences from transformers' `StopStringCriteria`: it matches stop strings against token
//! strings, over the prompt as well, and never cuts text; kiln matches decoded generated text.

use super::stream::{IncrementalDecoder, StreamError};
use super::GenerationConfig;
use tokenizers::Tokenizer;

/// What one token did to a row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// New final text (may be empty).
    pub text: String,
    /// The row is finished (EOS, or a stop string was found): stop generating it.
    pub stop: bool,
}

#[derive(Debug, Clone)]
struct RowText<'t> {
    decoder: IncrementalDecoder<'t>,
    /// Everything decoded so far (before cutting).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where the first stop string starts, once found.
    cut: Option<usize>,
    stopped: bool,
}

/// EOS ids and stop strings for a batch of rows (see the module documentation).
#[derive(Debug, Clone)]
pub struct Stopper<'t> {
    stop_strings: Vec<String>,
    eos: Vec<u32>,
    rows: Vec<RowText<'t>>,
}

impl<'t> Stopper<'t> {
    /// A stopper for `rows` rows with these stop strings and EOS ids.
    pub fn new(
        tokenizer: &'t Tokenizer,
        stop_strings: &[String],
        eos: &[u32],
        rows: usize,
    ) -> Self {
        let row = RowText {
            decoder: IncrementalDecoder::new(tokenizer),
            text: String::new(),
            emitted: 0,
            cut: None,
            stopped: false,
        };
        Stopper {
            stop_strings: stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            eos: eos.to_vec(),
            rows: vec![row; rows],
        }
    }

    /// A stopper with the configuration's `stop_strings` and `eos_token_id`.
    pub fn from_config(tokenizer: &'t Tokenizer, cfg: &GenerationConfig, rows: usize) -> Self {
        Self::new(tokenizer, &cfg.stop_strings, &cfg.eos_token_id, rows)
    }

    /// Feeds one generated token of `row`; returns the new final text and whether the row is
    /// finished. Tokens fed after the row finished are ignored.
    pub fn push(&mut self, row: usize, token: u32) -> Result<StopStep, StreamError> {
        let rows = self.rows.len();
        let r = self
            .rows
            .get_mut(row)
            .ok_or(StreamError::BadRow { row, rows })?;
        if r.stopped || self.eos.contains(&token) {
            r.stopped = true;
            return Ok(StopStep {
                text: String::new(),
                stop: true,
            });
        }
        let chunk = r.decoder.push(token)?;
        Ok(r.absorb(&chunk, &self.stop_strings, false))
    }

    /// Ends `row` (call it once generation is over): releases the text still held back.
    pub fn finish(&mut self, row: usize) -> Result<String, StreamError> {
        let rows = self.rows.len();
        let r = self
            .rows
            .get_mut(row)
            .ok_or(StreamError::BadRow { row, rows })?;
        let rest = if r.cut.is_some() {
            String::new()
        } else {
            r.decoder.finish()?
        };
        r.stopped = true;
        Ok(r.absorb(&rest, &self.stop_strings, true).text)
    }

    /// The row's final text so far (cut before the stop string once one is found).
    pub fn text(&self, row: usize) -> &str {
        match self.rows.get(row) {
            Some(r) => &r.text[..r.cut.unwrap_or(r.emitted).min(r.text.len())],
            None => "",
        }
    }

    /// Whether `row` has finished (EOS, stop string, or [`finish`](Self::finish)).
    pub fn is_stopped(&self, row: usize) -> bool {
        self.rows.get(row).is_some_and(|r| r.stopped)
    }

    /// Whether `row` ended on a stop string.
    pub fn hit_stop_string(&self, row: usize) -> bool {
        self.rows.get(row).is_some_and(|r| r.cut.is_some())
    }
}

/// The largest index `<= i` on a char boundary of `s`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl RowText<'_> {
    /// Appends decoded text, looks for stop strings, and returns what became final.
    fn absorb(&mut self, chunk: &str, stops: &[String], last: bool) -> StopStep {
        if self.cut.is_some() {
            return StopStep {
                text: String::new(),
                stop: true,
            };
        }
        let old_len = self.text.len();
        self.text.push_str(chunk);
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        // A new match must end inside the new chunk.
        let from = floor_boundary(
            &self.text,
            old_len.saturating_sub(longest.saturating_sub(1)),
        );
        let found = stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(pos) = found {
            let start = self.emitted.min(pos);
            let text = self.text[start..pos].to_string();
            self.emitted = pos;
            self.cut = Some(pos);
            self.stopped = true;
            return StopStep { text, stop: true };
        }
        let end = if last {
            self.text.len()
        } else {
            // Hold back the longest suffix that could begin a stop string.
            let held = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|&k| s.is_char_boundary(k))
                        .map(move |k| &s[..k])
                })
                .filter(|p| self.text.ends_with(*p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            (self.text.len() - held).max(self.emitted)
        };
        let text = self.text[self.emitted..end].to_string();
        self.emitted = end;
        StopStep {
            text,
            stop: self.stopped,
        }
    }
}

//! The interface between text generation and a causal language model: a batch of rows, each
//! with its own KV cache, advanced one step at a time.

/// A failure inside the model while generating (a graph error, a bad shape, a bad token id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

/// A causal language model that generation drives. Implementations keep the KV cache.
///
/// Rows are independent sequences: `prefill` starts a batch (prompts may differ in length; the
/// model pads and masks as it needs), `decode` appends one token to every row, and `reorder`
/// rearranges rows (beam search keeps, drops and duplicates beams).
pub trait LanguageModel {
    /// Size of the vocabulary (the length of each logits row).
    fn vocab_size(&self) -> usize;

    /// Starts a new batch with these prompts (token ids, each non-empty) and returns, for each
    /// row, the logits for the token after its prompt.
    fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError>;

    /// Appends `tokens[r]` to row `r` and returns each row's logits for the next token.
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError>;

    /// [`decode`](Self::decode) into `logits` (one row per batch row), reusing its vectors: a
    /// model may then decode without allocating them each step (kiln's own models do), when
    /// the caller hands the same vectors back.
    fn decode_into(
        &mut self,
        tokens: &[u32],
        logits: &mut Vec<Vec<f32>>,
    ) -> Result<(), ModelError> {
        *logits = self.decode(tokens)?;
        Ok(())
    }

    /// Rebuilds the batch so that new row `i` continues old row `src[i]` (rows may repeat or
    /// disappear).
    fn reorder(&mut self, src: &[usize]) -> Result<(), ModelError>;
}

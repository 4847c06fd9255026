//! `kiln forward --model DIR --tokens 1,2,3 [--out FILE.safetensors]`: one forward pass on the
//! given ids (batch 1); causal LMs give `logits [1, seq, vocab]`, encoders
//! `last_hidden_state [1, seq, hidden]`.

use super::opts::ModelOpts;
use super::run::{describe, save_f32};
use super::CliError;
use kiln::load::{self, LoadError};
use kiln::models::Head;
use kiln::runtime::{LanguageModel, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Parses `1,2,3` into ids, refusing empty lists and non-numbers.
pub fn parse_tokens(text: &str) -> Result<Vec<u32>, CliError> {
    let ids = text
        .split(',')
        .map(|t| {
            t.trim().parse::<u32>().map_err(|_| {
                CliError::Input(format!(
                    "--tokens: {t:?} is not a token id (expected e.g. 1,2,3)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(CliError::Input("--tokens: no token ids given".into()));
    }
    Ok(ids)
}

/// Refuses ids outside `0..vocab` and sequences longer than the model's positions.
pub fn check_ids(ids: &[u32], vocab: usize, max_positions: Option<usize>) -> Result<(), CliError> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(CliError::Input(format!(
            "token id {bad} is outside the vocabulary (ids must be below {vocab})"
        )));
    }
    if let Some(max) = max_positions.filter(|&m| ids.len() > m) {
        return Err(CliError::Input(format!(
            "the input has {} tokens but the model supports at most {max} positions",
            ids.len()
        )));
    }
    Ok(())
}

/// Maps loading errors: user-fixable ones exit 2, optimizer failures (kiln bugs) exit 1.
pub fn load_error(e: LoadError) -> CliError {
    match e {
        LoadError::Optimize(_) => CliError::Internal(e.to_string()),
        _ => CliError::Input(e.to_string()),
    }
}

/// Runs the command.
pub fn forward(opts: &ModelOpts, tokens: &str, out: Option<&Path>) -> Result<(), CliError> {
    opts.check_target()?;
    let ids = parse_tokens(tokens)?;
    let dir =
        kiln::models::ModelDir::open(&opts.model).map_err(|e| CliError::Input(e.to_string()))?;
    let (name, tensor): (&str, Tensor) = if dir.config.head == Head::CausalLm {
        let model = load::causal_lm_with(&opts.model, &opts.load_options()).map_err(load_error)?;
        ModelOpts::warn(&model.reports);
        check_ids(&ids, model.lm.vocab_size(), model.max_positions)?;
        let logits = model
            .lm
            .forward(&ids)
            .map_err(|e| CliError::Internal(e.to_string()))?;
        ("logits", logits)
    } else {
        let enc = load::encoder_with(&opts.model, &opts.load_options()).map_err(load_error)?;
        ModelOpts::warn(&enc.reports);
        check_ids(&ids, enc.vocab_size, Some(enc.max_positions))?;
        let out = enc
            .run(std::slice::from_ref(&ids))
            .map_err(|e| CliError::Internal(e.to_string()))?;
        ("last_hidden_state", out.last_hidden_state)
    };
    println!("{name}: {}", describe(&tensor));
    if let Some(path) = out {
        save_f32(path, &HashMap::from([(name.to_string(), tensor)]))?;
    }
    Ok(())
}

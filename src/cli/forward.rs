//! `kiln forward --model DIR --tokens 1,2,3 [--out FILE.safetensors]`: one forward pass on the
//! given ids (batch 1); causal LMs give `logits [1, seq, vocab]`, encoders
//! `last_hidden_state [1, seq, hidden]`.

use super::opts::ModelOpts;
use super::run::{describe, save_f32};
use super::CliError;
use kiln::load::{self, LoadError};
use kiln::runtime::deploy::{DeployError, Model};
use kiln::runtime::Tensor;
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

/// Maps a model's errors: the caller's input and files exit 2, failures inside kiln exit 1.
pub fn deploy_error(e: DeployError) -> CliError {
    if e.is_input() {
        CliError::Input(e.to_string())
    } else {
        CliError::Internal(e.to_string())
    }
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
    let opened = load::model_with(&opts.model, &opts.load_options()).map_err(load_error)?;
    ModelOpts::warn(&opened.reports);
    let (name, tensor): (&str, Tensor) = match opened.model {
        Model::Causal(lm) => ("logits", lm.forward(&ids).map_err(deploy_error)?),
        Model::Encoder(enc) => {
            let out = enc.run(std::slice::from_ref(&ids)).map_err(deploy_error)?;
            ("last_hidden_state", out.last_hidden_state)
        }
    };
    println!("{name}: {}", describe(&tensor));
    if let Some(path) = out {
        save_f32(path, &HashMap::from([(name.to_string(), tensor)]))?;
    }
    Ok(())
}

//! Deploying an artifact with the runtime alone (`kiln_runtime`: no compiler, no model
//! families): open the file, then generate text with a causal LM or embed texts with an
//! encoder.
//!
//! ```sh
//! cargo run --release -- compile --model tests/fixtures/hf/llama -o /tmp/llama.kiln
//! cargo run --release --example deploy -- /tmp/llama.kiln "The little robot"
//! ```

use kiln_runtime::deploy::{DeployError, Model};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Opens the artifact at `path` and continues (causal LM) or embeds (encoder) each text,
/// writing the results to `out`.
pub fn run(path: &Path, texts: &[String], out: &mut dyn Write) -> Result<(), DeployError> {
    match Model::open(path)? {
        Model::Causal(mut lm) => {
            let mut cfg = lm.generation_config()?;
            cfg.do_sample = false;
            cfg.max_new_tokens = Some(20);
            for prompt in texts {
                let g = lm.generate(prompt, &cfg, 0)?;
                let _ = writeln!(out, "{prompt}{}\ngenerated ids: {:?}", g.text, g.ids);
            }
        }
        Model::Encoder(enc) => {
            for (text, e) in texts.iter().zip(enc.embed(texts)?) {
                let head: Vec<String> = e.iter().take(4).map(|x| format!("{x:.4}")).collect();
                let _ = writeln!(
                    out,
                    "{text:?}: [{}, ...] ({} dims)",
                    head.join(", "),
                    e.len()
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((path, texts)) = args.split_first().filter(|(_, t)| !t.is_empty()) else {
        eprintln!("usage: deploy MODEL.kiln TEXT...");
        return ExitCode::from(2);
    };
    match run(Path::new(path), texts, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deploy: {e}");
            ExitCode::from(if e.is_input() { 2 } else { 1 })
        }
    }
}

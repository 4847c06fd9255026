//! A Hugging Face model directory as `save_pretrained` writes it: `config.json`, weights in
//! `model.safetensors` or shards listed by `model.safetensors.index.json`, `tokenizer.json`
//! (+ `tokenizer_config.json`), `generation_config.json`. Tracing needs only `config.json`;
//! the other files are located here and read by whoever needs them.

use crate::{config, ModelConfig, ModelError};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A model directory with its config parsed and its files located.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// The parsed `config.json`.
    pub config: ModelConfig,
}

impl ModelDir {
    /// Opens `dir`: it must exist and hold a `config.json` kiln can parse.
    pub fn open(dir: &Path) -> Result<ModelDir, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                message: "not a directory (expected a Hugging Face model directory)".into(),
            });
        }
        let cfg = dir.join("config.json");
        if !cfg.is_file() {
            return Err(missing(
                dir,
                "config.json",
                "every Hugging Face model directory has one",
            ));
        }
        Ok(ModelDir {
            path: dir.to_path_buf(),
            config: config::load(&cfg)?,
        })
    }

    /// The safetensors files holding the weights: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        let single = self.path.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = self.path.join("model.safetensors.index.json");
        if !index.is_file() {
            let hint = if self.path.join("pytorch_model.bin").is_file() {
                "only safetensors weights are supported; this directory has pytorch_model.bin \
                 (re-save it with save_pretrained(..., safe_serialization=True))"
            } else {
                "the weights are missing"
            };
            return Err(missing(
                &self.path,
                "model.safetensors or model.safetensors.index.json",
                hint,
            ));
        }
        let text = read(&index)?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: index.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
            return Err(ModelError::Config {
                path: index,
                message: "no \"weight_map\" object mapping tensor names to shard files".into(),
            });
        };
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| is_plain_file_name(f))
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    message: format!(
                        "weight_map entry {name:?} must name a file in the directory, got {file}"
                    ),
                })?;
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.into_iter().map(|f| self.path.join(f)).collect();
        if let Some(absent) = paths.iter().find(|p| !p.is_file()) {
            return Err(ModelError::Io {
                path: absent.clone(),
                message: "shard listed in model.safetensors.index.json does not exist".into(),
            });
        }
        Ok(paths)
    }

    /// `tokenizer.json`, which every command that takes text needs.
    pub fn tokenizer_file(&self) -> Result<PathBuf, ModelError> {
        let p = self.path.join("tokenizer.json");
        if p.is_file() {
            Ok(p)
        } else {
            Err(missing(
                &self.path,
                "tokenizer.json",
                "it is needed to turn text into tokens",
            ))
        }
    }

    /// The text of an optional JSON file of the directory (`generation_config.json`, ...).
    pub fn optional_json(&self, name: &str) -> Result<Option<Value>, ModelError> {
        let p = self.path.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text = read(&p)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Config {
                path: p,
                message: format!("not valid JSON: {e}"),
            })
    }
}

fn missing(dir: &Path, file: &str, hint: &str) -> ModelError {
    ModelError::MissingFile {
        dir: dir.to_path_buf(),
        file: file.into(),
        hint: hint.into(),
    }
}

fn read(p: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(p).map_err(|e| ModelError::Io {
        path: p.to_path_buf(),
        message: e.to_string(),
    })
}

/// A shard name must stay inside the model directory.
fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && !f.contains(['/', '\\']) && f != "." && f != ".."
}

//! Reading a sentence-transformers directory's embedding pipeline: the `Pooling` module (and an
//! optional `Normalize`) applied to an encoder's `last_hidden_state`. The pooling itself
//! ([`pool`], [`Pooling`], [`PoolingMode`]) lives in `kiln_runtime::pooling` and is re-exported.
//!
//! [`load`] reads a sentence-transformers directory: `modules.json` lists the pipeline
//! (`Transformer`, then `Pooling`, then optionally `Normalize`), and the pooling module's
//! `config.json` (usually `1_Pooling/config.json`) its mode, as `pooling_mode` (sentence-
//! transformers 5.x and later) or the legacy `pooling_mode_*_tokens` flags. A directory without
//! `modules.json` is a plain transformers model, which sentence-transformers wraps with mean
//! pooling and no normalization. Modules kiln does not implement (`Dense`, `LayerNorm`, custom
//! code...) are refused rather than skipped, since skipping them would change the embedding.

use crate::ModelError;
pub use kiln_runtime::pooling::{pool, Pooling, PoolingMode};
use serde_json::Value;
use std::path::Path;

fn config_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn unsupported(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| config_err(path, format!("not valid JSON: {e}")))
}

/// A module's `path` from `modules.json`, refused if it could leave the model directory.
fn module_dir(
    dir: &Path,
    modules_json: &Path,
    rel: &str,
) -> Result<std::path::PathBuf, ModelError> {
    let p = Path::new(rel);
    let safe = p.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if !safe {
        return Err(config_err(
            modules_json,
            format!("module path {rel:?} must be a relative path inside the model directory"),
        ));
    }
    Ok(dir.join(p))
}

/// Reads the pooling pipeline of the sentence-transformers model in `dir` (see the
/// [module docs](self)).
pub fn load(dir: &Path) -> Result<Pooling, ModelError> {
    let modules_json = dir.join("modules.json");
    if !modules_json.is_file() {
        return Ok(Pooling::default());
    }
    let Value::Array(modules) = read_json(&modules_json)? else {
        return Err(config_err(&modules_json, "expected a JSON list of modules"));
    };
    let mut mode = None;
    let mut normalize = false;
    for (i, m) in modules.iter().enumerate() {
        let field = |key: &str| m.get(key).and_then(Value::as_str);
        let Some(ty) = field("type") else {
            return Err(config_err(
                &modules_json,
                format!("module {i} has no string \"type\""),
            ));
        };
        let class = ty.rsplit('.').next().unwrap_or(ty);
        let from_st = ty.starts_with("sentence_transformers.");
        match class {
            "Transformer" if from_st => {}
            "Pooling" if from_st => {
                if mode.is_some() {
                    return Err(unsupported(&modules_json, "more than one Pooling module"));
                }
                let sub = module_dir(dir, &modules_json, field("path").unwrap_or(""))?;
                mode = Some(pooling_mode(&sub.join("config.json"))?);
            }
            "Normalize" if from_st => {
                if mode.is_none() {
                    return Err(unsupported(
                        &modules_json,
                        "a Normalize module before Pooling (normalizing token embeddings) is \
                         not supported",
                    ));
                }
                let sub = module_dir(dir, &modules_json, field("path").unwrap_or(""))?;
                let cfg_path = sub.join("config.json");
                if cfg_path.is_file() {
                    let cfg = read_json(&cfg_path)?;
                    let input = cfg.get("module_input_name").and_then(Value::as_str);
                    if !matches!(input, None | Some("sentence_embedding")) {
                        return Err(unsupported(
                            &cfg_path,
                            format!(
                                "Normalize of {:?} is not supported (only sentence_embedding)",
                                input.unwrap_or_default()
                            ),
                        ));
                    }
                }
                normalize = true;
            }
            _ => {
                return Err(unsupported(
                    &modules_json,
                    format!(
                        "module {i} ({ty}) is not supported: kiln implements sentence-transformers \
                         pipelines of Transformer, Pooling and Normalize only"
                    ),
                ))
            }
        }
    }
    let Some(mode) = mode else {
        return Err(unsupported(
            &modules_json,
            "the pipeline has no Pooling module, so it produces no sentence embedding",
        ));
    };
    Ok(Pooling { mode, normalize })
}

/// The mode in a Pooling module's `config.json` (absent file or keys: mean, as the module's
/// default).
fn pooling_mode(path: &Path) -> Result<PoolingMode, ModelError> {
    if !path.is_file() {
        return Ok(PoolingMode::Mean);
    }
    let cfg = read_json(path)?;
    let Value::Object(cfg) = cfg else {
        return Err(config_err(path, "expected a JSON object"));
    };
    let unknown = |name: &str| {
        let valid: Vec<&str> = PoolingMode::ALL.iter().map(|(n, _)| *n).collect();
        unsupported(
            path,
            format!(
                "unknown pooling mode {name:?} (sentence-transformers' modes are {})",
                valid.join(", ")
            ),
        )
    };
    let modes: Vec<PoolingMode> = match cfg.get("pooling_mode") {
        Some(Value::String(name)) => {
            vec![PoolingMode::from_name(name).ok_or_else(|| unknown(name))?]
        }
        Some(Value::Array(names)) => names
            .iter()
            .map(|v| {
                let name = v.as_str().ok_or_else(|| {
                    config_err(path, format!("pooling_mode entry {v} is not a string"))
                })?;
                PoolingMode::from_name(name).ok_or_else(|| unknown(name))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(config_err(
                path,
                format!("pooling_mode must be a string or a list of strings, not {other}"),
            ))
        }
        None => {
            let mut on = Vec::new();
            for (key, mode) in PoolingMode::LEGACY_KEYS {
                match cfg.get(key) {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                    Some(Value::Bool(true)) => on.push(mode),
                    Some(other) => {
                        return Err(config_err(
                            path,
                            format!("{key} must be a boolean, not {other}"),
                        ))
                    }
                }
            }
            if on.is_empty() {
                on.push(PoolingMode::Mean);
            }
            on
        }
    };
    match modes.as_slice() {
        [one] => Ok(*one),
        [] => Err(config_err(path, "pooling_mode is an empty list")),
        many => {
            let names: Vec<&str> = many.iter().map(|m| m.name()).collect();
            Err(unsupported(
                path,
                format!(
                    "combining pooling modes ({}) into one concatenated embedding is not supported",
                    names.join(" + ")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("kiln-pooling-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MODULES: &str = r#"[
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn reads_minilm_style_directories() {
        let d = TempDir::new("minilm");
        d.write("modules.json", MODULES);
        d.write(
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false}"#,
        );
        assert_eq!(
            load(&d.0).unwrap(),
            Pooling {
                mode: PoolingMode::Mean,
                normalize: true
            }
        );
        // sentence-transformers 5+ layout and module paths.
        d.write(
            "modules.json",
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"}]"#,
        );
        d.write(
            "1_Pooling/config.json",
            r#"{"embedding_dimension": 384, "pooling_mode": "cls"}"#,
        );
        assert_eq!(
            load(&d.0).unwrap(),
            Pooling {
                mode: PoolingMode::Cls,
                normalize: false
            }
        );
    }

    #[test]
    fn defaults_and_errors() {
        let d = TempDir::new("errors");
        assert_eq!(load(&d.0).unwrap(), Pooling::default());
        d.write("modules.json", MODULES);
        d.write("1_Pooling/config.json", r#"{"pooling_mode": "median"}"#);
        let e = load(&d.0).unwrap_err().to_string();
        assert!(e.contains("unknown pooling mode \"median\""), "{e}");
        d.write(
            "1_Pooling/config.json",
            r#"{"pooling_mode": ["mean", "max"]}"#,
        );
        let e = load(&d.0).unwrap_err().to_string();
        assert!(e.contains("combining pooling modes (mean + max)"), "{e}");
        d.write(
            "1_Pooling/config.json",
            r#"{"pooling_mode_max_tokens": true}"#,
        );
        assert_eq!(load(&d.0).unwrap().mode, PoolingMode::Max);
        d.write(
            "modules.json",
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#,
        );
        let e = load(&d.0).unwrap_err().to_string();
        assert!(
            e.contains("sentence_transformers.models.Dense) is not supported"),
            "{e}"
        );
        d.write(
            "modules.json",
            r#"[{"idx": 1, "path": "../x", "type": "sentence_transformers.models.Pooling"}]"#,
        );
        let e = load(&d.0).unwrap_err().to_string();
        assert!(e.contains("inside the model directory"), "{e}");
        d.write("modules.json", "{}");
        assert!(load(&d.0).unwrap_err().to_string().contains("JSON list"));
    }
}

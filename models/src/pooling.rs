//! Sentence embeddings as sentence-transformers computes them: the `Pooling` module (and an
//! optional `Normalize`) applied to an encoder's `last_hidden_state`.
//!
//! [`load`] reads a sentence-transformers directory: `modules.json` lists the pipeline
//! (`Transformer`, then `Pooling`, then optionally `Normalize`), and the pooling module's
//! `config.json` (usually `1_Pooling/config.json`) its mode, as `pooling_mode` (sentence-
//! transformers 5.x and later) or the legacy `pooling_mode_*_tokens` flags. A directory without
//! `modules.json` is a plain transformers model, which sentence-transformers wraps with mean
//! pooling and no normalization. Modules kiln does not implement (`Dense`, `LayerNorm`, custom
//! code...) are refused rather than skipped, since skipping them would change the embedding.
//!
//! [`pool`] follows `Pooling._forward_padded` and `Normalize.forward` on f32 tensors: sums are
//! accumulated exactly (in f64) and rounded to f32 once, then combined with f32 operations in
//! the same order as sentence-transformers (counts clamped to at least `1e-9`; L2 norms to at
//! least `1e-12`).

use crate::ModelError;
use serde_json::Value;
use std::path::Path;

/// How token embeddings become one vector (sentence-transformers' `pooling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// `cls`: the first non-padding token.
    Cls,
    /// `max`: elementwise maximum over the non-padding tokens.
    Max,
    /// `mean`: mean over the non-padding tokens.
    Mean,
    /// `mean_sqrt_len_tokens`: sum over the non-padding tokens divided by `sqrt(count)`.
    MeanSqrtLen,
    /// `weightedmean`: mean weighted by position (1, 2, ... from the first non-padding token).
    WeightedMean,
    /// `lasttoken`: the last non-padding token.
    LastToken,
}

impl PoolingMode {
    /// The modes with their sentence-transformers names.
    pub const ALL: [(&'static str, PoolingMode); 6] = [
        ("cls", PoolingMode::Cls),
        ("max", PoolingMode::Max),
        ("mean", PoolingMode::Mean),
        ("mean_sqrt_len_tokens", PoolingMode::MeanSqrtLen),
        ("weightedmean", PoolingMode::WeightedMean),
        ("lasttoken", PoolingMode::LastToken),
    ];

    /// The legacy boolean keys of `config.json`, in sentence-transformers' order.
    const LEGACY_KEYS: [(&'static str, PoolingMode); 6] = [
        ("pooling_mode_cls_token", PoolingMode::Cls),
        ("pooling_mode_max_tokens", PoolingMode::Max),
        ("pooling_mode_mean_tokens", PoolingMode::Mean),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            PoolingMode::MeanSqrtLen,
        ),
        (
            "pooling_mode_weightedmean_tokens",
            PoolingMode::WeightedMean,
        ),
        ("pooling_mode_lasttoken", PoolingMode::LastToken),
    ];

    /// The mode called `name` in sentence-transformers.
    pub fn from_name(name: &str) -> Option<PoolingMode> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|&(_, m)| m)
    }

    /// Its sentence-transformers name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("mean", |&(n, _)| n)
    }
}

/// A sentence-transformers pooling pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// The pooling mode.
    pub mode: PoolingMode,
    /// L2-normalize the pooled vector (a `Normalize` module follows `Pooling`).
    pub normalize: bool,
}

impl Default for Pooling {
    /// Mean pooling without normalization: what sentence-transformers uses for a plain
    /// transformers model.
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

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

/// Pools `hidden` (`[batch, seq, dim]`, row-major) under the 0/1 `mask` (`[batch, seq]`) into
/// one vector per row, as sentence-transformers' `Pooling` (and `Normalize` if
/// `pooling.normalize`) does.
///
/// # Panics
/// If `hidden.len() != batch * seq * dim` or `mask.len() != batch * seq` (a caller's bug: both
/// come from the same batch).
pub fn pool(
    hidden: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    dim: usize,
    pooling: &Pooling,
) -> Vec<Vec<f32>> {
    assert_eq!(
        hidden.len(),
        batch * seq * dim,
        "pool: hidden is not [batch, seq, dim]"
    );
    assert_eq!(mask.len(), batch * seq, "pool: mask is not [batch, seq]");
    (0..batch)
        .map(|r| {
            let h = &hidden[r * seq * dim..(r + 1) * seq * dim];
            let m = &mask[r * seq..(r + 1) * seq];
            let mut v = pool_row(h, m, seq, dim, pooling.mode);
            if pooling.normalize {
                l2_normalize(&mut v);
            }
            v
        })
        .collect()
}

/// Index of the first maximum of `m` (`torch.argmax`; 0 for an empty row).
fn argmax_first(m: &[i64]) -> usize {
    let mut best = 0;
    for (j, &x) in m.iter().enumerate() {
        if x > m[best] {
            best = j;
        }
    }
    best
}

/// `sum_j w_j * h[j, :]` with the products rounded to f32 (as the f32 tensor product) and the
/// sum accumulated exactly, then rounded to f32.
fn weighted_sum(h: &[f32], weights: &[f32], dim: usize) -> Vec<f32> {
    let mut acc = vec![0f64; dim];
    for (j, &w) in weights.iter().enumerate() {
        for (a, &x) in acc.iter_mut().zip(&h[j * dim..(j + 1) * dim]) {
            *a += f64::from(x * w);
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

fn pool_row(h: &[f32], m: &[i64], seq: usize, dim: usize, mode: PoolingMode) -> Vec<f32> {
    let row = |j: usize| h[j * dim..(j + 1) * dim].to_vec();
    match mode {
        PoolingMode::Cls => {
            if seq == 0 {
                return vec![0.0; dim];
            }
            row(argmax_first(m))
        }
        PoolingMode::Max => {
            let mut out = vec![f32::NEG_INFINITY; dim];
            for j in (0..seq).filter(|&j| m[j] != 0) {
                for (o, &x) in out.iter_mut().zip(&h[j * dim..(j + 1) * dim]) {
                    // torch.max propagates NaN.
                    if x.is_nan() || x > *o {
                        *o = x;
                    }
                }
            }
            out
        }
        PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
            let w: Vec<f32> = m.iter().map(|&x| x as f32).collect();
            let sum = weighted_sum(h, &w, dim);
            let count = (w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32).max(1e-9);
            let denom = if mode == PoolingMode::Mean {
                count
            } else {
                count.sqrt()
            };
            sum.into_iter().map(|s| s / denom).collect()
        }
        PoolingMode::WeightedMean => {
            let pad = argmax_first(m) as f32;
            let w: Vec<f32> = m
                .iter()
                .enumerate()
                .map(|(j, &x)| x as f32 * ((j + 1) as f32 - pad))
                .collect();
            let sum = weighted_sum(h, &w, dim);
            let total = (w.iter().map(|&x| f64::from(x)).sum::<f64>() as f32).max(1e-9);
            sum.into_iter().map(|s| s / total).collect()
        }
        PoolingMode::LastToken => {
            if seq == 0 {
                return vec![0.0; dim];
            }
            // mask.flip(1).max(1): the last maximum; an all-zero row picks index 0 (zeros after
            // masking).
            let max = m.iter().copied().max().unwrap_or(0);
            let j = if max == 0 {
                0
            } else {
                m.iter().rposition(|&x| x == max).unwrap_or(0)
            };
            let w = m[j] as f32;
            row(j).into_iter().map(|x| x * w).collect()
        }
    }
}

/// `x / max(||x||_2, 1e-12)` (`torch.nn.functional.normalize`), the norm accumulated exactly
/// and rounded to f32.
fn l2_normalize(v: &mut [f32]) {
    let norm = (v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt() as f32)
        .max(1e-12);
    for x in v.iter_mut() {
        *x /= norm;
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

    #[test]
    fn pools_like_sentence_transformers() {
        // Two rows of three tokens, dim 2; row 1 is left-padded, row 0 right-padded.
        let h = [
            1.0, 2.0, 3.0, -4.0, 100.0, 100.0, 100.0, 100.0, 5.0, 6.0, 7.0, -8.0,
        ];
        let m = [1, 1, 0, 0, 1, 1];
        let p = |mode, normalize| pool(&h, &m, 2, 3, 2, &Pooling { mode, normalize });
        assert_eq!(
            p(PoolingMode::Mean, false),
            vec![vec![2.0, -1.0], vec![6.0, -1.0]]
        );
        assert_eq!(
            p(PoolingMode::Cls, false),
            vec![vec![1.0, 2.0], vec![5.0, 6.0]]
        );
        assert_eq!(
            p(PoolingMode::LastToken, false),
            vec![vec![3.0, -4.0], vec![7.0, -8.0]]
        );
        assert_eq!(
            p(PoolingMode::Max, false),
            vec![vec![3.0, 2.0], vec![7.0, 6.0]]
        );
        let s = 2f32.sqrt();
        assert_eq!(
            p(PoolingMode::MeanSqrtLen, false)[0],
            vec![4.0 / s, -2.0 / s]
        );
        // weights 1, 2 from the first real token: (1*[5,6] + 2*[7,-8]) / 3.
        assert_eq!(
            p(PoolingMode::WeightedMean, false)[1],
            vec![19.0 / 3.0, -10.0 / 3.0]
        );
        let n = p(PoolingMode::Mean, true);
        let norm = 5f32.sqrt();
        assert_eq!(n[0], vec![2.0 / norm, -1.0 / norm]);
        // An all-padding row: mean 0 (count clamped), normalize leaves zeros.
        let z = pool(
            &[1.0, 2.0],
            &[0],
            1,
            1,
            2,
            &Pooling {
                mode: PoolingMode::Mean,
                normalize: true,
            },
        );
        assert_eq!(z, vec![vec![0.0, 0.0]]);
    }
}

//! sentence-transformers metadata: `modules.json`, `1_Pooling/config.json`, a `Dense` module's
//! config and weights, `sentence_bert_config.json`. Decides pooling, the projection after it,
//! normalisation and the default token limit.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::engine::Pooling;

/// What the checkpoint's sentence-transformers modules ask for (defaults when there are none).
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    pub normalize: bool,
    /// `sentence_bert_config.json` `max_seq_length`.
    pub max_seq_length: Option<usize>,
    /// Whether `modules.json` was present.
    pub from_modules: bool,
    /// A `Dense` module after the pooling: a linear layer (and activation) on the pooled vector.
    pub dense: Option<Dense>,
}

/// sentence-transformers' `Dense` module: `activation(weight · pooled + bias)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// `[out_features, in_features]`, row-major.
    pub weight: Vec<f32>,
    /// `[out_features]` (zeros when the module has no bias).
    pub bias: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
    /// `true` for `torch.nn.Tanh`, `false` for `torch.nn.Identity`.
    pub tanh: bool,
}

impl Dense {
    /// `activation(weight · x + bias)` of one pooled vector, accumulated in f64.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(self.in_features)
            .zip(&self.bias)
            .map(|(w, b)| {
                let dot: f64 = w.iter().zip(x).map(|(a, v)| *a as f64 * *v as f64).sum();
                let y = dot + *b as f64;
                (if self.tanh { y.tanh() } else { y }) as f32
            })
            .collect()
    }

    /// Read the module in `dir` (its `config.json` and `model.safetensors`).
    fn load(dir: &Path) -> Result<Dense> {
        let cfg: DenseConfig = read_json(&dir.join("config.json"))?;
        let tanh = match cfg.activation_function.as_str() {
            "torch.nn.modules.linear.Identity" => false,
            "torch.nn.modules.activation.Tanh" => true,
            other => bail!(
                "{}: Dense activation '{other}' is not supported (supported: \
                 torch.nn.modules.linear.Identity, torch.nn.modules.activation.Tanh)",
                dir.join("config.json").display()
            ),
        };
        let max = crate::model::config::MAX_HIDDEN;
        let (i, o) = (
            crate::checked::count("Dense in_features", cfg.in_features, 1, max)?,
            crate::checked::count("Dense out_features", cfg.out_features, 1, max)?,
        );
        let w = crate::model::weights::Weights::open(dir)
            .with_context(|| format!("the Dense module in {}", dir.display()))?;
        let bias = if cfg.bias {
            w.f32("linear.bias", &[o])?
        } else {
            vec![0.0; o]
        };
        Ok(Dense {
            weight: w.f32("linear.weight", &[o, i])?,
            bias,
            in_features: i,
            out_features: o,
            tanh,
        })
    }
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default = "tanh_name")]
    activation_function: String,
}

fn yes() -> bool {
    true
}

/// sentence-transformers' default Dense activation.
fn tanh_name() -> String {
    "torch.nn.modules.activation.Tanh".into()
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: Option<usize>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = crate::checked::read_metadata(path)?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

impl SentenceConfig {
    /// Read the sentence-transformers files in `dir`; mean pooling without normalisation when
    /// there are none.
    pub fn load(dir: &Path) -> Result<SentenceConfig> {
        let mut cfg = SentenceConfig {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: None,
            from_modules: false,
            dense: None,
        };
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.exists() {
            cfg.max_seq_length = read_json::<SbertConfig>(&sbert)?.max_seq_length;
        }
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(cfg);
        }
        cfg.from_modules = true;
        let modules: Vec<Module> = read_json(&modules_path)?;
        for m in &modules {
            let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            match kind {
                "Transformer" => {}
                "Pooling" => {
                    let p: PoolingConfig = read_json(&dir.join(&m.path).join("config.json"))?;
                    cfg.pooling = match (p.pooling_mode_cls_token, p.pooling_mode_mean_tokens) {
                        (true, false) => Pooling::Cls,
                        (false, true) => Pooling::Mean,
                        _ => bail!(
                            "{}: unsupported pooling (need exactly one of cls or mean tokens)",
                            dir.join(&m.path).display()
                        ),
                    };
                    if p.pooling_mode_max_tokens
                        || p.pooling_mode_mean_sqrt_len_tokens
                        || p.pooling_mode_weightedmean_tokens
                        || p.pooling_mode_lasttoken
                    {
                        bail!(
                            "{}: pooling modes max/mean_sqrt_len/weightedmean/lasttoken are not \
                             supported",
                            dir.join(&m.path).display()
                        );
                    }
                }
                "Dense" if cfg.dense.is_none() && !cfg.normalize => {
                    cfg.dense = Some(Dense::load(&dir.join(&m.path))?);
                }
                "Dense" => bail!(
                    "{}: one Dense module, after the pooling and before any Normalize, is \
                     supported",
                    modules_path.display()
                ),
                "Normalize" => cfg.normalize = true,
                other => bail!(
                    "{}: sentence-transformers module '{other}' is not supported \
                     (supported: Transformer, Pooling, Dense, Normalize)",
                    modules_path.display()
                ),
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(modules: &str, dense_activation: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.json"), modules).unwrap();
        std::fs::create_dir(dir.path().join("2_Dense")).unwrap();
        std::fs::write(
            dir.path().join("2_Dense/config.json"),
            format!(
                r#"{{"in_features": 4, "out_features": 2, "bias": true,
                     "activation_function": "{dense_activation}"}}"#
            ),
        )
        .unwrap();
        dir
    }

    const DENSE: &str = r#"{"idx": 1, "name": "1", "path": "2_Dense",
                           "type": "sentence_transformers.models.Dense"}"#;
    const NORMALIZE: &str = r#"{"idx": 2, "name": "2", "path": "3_Normalize",
                               "type": "sentence_transformers.models.Normalize"}"#;

    #[test]
    fn unsupported_dense_modules_are_refused_naming_the_file() {
        let relu = folder(&format!("[{DENSE}]"), "torch.nn.modules.activation.ReLU");
        let e = format!("{:#}", SentenceConfig::load(relu.path()).unwrap_err());
        assert!(e.contains("ReLU") && e.contains("2_Dense"), "{e}");

        let after = folder(
            &format!("[{NORMALIZE}, {DENSE}]"),
            "torch.nn.modules.linear.Identity",
        );
        let e = format!("{:#}", SentenceConfig::load(after.path()).unwrap_err());
        assert!(e.contains("before any Normalize"), "{e}");

        let two = folder(
            &format!("[{DENSE}, {DENSE}]"),
            "torch.nn.modules.linear.Identity",
        );
        // The first Dense has no weights here: that error names its folder.
        let e = format!("{:#}", SentenceConfig::load(two.path()).unwrap_err());
        assert!(e.contains("2_Dense"), "{e}");
    }
}

//! sentence-transformers metadata: `modules.json`, `1_Pooling/config.json`,
//! `sentence_bert_config.json`. Decides pooling, normalisation and the default token limit.

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
                "Normalize" => cfg.normalize = true,
                other => bail!(
                    "{}: sentence-transformers module '{other}' is not supported \
                     (supported: Transformer, Pooling, Normalize)",
                    modules_path.display()
                ),
            }
        }
        Ok(cfg)
    }
}

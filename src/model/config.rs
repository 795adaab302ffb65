//! `config.json` of a Hugging Face checkpoint, deserialised by `model_type`.
//!
//! Only the fields the forward pass needs are read; everything else in the file is ignored, so an
//! unmodified checkpoint folder loads as it is.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::engine::Activation;

/// What the checkpoint computes on top of the encoder.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// `BertModel`: the encoder alone; used for embeddings.
    Encoder,
    /// `BertForSequenceClassification`: pooler + classifier with `num_labels` outputs.
    SequenceClassification {
        problem_type: ProblemType,
        labels: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// Raw outputs are the scores.
    Regression,
    /// Softmax over the outputs.
    SingleLabel,
    /// Sigmoid on each output.
    MultiLabel,
}

/// Hyper-parameters of a BERT-family encoder (`model_type: "bert"`).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// The fields every architecture shares.
#[derive(Debug, Clone, Deserialize)]
struct Common {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    problem_type: Option<String>,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    num_labels: Option<usize>,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    /// The architecture name from `architectures[0]` (or inferred).
    pub architecture: String,
    /// Head outputs as declared by the config (`id2label`/`num_labels`); the head's weights decide.
    pub declared_labels: Option<Vec<String>>,
    pub problem_type: Option<ProblemType>,
}

#[derive(Debug, Clone)]
pub enum Arch {
    Bert(BertConfig),
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let common: Common = serde_json::from_value(value.clone())?;
        let architecture = common
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let model_type = common.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "bert" => {
                let c: BertConfig = serde_json::from_value(value)?;
                if let Some(p) = &c.position_embedding_type {
                    if p != "absolute" {
                        bail!("position_embedding_type '{p}' is not supported (only 'absolute')");
                    }
                }
                if c.num_attention_heads == 0
                    || !c.hidden_size.is_multiple_of(c.num_attention_heads)
                {
                    bail!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        c.hidden_size,
                        c.num_attention_heads
                    );
                }
                Activation::from_hf(&c.hidden_act)?;
                Arch::Bert(c)
            }
            "" => bail!("config has no model_type; supported model types: bert"),
            other => {
                bail!(
                "unsupported architecture '{}' (model_type '{other}'); supported model types: bert",
                if architecture.is_empty() { "?" } else { &architecture }
            )
            }
        };
        if !architecture.is_empty()
            && !matches!(
                architecture.as_str(),
                "BertModel" | "BertForSequenceClassification"
            )
        {
            bail!(
                "unsupported architecture '{architecture}'; supported: BertModel, \
                 BertForSequenceClassification"
            );
        }
        let declared_labels = match (&common.id2label, common.num_labels) {
            (Some(map), _) if !map.is_empty() => Some(labels_from_id2label(map)?),
            (_, Some(n)) => Some((0..n).map(|i| format!("LABEL_{i}")).collect()),
            _ => None,
        };
        let problem_type = match common.problem_type.as_deref() {
            None => None,
            Some("regression") => Some(ProblemType::Regression),
            Some("single_label_classification") => Some(ProblemType::SingleLabel),
            Some("multi_label_classification") => Some(ProblemType::MultiLabel),
            Some(other) => bail!("unknown problem_type '{other}'"),
        };
        Ok(ModelConfig {
            arch,
            architecture,
            declared_labels,
            problem_type,
        })
    }
}

/// `id2label` keys are stringified integers; order them numerically and require 0..n.
fn labels_from_id2label(map: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut pairs = Vec::with_capacity(map.len());
    for (k, v) in map {
        let i: usize = k
            .parse()
            .with_context(|| format!("id2label key '{k}' is not an integer"))?;
        pairs.push((i, v.clone()));
    }
    pairs.sort();
    for (expect, (i, _)) in pairs.iter().enumerate() {
        if *i != expect {
            bail!("id2label keys must be 0..{}, found {i}", pairs.len());
        }
    }
    Ok(pairs.into_iter().map(|(_, v)| v).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id2label_is_ordered_numerically() {
        let json = r#"{"model_type":"bert","vocab_size":10,"hidden_size":4,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":8,"max_position_embeddings":8,
            "id2label":{"10":"k","2":"c","0":"a","1":"b","3":"d","4":"e","5":"f","6":"g","7":"h","8":"i","9":"j"}}"#;
        let c = ModelConfig::from_json(json).unwrap();
        assert_eq!(c.declared_labels.unwrap()[10], "k");
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let err =
            ModelConfig::from_json(r#"{"model_type":"gpt2","architectures":["GPT2LMHeadModel"]}"#)
                .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("GPT2LMHeadModel") && msg.contains("gpt2"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_activation_is_rejected() {
        let json = r#"{"model_type":"bert","vocab_size":10,"hidden_size":4,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":8,"max_position_embeddings":8,"hidden_act":"mish"}"#;
        let msg = format!("{:#}", ModelConfig::from_json(json).unwrap_err());
        assert!(msg.contains("mish"), "{msg}");
    }
}

//! `config.json` of a Hugging Face checkpoint, deserialised by `model_type`.
//!
//! Only the fields the forward pass needs are read; everything else in the file is ignored, so an
//! unmodified checkpoint folder loads as it is.

use std::collections::BTreeMap;
use std::path::Path;

pub(crate) use super::sizes::EncoderSizes;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::checked;
use crate::engine::Activation;

const SUPPORTED_TYPES: &str = "bert, roberta, xlm-roberta, deberta-v2, modernbert, new (GTE)";

/// Bounds of [`EncoderSizes::check`]: vocabulary, width, FFN width, layers, positions, token types.
pub(crate) const MAX_VOCAB: usize = 1 << 24;
pub(crate) const MAX_HIDDEN: usize = 1 << 16;
pub(crate) const MAX_INTERMEDIATE: usize = 1 << 18;
pub(crate) const MAX_LAYERS: usize = 1 << 10;
pub(crate) const MAX_POSITIONS: usize = 1 << 20;
pub(crate) const MAX_TYPE_VOCAB: usize = 1 << 16;
const MAX_LABELS: usize = 1 << 16;

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

/// Hyper-parameters of a BERT-family encoder (`model_type: "bert"`, `"roberta"`,
/// `"xlm-roberta"`).
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
    /// RoBERTa's padding index (`pad_token_id`); read only for the RoBERTa family.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// Which member of the family; set from `model_type`, not read from the file.
    #[serde(skip)]
    pub family: BertFamily,
}

/// The BERT-family variants that share one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertFamily {
    /// BERT: positions from 0; the classifier reads the pooler output.
    #[default]
    Bert,
    /// RoBERTa and XLM-RoBERTa: positions start after the padding index (`pad_token_id + 1`);
    /// the classification head is dense -> tanh -> out_proj on the first token's hidden state.
    Roberta,
}

impl BertConfig {
    /// Parse and check a BERT-family config (`model_type` bert, roberta or xlm-roberta).
    fn from_value(value: serde_json::Value, model_type: &str) -> Result<BertConfig> {
        let mut c: BertConfig = serde_json::from_value(value)?;
        if model_type != "bert" {
            c.family = BertFamily::Roberta;
        }
        EncoderSizes {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            positions: c.max_position_embeddings,
        }
        .check(&[("type_vocab_size", c.type_vocab_size, MAX_TYPE_VOCAB)])?;
        if let Some(p) = c.pad_token_id {
            checked::count("pad_token_id", p, 0, MAX_VOCAB)?;
        }
        if c.position_offset() >= c.max_position_embeddings {
            bail!(
                "max_position_embeddings {} leaves no position after the padding offset {} (pad_token_id + 1)",
                c.max_position_embeddings,
                c.position_offset()
            );
        }
        if let Some(p) = &c.position_embedding_type {
            if p != "absolute" {
                bail!("position_embedding_type '{p}' is not supported (only 'absolute')");
            }
        }
        Activation::from_hf(&c.hidden_act)?;
        Ok(c)
    }

    /// Rows of the position table before the first position: RoBERTa numbers positions from
    /// `padding_idx + 1` (fairseq's convention), so its 514 rows hold 512 positions.
    pub fn position_offset(&self) -> usize {
        match self.family {
            BertFamily::Bert => 0,
            BertFamily::Roberta => self.pad_token_id.unwrap_or(1) + 1,
        }
    }

    /// The positions a sequence may use.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }
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

/// Hyper-parameters of ModernBERT (`model_type: "modernbert"`), normalised from either the
/// original Hub style (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) or
/// the transformers 5 style (`layer_types`, `rope_parameters`).
#[derive(Debug, Clone)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_activation: String,
    pub norm_eps: f64,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub classifier_bias: bool,
    pub classifier_pooling: crate::engine::Pooling,
    pub classifier_activation: String,
    /// Sliding-window width of local layers: keys with `|i - j| <= local_attention / 2`.
    pub local_attention: usize,
    /// Per layer: global (full) attention, else sliding-window.
    pub global_layers: Vec<bool>,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
}

#[derive(Deserialize)]
struct ModernBertRaw {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    hidden_activation: String,
    #[serde(default = "default_mb_eps")]
    norm_eps: f64,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default = "default_cls")]
    classifier_pooling: String,
    #[serde(default = "default_act")]
    classifier_activation: String,
    #[serde(default = "default_local_attention")]
    local_attention: usize,
    global_attn_every_n_layers: Option<usize>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    layer_types: Option<Vec<String>>,
    rope_parameters: Option<BTreeMap<String, RopeParameters>>,
}

#[derive(Deserialize)]
struct RopeParameters {
    #[serde(default = "default_rope_type")]
    rope_type: String,
    rope_theta: f64,
}

fn default_mb_eps() -> f64 {
    1e-5
}
fn default_cls() -> String {
    "cls".into()
}
fn default_local_attention() -> usize {
    128
}
fn default_rope_type() -> String {
    "default".into()
}

impl ModernBertConfig {
    // Long: every ModernBERT config field checked in turn, one line or two each.
    fn from_value(value: serde_json::Value) -> Result<ModernBertConfig> {
        let r: ModernBertRaw = serde_json::from_value(value)?;
        EncoderSizes {
            vocab: r.vocab_size,
            hidden: r.hidden_size,
            intermediate: r.intermediate_size,
            layers: r.num_hidden_layers,
            heads: r.num_attention_heads,
            positions: r.max_position_embeddings,
        }
        .check(&[("local_attention", r.local_attention, MAX_POSITIONS)])?;
        let global_layers = match (&r.layer_types, r.global_attn_every_n_layers) {
            (Some(types), _) => {
                if types.len() != r.num_hidden_layers {
                    bail!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        r.num_hidden_layers
                    );
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(true),
                        "sliding_attention" => Ok(false),
                        other => bail!("unknown layer type '{other}'"),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            (None, n) => {
                let n = n.unwrap_or(3);
                if n == 0 {
                    bail!("global_attn_every_n_layers must be at least 1");
                }
                (0..r.num_hidden_layers).map(|i| i % n == 0).collect()
            }
        };
        let (mut global_theta, mut local_theta) = (
            r.global_rope_theta.unwrap_or(160_000.0),
            r.local_rope_theta.unwrap_or(10_000.0),
        );
        if let Some(params) = &r.rope_parameters {
            for (kind, p) in params {
                if p.rope_type != "default" {
                    bail!(
                        "rope_type '{}' is not supported (only 'default')",
                        p.rope_type
                    );
                }
                match kind.as_str() {
                    "full_attention" => global_theta = p.rope_theta,
                    "sliding_attention" => local_theta = p.rope_theta,
                    other => bail!("unknown rope_parameters entry '{other}'"),
                }
            }
        }
        let classifier_pooling = match r.classifier_pooling.as_str() {
            "cls" => crate::engine::Pooling::Cls,
            "mean" => crate::engine::Pooling::Mean,
            other => bail!("classifier_pooling '{other}' is not supported (cls, mean)"),
        };
        // Rotary embeddings rotate pairs of dimensions.
        if !(r.hidden_size / r.num_attention_heads).is_multiple_of(2) {
            bail!(
                "hidden_size {} must split into {} heads of even size",
                r.hidden_size,
                r.num_attention_heads
            );
        }
        if r.local_attention < 2 {
            bail!("local_attention must be at least 2");
        }
        Activation::from_hf(&r.hidden_activation)?;
        Activation::from_hf(&r.classifier_activation)?;
        Ok(ModernBertConfig {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            max_position_embeddings: r.max_position_embeddings,
            hidden_activation: r.hidden_activation,
            norm_eps: r.norm_eps,
            norm_bias: r.norm_bias,
            attention_bias: r.attention_bias,
            mlp_bias: r.mlp_bias,
            classifier_bias: r.classifier_bias,
            classifier_pooling,
            classifier_activation: r.classifier_activation,
            local_attention: r.local_attention,
            global_layers,
            global_rope_theta: global_theta,
            local_rope_theta: local_theta,
        })
    }
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

/// How the classification head sits on the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadLayout {
    /// As the architecture defines it (BERT's pooler + classifier, RoBERTa's dense-tanh-out_proj,
    /// ModernBERT's head).
    #[default]
    Native,
    /// A `PyTorchModelHubMixin` classifier (NeMo Curator's): `fc` on the first token's final
    /// hidden state, then softmax.
    MixinFc,
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
    pub head: HeadLayout,
}

#[derive(Debug, Clone)]
pub enum Arch {
    Bert(BertConfig),
    Deberta(super::deberta::DebertaConfig),
    ModernBert(ModernBertConfig),
    Gte(super::gte::GteConfig),
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = checked::read_metadata(path)?;
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
            "bert" | "roberta" | "xlm-roberta" => Arch::Bert(BertConfig::from_value(value, &model_type)?),
            "modernbert" => Arch::ModernBert(ModernBertConfig::from_value(value)?),
            "deberta-v2" => Arch::Deberta(super::deberta::DebertaConfig::from_value(value)?),
            "new" => Arch::Gte(super::gte::GteConfig::from_value(value)?),
            "deberta" => bail!(
                "DeBERTa v1 (model_type 'deberta', architecture '{}') is not supported; supported model types: {SUPPORTED_TYPES}",
                if architecture.is_empty() { "?" } else { &architecture }
            ),
            "" => bail!("config has no model_type; supported model types: {SUPPORTED_TYPES}"),
            other => bail!(
                "unsupported architecture '{}' (model_type '{other}'); supported model types: {SUPPORTED_TYPES}",
                if architecture.is_empty() { "?" } else { &architecture }
            ),
        };
        let supported: &[&str] = match arch {
            Arch::Bert(BertConfig {
                family: BertFamily::Bert,
                ..
            }) => &["BertModel", "BertForSequenceClassification"],
            Arch::Bert(_) => &[
                "RobertaModel",
                "RobertaForSequenceClassification",
                "XLMRobertaModel",
                "XLMRobertaForSequenceClassification",
            ],
            Arch::ModernBert(_) => &["ModernBertModel", "ModernBertForSequenceClassification"],
            Arch::Deberta(_) => &["DebertaV2Model", "DebertaV2ForSequenceClassification"],
            Arch::Gte(_) => &["NewModel", "NewForSequenceClassification"],
        };
        if !architecture.is_empty() && !supported.contains(&architecture.as_str()) {
            bail!(
                "unsupported architecture '{architecture}'; supported: {}",
                supported.join(", ")
            );
        }
        if let Some(n) = common.num_labels {
            checked::count("num_labels", n, 0, MAX_LABELS)?;
        }
        if let Some(map) = &common.id2label {
            checked::count("the number of id2label entries", map.len(), 0, MAX_LABELS)?;
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
            head: HeadLayout::Native,
        })
    }
}

/// `id2label` keys are stringified integers; order them numerically and require 0..n.
pub(crate) fn labels_from_id2label(map: &BTreeMap<String, String>) -> Result<Vec<String>> {
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
    fn roberta_positions_start_after_the_padding_index() {
        let base = r#""vocab_size":10,"hidden_size":4,"num_hidden_layers":1,"num_attention_heads":1,"intermediate_size":8"#;
        let cfg = |extra: &str| ModelConfig::from_json(&format!("{{{base},{extra}}}"));
        let c = cfg(r#""model_type":"xlm-roberta","max_position_embeddings":514,"pad_token_id":1"#);
        let Arch::Bert(c) = c.unwrap().arch else {
            panic!("not BERT-family")
        };
        assert_eq!(
            (c.family, c.position_offset(), c.max_positions()),
            (BertFamily::Roberta, 2, 512)
        );
        let bert = cfg(r#""model_type":"bert","max_position_embeddings":512,"pad_token_id":1"#);
        let Arch::Bert(b) = bert.unwrap().arch else {
            panic!("not BERT-family")
        };
        assert_eq!((b.position_offset(), b.max_positions()), (0, 512));
        let err = |extra: &str| format!("{:#}", cfg(extra).unwrap_err());
        let e = err(r#""model_type":"roberta","max_position_embeddings":2,"pad_token_id":1"#);
        assert!(e.contains("leaves no position"), "{e}");
        let e = err(
            r#""model_type":"roberta","max_position_embeddings":8,"pad_token_id":18446744073709551615"#,
        );
        assert!(e.contains("pad_token_id"), "{e}");
        let e =
            err(r#""model_type":"deberta","architectures":["DebertaForSequenceClassification"]"#);
        assert!(
            e.contains("DeBERTa v1") && e.contains("DebertaForSequenceClassification"),
            "{e}"
        );
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

    const MB_BASE: &str = r#""model_type":"modernbert","vocab_size":10,"hidden_size":8,
        "intermediate_size":12,"num_hidden_layers":4,"num_attention_heads":2,
        "max_position_embeddings":64,"local_attention":8"#;

    fn modernbert(extra: &str) -> Result<ModernBertConfig> {
        match ModelConfig::from_json(&format!("{{{MB_BASE}{extra}}}"))?.arch {
            Arch::ModernBert(c) => Ok(c),
            _ => unreachable!(),
        }
    }

    #[test]
    fn modernbert_config_styles_agree() {
        let old = modernbert(
            r#","global_attn_every_n_layers":2,"global_rope_theta":80000.0,"local_rope_theta":20000.0"#,
        )
        .unwrap();
        let new = modernbert(
            r#","layer_types":["full_attention","sliding_attention","full_attention","sliding_attention"],
            "rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":80000.0},
                               "sliding_attention":{"rope_type":"default","rope_theta":20000.0}}"#,
        )
        .unwrap();
        for c in [&old, &new] {
            assert_eq!(c.global_layers, vec![true, false, true, false]);
            assert_eq!(
                (c.global_rope_theta, c.local_rope_theta),
                (80000.0, 20000.0)
            );
        }
        // Defaults of the original ModernBERT: every 3rd layer global, thetas 160k / 10k.
        let d = modernbert("").unwrap();
        assert_eq!(d.global_layers, vec![true, false, false, true]);
        assert_eq!(
            (d.global_rope_theta, d.local_rope_theta),
            (160000.0, 10000.0)
        );
    }

    #[test]
    fn modernbert_config_errors_are_named() {
        let err = |extra: &str| format!("{:#}", modernbert(extra).unwrap_err());
        assert!(err(
            r#","rope_parameters":{"full_attention":{"rope_type":"yarn","rope_theta":1.0}}"#
        )
        .contains("yarn"));
        assert!(err(r#","layer_types":["full_attention"]"#).contains("layer_types"));
        assert!(err(r#","layer_types":["a","b","c","d"]"#).contains("unknown layer type 'a'"));
        assert!(err(r#","classifier_pooling":"max""#).contains("classifier_pooling"));
        assert!(
            err(r#","architectures":["ModernBertForMaskedLM"]"#).contains("ModernBertForMaskedLM")
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

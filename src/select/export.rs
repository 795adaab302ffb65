//! Students written as folders that a widely used library loads unmodified, and mira too.
//!
//! The format follows the feature the student's head reads (`super::features`):
//! - the pooler: a `BertForSequenceClassification` folder (transformers'
//!   `AutoModelForSequenceClassification`): the encoder's tensors under `bert.`, the fitted
//!   `classifier`, `problem_type: regression` and the anchors in `id2label`;
//! - the [CLS] state or the mean: a sentence-transformers folder: the encoder as `BertModel`
//!   (`config.json`, `model.safetensors`), `modules.json` with `Transformer`, `Pooling`
//!   (`1_Pooling`, CLS or mean) and `Dense` (`2_Dense`: the fitted weights as `linear.weight`
//!   and `linear.bias`, identity activation). `SentenceTransformer(dir).encode(texts)` gives
//!   the anchor scores; `config.json` keeps `problem_type` and the anchors in `id2label`, which is
//!   how mira knows the Dense module is a head (`Scorer`).
//!
//! Both carry the encoder's tokenizer files, one agreed input length, and `mira_student.json`
//! (group, feature, fit sizes and penalties).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::distill::StudentInfo;
use super::features::Feature;
use crate::model::weights::Weights;
use crate::Scorer;

/// A tensor to write: name, type, shape and little-endian bytes.
type Tensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Write the student of `group` into `dir` in the format its `info.feature` calls for: `w` is
/// `[anchors, hidden]` (row-major) and `b` `[anchors]`.
pub fn write_student(
    encoder: &Scorer,
    dir: &Path,
    group: &str,
    anchors: &[String],
    w: &[f64],
    b: &[f64],
    info: &StudentInfo,
) -> Result<()> {
    let src = encoder.model_dir();
    let mut cfg = student_config(src, anchors)?;
    let h = encoder.hidden_size();
    let head = [
        f32_tensor("weight", vec![anchors.len(), h], w),
        f32_tensor("bias", vec![anchors.len()], b),
    ];
    std::fs::create_dir_all(dir)?;
    let encoder_prefix = match info.feature {
        Feature::Pooler => {
            cfg["architectures"] = json!(["BertForSequenceClassification"]);
            remove_sentence_modules(dir)?;
            "bert."
        }
        Feature::Cls | Feature::Mean => {
            cfg["architectures"] = json!(["BertModel"]);
            write_sentence_modules(dir, info.feature, h, anchors.len(), &head)?;
            ""
        }
    };
    let mut tensors = encoder_tensors(src, encoder_prefix)?;
    if info.feature == Feature::Pooler {
        if !tensors.iter().any(|t| t.0 == "bert.pooler.dense.weight") {
            bail!(
                "{}: the encoder has no pooler (pooler.dense): cannot write a \
                 BertForSequenceClassification student",
                src.display()
            );
        }
        tensors.extend(
            head.iter()
                .map(|(n, d, s, v)| (format!("classifier.{n}"), *d, s.clone(), v.clone())),
        );
    }
    crate::corpus::write_atomic(&dir.join("model.safetensors"), &serialize(&tensors)?)?;
    crate::corpus::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    copy_tokenizer(src, dir)?;
    agree_on_max_tokens(dir, info.max_tokens.unwrap_or(encoder.max_tokens()))?;
    let card = json!({
        "mira_student": 1,
        "group": group,
        "encoder": src.display().to_string(),
        "feature": info.feature,
        "features": format!("{} (frozen encoder); linear head fitted by ridge regression", info.feature.describe()),
        "anchors": anchors,
        "lambda": info.lambda,
        "n_train": info.n_train,
        "n_validation": info.n_validation,
        "max_tokens": info.max_tokens,
    });
    crate::corpus::write_atomic(
        &dir.join("mira_student.json"),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )
}

/// The encoder's `config.json` with the student's outputs: `problem_type: regression` and the
/// anchors in `id2label`/`label2id` (`architectures` is the caller's).
fn student_config(src: &Path, anchors: &[String]) -> Result<Value> {
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)
        .with_context(|| format!("{}: invalid config.json", src.display()))?;
    if cfg["model_type"] != "bert" {
        bail!("distillation writes BERT students: the encoder must be a BERT model");
    }
    cfg["problem_type"] = json!("regression");
    cfg["id2label"] = anchors
        .iter()
        .enumerate()
        .map(|(i, a)| (i.to_string(), json!(a)))
        .collect();
    cfg["label2id"] = anchors
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), json!(i)))
        .collect();
    cfg.as_object_mut().unwrap().remove("_name_or_path");
    Ok(cfg)
}

fn f32_tensor(name: &str, shape: Vec<usize>, v: &[f64]) -> Tensor {
    let bytes = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
    (name.to_string(), safetensors::Dtype::F32, shape, bytes)
}

/// The encoder's tensors (no classifier) under `prefix`, as they are stored.
fn encoder_tensors(src: &Path, prefix: &str) -> Result<Vec<Tensor>> {
    let weights = Weights::open(src)?;
    let own = weights.prefix().to_string();
    let mut out = Vec::new();
    for name in weights.names() {
        let t = weights.get(name)?;
        let bare = name.strip_prefix(&own).unwrap_or(name);
        if bare.starts_with("classifier.") {
            continue;
        }
        out.push((
            format!("{prefix}{bare}"),
            t.dtype,
            t.shape.clone(),
            t.bytes.to_vec(),
        ));
    }
    Ok(out)
}

/// `model.safetensors` bytes of `tensors` (metadata `format: pt`, as transformers writes).
fn serialize(tensors: &[Tensor]) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, bytes)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), bytes)?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}

/// Remove the sentence-transformers modules an earlier student in `dir` left (its feature was
/// CLS or mean): the folder must not keep a second head that a library would load instead.
fn remove_sentence_modules(dir: &Path) -> Result<()> {
    let modules = dir.join("modules.json");
    if modules.exists() {
        std::fs::remove_file(&modules)
            .with_context(|| format!("cannot remove {}", modules.display()))?;
    }
    for sub in ["1_Pooling", "2_Dense"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// `modules.json`, `1_Pooling/` and `2_Dense/` of a sentence-transformers student.
fn write_sentence_modules(
    dir: &Path,
    feature: Feature,
    hidden: usize,
    outputs: usize,
    head: &[Tensor; 2],
) -> Result<()> {
    let module = |i: usize, path: &str, kind: &str| {
        json!({"idx": i, "name": i.to_string(), "path": path,
               "type": format!("sentence_transformers.models.{kind}")})
    };
    let modules = json!([
        module(0, "", "Transformer"),
        module(1, "1_Pooling", "Pooling"),
        module(2, "2_Dense", "Dense"),
    ]);
    let pooling = json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": feature == Feature::Cls,
        "pooling_mode_mean_tokens": feature == Feature::Mean,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true,
    });
    let dense = json!({
        "in_features": hidden,
        "out_features": outputs,
        "bias": true,
        "activation_function": "torch.nn.modules.linear.Identity",
    });
    let write_json = |path: &Path, v: &Value| -> Result<()> {
        crate::corpus::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
    };
    std::fs::create_dir_all(dir.join("1_Pooling"))?;
    std::fs::create_dir_all(dir.join("2_Dense"))?;
    write_json(&dir.join("modules.json"), &modules)?;
    write_json(&dir.join("1_Pooling").join("config.json"), &pooling)?;
    write_json(&dir.join("2_Dense").join("config.json"), &dense)?;
    let linear: Vec<Tensor> = head
        .iter()
        .map(|(n, d, s, v)| (format!("linear.{n}"), *d, s.clone(), v.clone()))
        .collect();
    crate::corpus::write_atomic(
        &dir.join("2_Dense").join("model.safetensors"),
        &serialize(&linear)?,
    )
}

/// Files copied from the encoder folder into each student (tokenizer and token limit).
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "sentence_bert_config.json",
];

fn copy_tokenizer(src: &Path, dir: &Path) -> Result<()> {
    for f in COPIED {
        let p = src.join(f);
        if p.exists() {
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            crate::corpus::write_atomic(&dir.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// Make the student's three statements of its input length say the same `max_tokens` (the
/// length its head was fitted at): `tokenizer.json`'s truncation (and no padding),
/// `tokenizer_config.json`'s `model_max_length` and `sentence_bert_config.json`'s
/// `max_seq_length`. Copied from an encoder whose files disagree (all-MiniLM-L6-v2: 128, 512
/// and 256), transformers and mira would otherwise truncate the same document differently.
fn agree_on_max_tokens(dir: &Path, max_tokens: usize) -> Result<()> {
    let edit = |name: &str, change: &dyn Fn(&mut Value)| -> Result<()> {
        let path = dir.join(name);
        let mut v: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?,
            Err(_) if name == "sentence_bert_config.json" => json!({}),
            Err(_) => return Ok(()),
        };
        change(&mut v);
        crate::corpus::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())
    };
    edit("tokenizer.json", &|v| {
        v["truncation"] = json!({
            "direction": "Right",
            "max_length": max_tokens,
            "strategy": "LongestFirst",
            "stride": 0,
        });
        v["padding"] = Value::Null;
    })?;
    edit("tokenizer_config.json", &|v| {
        v["model_max_length"] = json!(max_tokens)
    })?;
    edit("sentence_bert_config.json", &|v| {
        v["max_seq_length"] = json!(max_tokens)
    })
}

//! The students of `mira select`, loaded once: when they share one encoder (as every student of
//! `mira distill` does: the same frozen encoder, a head per group), the encoder is loaded once
//! and each group's head is applied to its output; otherwise each student is loaded whole.
//!
//! Sharing is checked, not assumed: the same tokenizer and side files, the same `config.json`
//! apart from the head's keys, and every encoder tensor byte for byte (under either export's
//! tensor names). A head reads the feature its group's validation chose (`super::features`):
//! `BertForSequenceClassification` students read the pooler, sentence-transformers students
//! the [CLS] state or the mean their `1_Pooling` names, through the `Dense` module in `2_Dense`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::distill::student_dir;
use super::features::{self, Feature, Pooler, Row};
use crate::model::config::ModelConfig;
use crate::model::st::Dense;
use crate::model::weights::Weights;
use crate::scorer::{activate_outputs, head_info, HeadInfo};
use crate::{Device, LoadOptions, Scorer};

/// `config.json` keys that describe the head, not the encoder.
const HEAD_KEYS: [&str; 6] = [
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "_name_or_path",
];

/// Files of a student folder that are not the encoder's own: its config, weights, card and the
/// sentence-transformers module list (which names the head).
const NOT_ENCODER_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "mira_student.json",
    "modules.json",
];

/// A group's linear head on the shared encoder's features.
#[derive(Clone)]
pub struct Head {
    pub info: HeadInfo,
    /// The feature it reads.
    pub feature: Feature,
    /// The encoder's pooler, when the head reads it from a `[CLS | mean]` row.
    pooler: Option<std::sync::Arc<Pooler>>,
    /// The linear layer (`[outputs, hidden]`, no activation).
    linear: Dense,
}

impl Head {
    /// Scores of one record from its shared-encoder row (laid out as `row_kind` says):
    /// `weight · feature + bias` (accumulated in f64), then the head's activation.
    pub fn apply(&self, row: &[f32], row_kind: Row) -> Result<Vec<f32>> {
        let features = features::feature(self.feature, row, row_kind, self.pooler.as_deref())?;
        let mut out = self.linear.apply(&features);
        activate_outputs(self.info.problem_type, &mut out);
        Ok(out)
    }
}

/// The students of every group.
pub enum Students {
    /// One encoder (loaded from the first group's student) and each group's head; `row` is
    /// what the encoder computes per record for all of them.
    Shared {
        encoder: Box<Scorer>,
        heads: BTreeMap<String, Head>,
        row: Row,
    },
    /// Each group's student, whole.
    Separate(BTreeMap<String, Scorer>),
}

impl Students {
    /// Load the students of `groups` from `dir` (`mira distill`'s output).
    pub fn load(dir: &Path, groups: &[String], device: Device, opts: LoadOptions) -> Result<Self> {
        let dirs: Vec<PathBuf> = groups.iter().map(|g| student_dir(dir, g)).collect();
        for (g, d) in groups.iter().zip(&dirs) {
            if !d.join("config.json").exists() {
                bail!(
                    "cannot load the student of group {g}: {} has no config.json (run mira distill)",
                    d.display()
                );
            }
        }
        let Some(first) = dirs.first() else {
            bail!("groups.json names no group");
        };
        let mut shared = true;
        for d in &dirs[1..] {
            shared &= same_encoder(first, d)?;
        }
        if !shared {
            let mut each = BTreeMap::new();
            for (g, d) in groups.iter().zip(&dirs) {
                each.insert(g.clone(), load_student(g, d, device, opts.clone())?);
            }
            return Ok(Students::Separate(each));
        }
        let encoder = load_student(&groups[0], first, device, opts)?;
        let hidden = encoder.hidden_size();
        let weights = Weights::open(first)?;
        let pooler = Pooler::read(&weights, hidden)?.map(std::sync::Arc::new);
        let mut heads = BTreeMap::new();
        for (g, d) in groups.iter().zip(&dirs) {
            let mut head =
                read_head(d, hidden).with_context(|| format!("the student of group {g}"))?;
            if head.feature == Feature::Pooler {
                if pooler.is_none() {
                    bail!("the student of group {g} reads the pooler, but the shared encoder has none");
                }
                head.pooler = pooler.clone();
            }
            heads.insert(g.clone(), head);
        }
        let row = Row::serving(heads.values().map(|h| h.feature));
        Ok(Students::Shared {
            encoder: Box::new(encoder),
            heads,
            row,
        })
    }

    /// Encoders held in memory (1 when shared).
    pub fn encoders_loaded(&self) -> usize {
        match self {
            Students::Shared { .. } => 1,
            Students::Separate(each) => each.len(),
        }
    }

    /// The anchors (output labels) of a group's student.
    pub fn labels(&self, group: &str) -> Option<&[String]> {
        match self {
            Students::Shared { heads, .. } => heads.get(group).map(|h| h.info.labels.as_slice()),
            Students::Separate(each) => each
                .get(group)
                .and_then(|s| s.head())
                .map(|h| h.labels.as_slice()),
        }
    }
}

fn load_student(group: &str, dir: &Path, device: Device, opts: LoadOptions) -> Result<Scorer> {
    let s = Scorer::load_with(dir, device, opts)
        .with_context(|| format!("cannot load the student of group {group}"))?;
    if s.head().is_none() {
        bail!("{}: the student has no head", dir.display());
    }
    if let Some(note) = s.device_note() {
        eprintln!("{note}");
    }
    Ok(s)
}

/// A student's head on `hidden` features: the `classifier` of a `BertForSequenceClassification`
/// student (reads the pooler), or the `Dense` module of a sentence-transformers student (reads
/// what its `1_Pooling` names).
fn read_head(dir: &Path, hidden: usize) -> Result<Head> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let sentence = crate::model::st::SentenceConfig::load(dir)?;
    let (feature, linear) = match sentence.dense {
        Some(_) if Weights::open(dir)?.contains("classifier.weight") => bail!(
            "{}: the student has two heads (classifier.weight and a Dense module in \
             modules.json): distil it again into an empty folder",
            dir.display()
        ),
        Some(d) => {
            if sentence.normalize || d.tanh || d.in_features != hidden {
                bail!(
                    "{}: a student's Dense head reads the {hidden} pooled values with no \
                     activation and no Normalize module",
                    dir.display()
                );
            }
            let feature = match sentence.pooling {
                crate::Pooling::Cls => Feature::Cls,
                _ => Feature::Mean,
            };
            (feature, d)
        }
        None => {
            let w = Weights::open(dir)?;
            let shape = w.get("classifier.weight")?.shape.clone();
            if shape.len() != 2 || shape[1] != hidden {
                bail!(
                    "{}: classifier.weight has shape {shape:?}, expected [outputs, {hidden}]",
                    dir.display()
                );
            }
            let outputs = shape[0];
            let linear = Dense {
                weight: w.f32("classifier.weight", &[outputs, hidden])?,
                bias: w.f32("classifier.bias", &[outputs])?,
                in_features: hidden,
                out_features: outputs,
                tanh: false,
            };
            (Feature::Pooler, linear)
        }
    };
    Ok(Head {
        info: head_info(dir, &cfg, linear.out_features)?,
        feature,
        pooler: None,
        linear,
    })
}

/// Whether the students in `a` and `b` share their encoder: the same side files (tokenizer and
/// the like), the same `config.json` but for the head's keys, and every tensor but the head's
/// equal in name, type, shape and bytes.
pub fn same_encoder(a: &Path, b: &Path) -> Result<bool> {
    if side_files(a)? != side_files(b)? {
        return Ok(false);
    }
    if encoder_config(a)? != encoder_config(b)? {
        return Ok(false);
    }
    let (wa, wb) = (Weights::open(a)?, Weights::open(b)?);
    // Encoder tensors by their bare names (`bert.` stripped): a BertForSequenceClassification
    // student and a sentence-transformers one hold the same encoder under different names.
    let encoder_tensors = |w: &Weights| -> BTreeMap<String, String> {
        w.names()
            .into_iter()
            .filter(|n| !n.starts_with("classifier."))
            .map(|n| {
                (
                    n.strip_prefix(w.prefix()).unwrap_or(n).to_string(),
                    n.to_string(),
                )
            })
            .collect()
    };
    let (na, nb) = (encoder_tensors(&wa), encoder_tensors(&wb));
    if na.keys().ne(nb.keys()) {
        return Ok(false);
    }
    for (bare, full_a) in &na {
        let (ta, tb) = (wa.get(full_a)?, wb.get(&nb[bare])?);
        if ta.dtype != tb.dtype || ta.shape != tb.shape || ta.bytes != tb.bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The folder's files other than the config, weights and card: name and bytes.
fn side_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if NOT_ENCODER_FILES.contains(&name.as_str()) || !e.file_type()?.is_file() {
            continue;
        }
        let bytes = crate::checked::read_small_file(&e.path(), crate::checked::MAX_METADATA_BYTES)?;
        out.insert(name, bytes);
    }
    Ok(out)
}

fn encoder_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let bytes = crate::checked::read_small_file(&path, crate::checked::MAX_METADATA_BYTES)?;
    let mut v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: invalid config.json", path.display()))?;
    if let Some(o) = v.as_object_mut() {
        for k in HEAD_KEYS {
            o.remove(k);
        }
    }
    Ok(v)
}

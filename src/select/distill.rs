//! Step 4, `mira distill`: one student per group.
//!
//! A student is the frozen encoder plus a multi-output linear head, one output per anchor. The
//! head reads exactly what `BertForSequenceClassification`'s classifier reads (the pooler
//! output tanh(W·h_[CLS] + b)), is fitted by ridge regression in closed form, and each anchor's
//! penalty is chosen on the validation split (lowest MAE). The FineWeb-Edu recipe: a frozen
//! encoder and a trained head. The student is written as an unmodified
//! `BertForSequenceClassification` folder (`problem_type: regression`, anchor names in
//! `id2label`) that `mira score` and transformers both load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::label::{LabelRow, TRAIN, VALIDATION};
use super::stats::{self, RidgePath};
use crate::model::weights::Weights;
use crate::Scorer;

#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// Ridge penalties tried per anchor.
    pub lambdas: Vec<f64>,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            // 1e-3 .. 1e4 in half-decade steps.
            lambdas: (0..=14)
                .map(|i| 10f64.powf(-3.0 + 0.5 * i as f64))
                .collect(),
        }
    }
}

/// Validation quality of one (source, anchor) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub group: String,
    pub source: String,
    pub anchor: String,
    /// Validation records of this source.
    pub n: usize,
    pub mae: Option<f64>,
    pub spearman: Option<f64>,
}

/// What distillation produced, per group; written as `validation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub encoder: String,
    /// group -> student summary
    pub students: BTreeMap<String, StudentInfo>,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentInfo {
    pub anchors: Vec<String>,
    pub lambda: Vec<f64>,
    pub n_train: usize,
    pub n_validation: usize,
    /// Rows skipped: teacher errors, or scores missing for some anchor.
    pub skipped: usize,
    /// Validation MAE and Spearman per anchor over the whole group.
    pub mae: Vec<Option<f64>>,
    pub spearman: Vec<Option<f64>>,
}

/// The student folder of a group.
pub fn student_dir(students: &Path, group: &str) -> std::path::PathBuf {
    students.join(crate::names::file_name(group))
}

/// Fit a student per group from `rows` and write `<out>/<group>/` plus `<out>/validation.json`
/// and `validation.md`.
pub fn distill(
    encoder: &Scorer,
    rows: &[LabelRow],
    out: &Path,
    opts: &DistillOptions,
) -> Result<Validation> {
    let mut by_group: BTreeMap<&str, Vec<&LabelRow>> = BTreeMap::new();
    for r in rows {
        by_group.entry(&r.group).or_default().push(r);
    }
    let mut validation = Validation {
        encoder: encoder.model_dir().display().to_string(),
        students: BTreeMap::new(),
        cells: Vec::new(),
    };
    std::fs::create_dir_all(out)?;
    for (group, rows) in by_group {
        let GroupRows {
            anchors,
            usable,
            train,
            val,
        } = GroupRows::of(group, &rows)?;
        let dim = encoder.embedding_dim();
        let a = anchors.len();
        let xt = features(encoder, &train)
            .with_context(|| format!("group {group}: encoder features"))?;
        let xv = features(encoder, &val)?;
        let targets = |rs: &[&LabelRow]| -> Vec<f64> {
            rs.iter()
                .flat_map(|r| anchors.iter().map(|k| r.score(k).unwrap()))
                .collect()
        };
        let yt = targets(&train);
        let yv = targets(&val);
        let path = RidgePath::new(&xt, &yt, dim, a);
        let (w, b, lambda) = choose_penalties(&path, (&xv, &yv), (dim, a), &opts.lambdas);
        let pred = stats::predict(&xv, dim, &w, &b);
        // The student's output names, as `mira score` will name them (`crate::names`): an
        // anchor called `text` is the label `text_score` in the checkpoint and in the report.
        let anchor_names = crate::names::label_names(&anchors);
        let (mae, spearman) = (0..a)
            .map(|j| {
                let (p, t) = (column(&pred, a, j), column(&yv, a, j));
                (stats::mae(&p, &t), stats::spearman(&p, &t))
            })
            .unzip();
        let info = StudentInfo {
            anchors: anchor_names.clone(),
            lambda,
            n_train: train.len(),
            n_validation: val.len(),
            skipped: rows.len() - usable.len(),
            mae,
            spearman,
        };
        validation.cells.extend(validation_cells(
            group,
            &usable,
            &val,
            &anchor_names,
            (&pred, &yv),
        ));
        write_student(
            encoder,
            &student_dir(out, group),
            group,
            &anchor_names,
            &w,
            &b,
            &info,
        )?;
        validation.students.insert(group.to_string(), info);
    }
    write_validation(out, &validation)?;
    Ok(validation)
}

/// `validation.json` and `validation.md` under `out`.
fn write_validation(out: &Path, validation: &Validation) -> Result<()> {
    crate::corpus::write_atomic(
        &out.join("validation.json"),
        serde_json::to_string_pretty(validation)?.as_bytes(),
    )?;
    crate::corpus::write_atomic(&out.join("validation.md"), report(validation).as_bytes())
}

/// The encoder's features of the rows' texts, `[rows, dim]` row-major.
fn features(encoder: &Scorer, rows: &[&LabelRow]) -> Result<Vec<f64>> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_deref().unwrap()).collect();
    let ids = encoder.tokenize(&texts)?;
    Ok(encoder
        .features_ids(&ids)?
        .values
        .iter()
        .map(|v| *v as f64)
        .collect())
}

/// Column `j` of a row-major matrix with `a` columns.
fn column(v: &[f64], a: usize, j: usize) -> Vec<f64> {
    v.iter().skip(j).step_by(a).copied().collect()
}

/// A group's label rows, split: its anchors (in first-appearance order, which is rubric order
/// for teacher labels), the rows with a score on every anchor, and those split into training
/// and validation.
struct GroupRows<'a> {
    anchors: Vec<String>,
    usable: Vec<&'a LabelRow>,
    train: Vec<&'a LabelRow>,
    val: Vec<&'a LabelRow>,
}

impl<'a> GroupRows<'a> {
    fn of(group: &str, rows: &[&'a LabelRow]) -> Result<GroupRows<'a>> {
        let mut anchors: Vec<String> = Vec::new();
        for r in rows.iter().filter(|r| r.error.is_none()) {
            for k in r.scores.keys() {
                if !anchors.contains(k) {
                    anchors.push(k.clone());
                }
            }
        }
        let usable: Vec<&LabelRow> = rows
            .iter()
            .copied()
            .filter(|r| {
                r.error.is_none()
                    && r.text.is_some()
                    && anchors.iter().all(|a| r.score(a).is_some())
            })
            .collect();
        let skipped = rows.len() - usable.len();
        let train: Vec<&LabelRow> = usable
            .iter()
            .copied()
            .filter(|r| r.split == TRAIN)
            .collect();
        let val: Vec<&LabelRow> = usable
            .iter()
            .copied()
            .filter(|r| r.split == VALIDATION)
            .collect();
        if anchors.is_empty() || train.len() < 2 {
            bail!(
                "group {group}: {} usable training rows ({skipped} skipped): need at least 2",
                train.len()
            );
        }
        if val.is_empty() {
            bail!("group {group}: no validation rows; label more records or raise the validation fraction");
        }
        Ok(GroupRows {
            anchors,
            usable,
            train,
            val,
        })
    }
}

/// Each anchor's ridge penalty from `lambdas`, chosen by validation MAE: the weights `[a, dim]`,
/// biases and penalties.
fn choose_penalties(
    path: &RidgePath,
    (xv, yv): (&[f64], &[f64]),
    (dim, a): (usize, usize),
    lambdas: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n_val = yv.len() / a;
    let mut w = vec![0f64; a * dim];
    let mut b = vec![0f64; a];
    let mut lambda = vec![0f64; a];
    let mut best_mae = vec![f64::INFINITY; a];
    for &l in lambdas {
        let (wl, bl) = path.solve(l);
        let pred = stats::predict(xv, dim, &wl, &bl);
        for j in 0..a {
            let m = (0..n_val)
                .map(|i| (pred[i * a + j] - yv[i * a + j]).abs())
                .sum::<f64>()
                / n_val as f64;
            if m < best_mae[j] {
                best_mae[j] = m;
                lambda[j] = l;
                w[j * dim..(j + 1) * dim].copy_from_slice(&wl[j * dim..(j + 1) * dim]);
                b[j] = bl[j];
            }
        }
    }
    (w, b, lambda)
}

/// Validation MAE and Spearman per (source, anchor) of one group's student.
fn validation_cells(
    group: &str,
    usable: &[&LabelRow],
    val: &[&LabelRow],
    anchor_names: &[String],
    (pred, yv): (&[f64], &[f64]),
) -> Vec<Cell> {
    let a = anchor_names.len();
    let col = |v: &[f64], j: usize, idx: &[usize]| -> Vec<f64> {
        idx.iter().map(|&i| v[i * a + j]).collect()
    };
    let mut cells = Vec::new();
    let mut sources: Vec<&str> = usable.iter().map(|r| r.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    for src in sources {
        let idx: Vec<usize> = (0..val.len()).filter(|&i| val[i].source == src).collect();
        for (j, anchor) in anchor_names.iter().enumerate() {
            let (p, t) = (col(pred, j, &idx), col(yv, j, &idx));
            cells.push(Cell {
                group: group.to_string(),
                source: src.to_string(),
                anchor: anchor.clone(),
                n: idx.len(),
                mae: stats::mae(&p, &t),
                spearman: stats::spearman(&p, &t),
            });
        }
    }
    cells
}

/// Files copied from the encoder folder into each student (tokenizer and token limit).
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "sentence_bert_config.json",
];

/// Write a `BertForSequenceClassification` folder (a student; the precision tests write one with a
/// random head): the encoder's tensors under `bert.`, the
/// fitted `classifier` (`[A, H]` f32, `[A]` f32), config with regression and anchor labels.
// Long: the student folder's files written in turn (config, tensors, tokenizer files, card), each
// a few lines.
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
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)
        .with_context(|| format!("{}: invalid config.json", src.display()))?;
    if cfg["model_type"] != "bert" {
        bail!("distillation writes BertForSequenceClassification students: the encoder must be a BERT model");
    }
    cfg["architectures"] = json!(["BertForSequenceClassification"]);
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

    let weights = Weights::open(src)?;
    let prefix = weights.prefix().to_string();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in weights.names() {
        let t = weights.get(name)?;
        let bare = name.strip_prefix(&prefix).unwrap_or(name);
        if bare.starts_with("classifier.") {
            continue;
        }
        tensors.push((
            format!("bert.{bare}"),
            t.dtype,
            t.shape.clone(),
            t.bytes.to_vec(),
        ));
    }
    if !tensors.iter().any(|t| t.0 == "bert.pooler.dense.weight") {
        bail!("{}: the encoder has no pooler (pooler.dense): cannot write a BertForSequenceClassification student", src.display());
    }
    let h = encoder.embedding_dim();
    let f32_bytes =
        |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect() };
    tensors.push((
        "classifier.weight".into(),
        safetensors::Dtype::F32,
        vec![anchors.len(), h],
        f32_bytes(w),
    ));
    tensors.push((
        "classifier.bias".into(),
        safetensors::Dtype::F32,
        vec![anchors.len()],
        f32_bytes(b),
    ));
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
    let bytes = safetensors::tensor::serialize(views, Some(meta))?;

    std::fs::create_dir_all(dir)?;
    crate::corpus::write_atomic(&dir.join("model.safetensors"), &bytes)?;
    crate::corpus::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    for f in COPIED {
        let p = src.join(f);
        if p.exists() {
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            crate::corpus::write_atomic(&dir.join(f), &bytes)?;
        }
    }
    agree_on_max_tokens(dir, encoder.max_tokens())?;
    let card = json!({
        "mira_student": 1,
        "group": group,
        "encoder": src.display().to_string(),
        "features": "BERT pooler output (frozen); classifier fitted by ridge regression",
        "anchors": anchors,
        "lambda": info.lambda,
        "n_train": info.n_train,
        "n_validation": info.n_validation,
    });
    crate::corpus::write_atomic(
        &dir.join("mira_student.json"),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )
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

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.3}"))
}

/// `validation.md`: per group and per (source, anchor), student vs teacher on validation.
pub fn report(v: &Validation) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Student validation\n\nEncoder `{}`; head: ridge on the pooler output.\n",
        v.encoder
    );
    for (g, info) in &v.students {
        let _ = writeln!(
            s,
            "## Group {g}\n\n{} train / {} validation rows ({} skipped).\n\n| anchor | λ | MAE | Spearman |\n|---|---|---|---|",
            info.n_train, info.n_validation, info.skipped
        );
        for (j, a) in info.anchors.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {a} | {:.0e} | {} | {} |",
                info.lambda[j],
                fmt_opt(info.mae[j]),
                fmt_opt(info.spearman[j])
            );
        }
        let _ = writeln!(
            s,
            "\n| source | anchor | n | MAE | Spearman |\n|---|---|---|---|---|"
        );
        for c in v.cells.iter().filter(|c| &c.group == g) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                c.source,
                c.anchor,
                c.n,
                fmt_opt(c.mae),
                fmt_opt(c.spearman)
            );
        }
        s.push('\n');
    }
    s
}

pub fn read_validation(path: &Path) -> Result<Validation> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a validation.json", path.display()))
}

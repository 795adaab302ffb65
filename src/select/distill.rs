//! Step 4, `mira distill`: one student per group.
//!
//! A student is the frozen encoder plus a multi-output linear head, one output per anchor,
//! fitted by ridge regression in closed form (the FineWeb-Edu recipe: a frozen encoder and a
//! trained head). What the head reads is chosen per group by validation (`super::features`):
//! the pooler output, the [CLS] state or the mean of the final states, whichever gives the
//! lowest validation MAE averaged over the anchors (ties go to the pooler); each anchor's
//! ridge penalty is chosen on the same split. The student is written in the format the feature
//! calls for (`super::export`): `BertForSequenceClassification` for the pooler, a
//! sentence-transformers folder with a `Dense` head otherwise; `mira score` loads both.
//!
//! The feature and penalties are chosen on the validation rows whose MAE and Spearman are then
//! reported, so those figures lean optimistic by the little that three candidates and fifteen
//! penalties can overfit; `validation.md` shows every candidate's figures beside the choice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use super::export::write_student;
use super::features::{self, Feature, FeatureChoice, Pooler, Row};
use super::label::{LabelRow, TRAIN, VALIDATION};
use super::stats::{self, RidgePath};
use crate::model::weights::Weights;
use crate::Scorer;

#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// Ridge penalties tried per anchor.
    pub lambdas: Vec<f64>,
    /// What the heads read: chosen per group by validation, or one feature for all.
    pub feature: FeatureChoice,
    /// Tokens a student reads of a document, special tokens included: its head is fitted on
    /// features at this truncation and its folder says so. Default (`None`): the encoder's
    /// `max_position_embeddings`, the limit transformers' `pipeline` and `AutoTokenizer` reach
    /// by default, so a student scores there as in mira (a shorter limit is faster, but those
    /// defaults then read further into a document than the head was fitted on).
    pub max_tokens: Option<usize>,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            // 1e-3 .. 1e4 in half-decade steps.
            lambdas: (0..=14)
                .map(|i| 10f64.powf(-3.0 + 0.5 * i as f64))
                .collect(),
            feature: FeatureChoice::Auto,
            max_tokens: None,
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
    /// What the head reads (students distilled before the choice existed read the pooler).
    #[serde(default = "pooler")]
    pub feature: Feature,
    /// Every candidate feature's validation figures, the chosen one among them.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Tokens of a document the student reads (fitted and scored at this truncation; absent in
    /// students distilled before it was recorded).
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

fn pooler() -> Feature {
    Feature::Pooler
}

/// One candidate feature of a group's student: validation MAE and Spearman averaged over its
/// anchors (Spearman over the anchors where it is defined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub feature: Feature,
    pub mae: Option<f64>,
    pub spearman: Option<f64>,
}

/// The student folder of a group.
pub fn student_dir(students: &Path, group: &str) -> std::path::PathBuf {
    students.join(crate::names::file_name(group))
}

/// Fit a student per group from `rows` and write `<out>/<group>/` plus `<out>/validation.json`
/// and `validation.md`.
// Long: each group in turn is split, fitted, summarised and written; the steps share its rows.
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
    let max_tokens = opts.max_tokens.unwrap_or(encoder.max_positions());
    std::fs::create_dir_all(out)?;
    let pooler = Pooler::read(&Weights::open(encoder.model_dir())?, encoder.hidden_size())?;
    for (group, rows) in by_group {
        let GroupRows {
            anchors,
            usable,
            train,
            val,
        } = GroupRows::of(group, &rows)?;
        let a = anchors.len();
        let targets = |rs: &[&LabelRow]| -> Vec<f64> {
            rs.iter()
                .flat_map(|r| anchors.iter().map(|k| r.score(k).unwrap()))
                .collect()
        };
        let (yt, yv) = (targets(&train), targets(&val));
        let (fit, candidates) = fit_group(
            encoder,
            (&train, &val),
            (&yt, &yv),
            pooler.as_ref(),
            (max_tokens, opts),
        )
        .with_context(|| format!("group {group}"))?;
        let Fit {
            feature,
            w,
            b,
            lambda,
            pred,
        } = fit;
        // The student's output names, as `mira score` will name them (`crate::names`): an
        // anchor called `text` is the label `text_score` in the checkpoint and in the report.
        let anchor_names = crate::names::label_names(&anchors);
        let (mae, spearman) = per_anchor(&pred, &yv, a);
        let info = StudentInfo {
            anchors: anchor_names.clone(),
            lambda,
            n_train: train.len(),
            n_validation: val.len(),
            skipped: rows.len() - usable.len(),
            mae,
            spearman,
            feature,
            candidates,
            max_tokens: Some(max_tokens),
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

/// A group's head on each candidate feature; the one with the lowest validation MAE averaged
/// over the anchors (`candidates()` lists the pooler first, so it wins ties), and every
/// candidate's figures. `yt`/`yv`: targets `[rows, anchors]`.
fn fit_group(
    encoder: &Scorer,
    (train, val): (&[&LabelRow], &[&LabelRow]),
    (yt, yv): (&[f64], &[f64]),
    pooler: Option<&Pooler>,
    (max_tokens, opts): (usize, &DistillOptions),
) -> Result<(Fit, Vec<Candidate>)> {
    let dim = encoder.hidden_size();
    let a = yt.len() / train.len();
    let rows_t = cls_and_mean(encoder, train, max_tokens).context("encoder features")?;
    let rows_v = cls_and_mean(encoder, val, max_tokens)?;
    let mut fits = Vec::new();
    for feature in opts.feature.candidates() {
        if feature == Feature::Pooler && pooler.is_none() {
            continue;
        }
        let (xt, xv) = (
            feature_matrix(&rows_t, dim, feature, pooler)?,
            feature_matrix(&rows_v, dim, feature, pooler)?,
        );
        let path = RidgePath::new(&xt, yt, dim, a);
        let (w, b, lambda) = choose_penalties(&path, (&xv, yv), (dim, a), &opts.lambdas);
        let pred = stats::predict(&xv, dim, &w, &b);
        fits.push(Fit {
            feature,
            w,
            b,
            lambda,
            pred,
        });
    }
    let candidates: Vec<Candidate> = fits.iter().map(|f| f.candidate(yv, a)).collect();
    let best = (0..fits.len())
        .min_by(|&i, &j| {
            let mae = |k: usize| candidates[k].mae.unwrap_or(f64::INFINITY);
            mae(i).total_cmp(&mae(j))
        })
        .context("no candidate feature (the encoder has no pooler)")?;
    Ok((fits.swap_remove(best), candidates))
}

/// `validation.json` and `validation.md` under `out`.
fn write_validation(out: &Path, validation: &Validation) -> Result<()> {
    crate::corpus::write_atomic(
        &out.join("validation.json"),
        serde_json::to_string_pretty(validation)?.as_bytes(),
    )?;
    crate::corpus::write_atomic(&out.join("validation.md"), report(validation).as_bytes())
}

/// One candidate's fitted head and its validation predictions `[val, anchors]`.
struct Fit {
    feature: Feature,
    w: Vec<f64>,
    b: Vec<f64>,
    lambda: Vec<f64>,
    pred: Vec<f64>,
}

impl Fit {
    /// Its validation figures against `yv` (`[val, a]`), averaged over the anchors.
    fn candidate(&self, yv: &[f64], a: usize) -> Candidate {
        let (mut mae, mut rho) = (0.0, Vec::new());
        for j in 0..a {
            let (p, t) = (column(&self.pred, a, j), column(yv, a, j));
            mae += stats::mae(&p, &t).unwrap_or(f64::NAN) / a as f64;
            rho.extend(stats::spearman(&p, &t));
        }
        Candidate {
            feature: self.feature,
            mae: mae.is_finite().then_some(mae),
            spearman: (!rho.is_empty()).then(|| rho.iter().sum::<f64>() / rho.len() as f64),
        }
    }
}

/// The encoder's `[CLS | mean]` rows of the rows' texts (`[rows, 2 · hidden]`): one forward
/// pass that serves every candidate feature, truncated at `max_tokens`.
fn cls_and_mean(encoder: &Scorer, rows: &[&LabelRow], max_tokens: usize) -> Result<Vec<f32>> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_deref().unwrap()).collect();
    let ids = encoder.tokenize_at(&texts, max_tokens)?;
    let (e, failures) = encoder.cls_and_mean_ids_lenient(&ids)?;
    if let Some(f) = failures.first() {
        bail!("label row of {}: {}", rows[f.doc].id, f.message);
    }
    Ok(e.values)
}

/// Feature `kind` of each `[CLS | mean]` row (`2 · hidden` values each), `[rows, hidden]`
/// row-major in f64.
fn feature_matrix(
    rows: &[f32],
    hidden: usize,
    kind: Feature,
    pooler: Option<&Pooler>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(rows.len() / 2);
    for row in rows.chunks_exact(2 * hidden) {
        let f = features::feature(kind, row, Row::ClsAndMean, pooler)?;
        out.extend(f.iter().map(|v| *v as f64));
    }
    Ok(out)
}

/// Validation MAE and Spearman of each of the `a` anchors (`[rows, a]` predictions and targets).
type PerAnchor = (Vec<Option<f64>>, Vec<Option<f64>>);
fn per_anchor(pred: &[f64], yv: &[f64], a: usize) -> PerAnchor {
    (0..a)
        .map(|j| {
            let (p, t) = (column(pred, a, j), column(yv, a, j));
            (stats::mae(&p, &t), stats::spearman(&p, &t))
        })
        .unzip()
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

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.3}"))
}

/// `validation.md`: per group and per (source, anchor), student vs teacher on validation.
pub fn report(v: &Validation) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Student validation\n\nEncoder `{}` (frozen); each group's head is a ridge regression \
         on the feature with the lowest validation MAE (averaged over its anchors).\n",
        v.encoder
    );
    for (g, info) in &v.students {
        let _ = writeln!(
            s,
            "## Group {g}\n\n{} train / {} validation rows ({} skipped). Head reads the {} \
             (`{}`){}.\n",
            info.n_train,
            info.n_validation,
            info.skipped,
            info.feature.describe(),
            info.feature,
            info.max_tokens
                .map_or(String::new(), |n| format!(" of the first {n} tokens"))
        );
        if !info.candidates.is_empty() {
            let _ = writeln!(
                s,
                "| feature | mean MAE | mean Spearman | |\n|---|---|---|---|"
            );
            for c in &info.candidates {
                let chosen = if c.feature == info.feature {
                    "chosen"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {chosen} |",
                    c.feature,
                    fmt_opt(c.mae),
                    fmt_opt(c.spearman)
                );
            }
            s.push('\n');
        }
        let _ = writeln!(s, "| anchor | λ | MAE | Spearman |\n|---|---|---|---|");
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

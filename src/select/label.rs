//! Step 3, `mira label`: teacher scores on every anchor, or labels produced elsewhere.
//!
//! The teacher scores a sample per group on each anchor of the group's rubric (0-10 with a short
//! rationale, all anchors in one reply; or, with `scoring = "probabilities"`, one request per
//! anchor and the expected score under the teacher's probabilities: `expected_scores.rs`).
//! Ingestion reads datatrove inference output (`metadata.rollout_results`) and
//! score-column files in the FineWeb-Edu / cosmopedia style (`score`, `int_score`, `label`),
//! JSONL or Parquet. Either way the result is `labels.jsonl`: one row per record with id,
//! source, group, `split` (train / validation, by a hash of the id), text and per-anchor
//! scores; rows the teacher could not label carry an `error` instead, so nothing is dropped
//! silently.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::discover::{anchor_id, number};
pub use super::expected_scores::Scoring;
use super::expected_scores::{rate_requests, score_records};
use super::teacher::{extract_json, ChatRequest, Teacher};
use super::{clip, read_rubric, rubric_path, source_of, stats, Anchor, Groups};
use crate::corpus::{FieldNames, InputFile};

/// One labelled record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    pub id: String,
    pub source: String,
    pub group: String,
    /// `train` or `validation`.
    pub split: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// anchor -> score, in rubric order.
    #[serde(default)]
    pub scores: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub rationales: Map<String, Value>,
    /// Why this record has no scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `teacher:<model>` or `ingest:<file>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl LabelRow {
    pub fn score(&self, anchor: &str) -> Option<f64> {
        self.scores.get(anchor).and_then(Value::as_f64)
    }
}

pub const TRAIN: &str = "train";
pub const VALIDATION: &str = "validation";

/// The split of a record: validation for a `fraction` of ids, by a stable hash.
pub fn split_of(id: &str, fraction: f64) -> &'static str {
    if (stats::keyed_hash(0x5EED_5A17, id) % 1_000_000) as f64 / 1e6 < fraction {
        VALIDATION
    } else {
        TRAIN
    }
}

/// Read `labels.jsonl`, checking every row.
pub fn read_labels(path: &Path) -> Result<Vec<LabelRow>> {
    let file = crate::corpus::open_decompressed(path)
        .with_context(|| format!("cannot read labels {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in file.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: unreadable", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: LabelRow = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a label row", path.display(), i + 1))?;
        if row.split != TRAIN && row.split != VALIDATION {
            bail!(
                "{}:{}: split '{}' is neither train nor validation",
                path.display(),
                i + 1,
                row.split
            );
        }
        for (k, v) in &row.scores {
            if !v.as_f64().is_some_and(f64::is_finite) {
                bail!(
                    "{}:{}: score '{k}' is not a finite number: {v}",
                    path.display(),
                    i + 1
                );
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

pub fn write_labels(path: &Path, rows: &[LabelRow]) -> Result<()> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    crate::corpus::write_atomic(path, out.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Teacher labelling
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct LabelOptions {
    pub records_per_group: usize,
    pub validation_fraction: f64,
    pub max_chars: usize,
    pub seed: u64,
    pub fields: FieldNames,
    /// One JSON reply per record, or expected scores from the teacher's probabilities.
    pub scoring: Scoring,
}

impl Default for LabelOptions {
    fn default() -> Self {
        LabelOptions {
            records_per_group: 200,
            validation_fraction: 0.2,
            max_chars: 3000,
            seed: 3,
            fields: FieldNames::default(),
            scoring: Scoring::Reply,
        }
    }
}

pub const SCORE_SYSTEM: &str = "You are an expert data curator scoring documents that may be used \
to train a language model. Score the document on every quality dimension listed, from 0 (worst) \
to 10 (best), each with a short rationale. Reply with JSON only.";

pub fn score_schema(anchors: &[Anchor]) -> Value {
    let mut props = Map::new();
    for a in anchors {
        props.insert(
            a.name.clone(),
            json!({
                "type": "object",
                // Rationale first: the score is written after the reasoning, not before.
                "properties": {
                    "rationale": {"type": "string", "maxLength": 120},
                    "score": {"type": "integer", "minimum": 0, "maximum": 10}
                },
                "required": ["rationale", "score"]
            }),
        );
    }
    let names: Vec<&str> = anchors.iter().map(|a| a.name.as_str()).collect();
    json!({"type": "object", "properties": props, "required": names})
}

pub fn score_request(
    anchors: &[Anchor],
    source: &str,
    text: &str,
    max_chars: usize,
) -> ChatRequest {
    let mut user = String::from("Quality dimensions:\n");
    for a in anchors {
        user.push_str(&format!("- {}: {}\n", a.name, a.definition));
    }
    user.push_str(&format!(
        "\nSource: {source}\n\nDocument:\n<<<\n{}\n>>>\n\nFor each dimension, first write a short rationale about this document, then a score from 0 to 10. Reply as {{\"<dimension>\": {{\"rationale\": \"<why>\", \"score\": <0-10>}}, ...}} with every dimension.",
        clip(text, max_chars),
    ));
    ChatRequest {
        system: SCORE_SYSTEM.to_string(),
        user,
        schema: Some(score_schema(anchors)),
        max_tokens: (60 * anchors.len() as u32).max(200),
        ..Default::default()
    }
}

/// Flatten a reply object into key -> (score, rationale): values may be numbers, numeric
/// strings or objects with `score`/`rating` (and `rationale`/`reason`); a wrapper object
/// (`{"scores": {...}}`) or an array of `{"name", "score"}` items is unwrapped.
pub(super) fn flatten_scores(v: &Value) -> BTreeMap<String, (Option<f64>, String)> {
    let mut out = BTreeMap::new();
    match v {
        Value::Array(items) => {
            for it in items {
                if let Some(o) = it.as_object() {
                    let name = ["name", "dimension", "anchor", "criterion"]
                        .iter()
                        .find_map(|k| o.get(*k).and_then(Value::as_str));
                    if let Some(name) = name {
                        out.insert(anchor_id(name), item_score(it));
                    }
                }
            }
        }
        Value::Object(o) => {
            for (k, val) in o {
                match val {
                    Value::Object(inner)
                        if !inner.contains_key("score") && !inner.contains_key("rating") =>
                    {
                        out.extend(flatten_scores(val))
                    }
                    Value::Array(_) => out.extend(flatten_scores(val)),
                    _ => {
                        out.insert(anchor_id(k), item_score(val));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

fn item_score(v: &Value) -> (Option<f64>, String) {
    match v {
        Value::Object(o) => (
            ["score", "rating", "value"]
                .iter()
                .find_map(|k| o.get(*k).and_then(number)),
            ["rationale", "reason", "explanation"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_str))
                .unwrap_or("")
                .to_string(),
        ),
        other => (number(other), String::new()),
    }
}

/// Parse a scoring reply: every anchor needs a score in [0, 10].
pub fn parse_scores(
    reply: &str,
    anchors: &[Anchor],
) -> Result<(Map<String, Value>, Map<String, Value>)> {
    let v = extract_json(reply).ok_or_else(|| anyhow!("no JSON in the reply"))?;
    let flat = flatten_scores(&v);
    let mut scores = Map::new();
    let mut rationales = Map::new();
    let mut missing = Vec::new();
    for a in anchors {
        match flat.get(&anchor_id(&a.name)) {
            Some((Some(s), why)) if (0.0..=10.0).contains(s) => {
                scores.insert(a.name.clone(), json!(s));
                if !why.is_empty() {
                    rationales.insert(a.name.clone(), json!(why));
                }
            }
            Some((Some(s), _)) => bail!("score {s} for '{}' is outside 0-10", a.name),
            _ => missing.push(a.name.as_str()),
        }
    }
    if !missing.is_empty() {
        bail!("no score for {}", missing.join(", "));
    }
    let in_order: Vec<f64> = scores.values().filter_map(Value::as_f64).collect();
    if counts_up(&in_order) {
        bail!(
            "{POSITION_ECHO}: the scores count up with the dimensions' order ({}), so they number \
             the dimensions rather than judge the document",
            in_order
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((scores, rationales))
}

/// The error a label row carries when its reply numbers the dimensions instead of scoring
/// them (a weak teacher's habit: 0, 1, 2, 3 for four dimensions, whatever the document).
pub const POSITION_ECHO: &str = "position_echo";

/// Whether scores in rubric order are 0, 1, 2, … or 1, 2, 3, … over three or more dimensions.
fn counts_up(scores: &[f64]) -> bool {
    scores.len() >= 3
        && (scores[0] == 0.0 || scores[0] == 1.0)
        && scores.windows(2).all(|w| w[1] - w[0] == 1.0)
}

#[derive(Debug, Clone, Serialize)]
pub struct LabelSummary {
    pub rows: usize,
    pub labelled: usize,
    pub failed: usize,
    /// Of the failed rows, those whose reply numbered the dimensions ([`POSITION_ECHO`]).
    pub position_echo: usize,
    pub per_group: BTreeMap<String, usize>,
    pub teacher: super::teacher::TeacherStats,
}

type Plan = (
    BTreeMap<String, Vec<Anchor>>,
    BTreeMap<String, Vec<crate::corpus::Record>>,
);

/// Every group's rubric and the records it samples.
fn plan(files: &[InputFile], groups: &Groups, rubrics: &Path, opts: &LabelOptions) -> Result<Plan> {
    let mut rubric = BTreeMap::new();
    for g in groups.names() {
        rubric.insert(g.clone(), read_rubric(&rubric_path(rubrics, &g))?);
    }
    let samples = groups.sample(files, &opts.fields, opts.records_per_group, opts.seed)?;
    Ok((rubric, samples))
}

/// Every request for a group's records, in the order `label` sends them.
fn score_requests(
    anchors: &[Anchor],
    recs: &[crate::corpus::Record],
    opts: &LabelOptions,
) -> Vec<ChatRequest> {
    if opts.scoring == Scoring::Probabilities {
        return rate_requests(anchors, recs, opts.max_chars);
    }
    recs.iter()
        .map(|r| {
            score_request(
                anchors,
                &source_of(r),
                r.text.as_deref().unwrap(),
                opts.max_chars,
            )
        })
        .collect()
}

/// Every request `label` would send, in order (for `--estimate`).
pub fn requests(
    files: &[InputFile],
    groups: &Groups,
    rubrics: &Path,
    opts: &LabelOptions,
) -> Result<Vec<ChatRequest>> {
    let (rubric, samples) = plan(files, groups, rubrics, opts)?;
    Ok(samples
        .iter()
        .flat_map(|(g, recs)| score_requests(&rubric[g], recs, opts))
        .collect())
}

/// Score samples of every group on its rubric and write `labels.jsonl`.
pub fn label(
    teacher: &Teacher,
    files: &[InputFile],
    groups: &Groups,
    rubrics: &Path,
    out: &Path,
    opts: &LabelOptions,
) -> Result<LabelSummary> {
    let before = teacher.stats();
    let (rubric, samples) = plan(files, groups, rubrics, opts)?;
    let mut rows = Vec::new();
    let mut per_group = BTreeMap::new();
    for (group, recs) in &samples {
        let anchors = &rubric[group];
        let what = format!("label {group}");
        let replies = match opts.scoring {
            Scoring::Reply => {
                let reqs = score_requests(anchors, recs, opts);
                teacher.ask_all(&reqs, &what, |reply| parse_scores(reply, anchors))
            }
            Scoring::Probabilities => score_records(teacher, anchors, recs, opts.max_chars, &what),
        };
        per_group.insert(group.clone(), recs.len());
        for (r, reply) in recs.iter().zip(replies) {
            let mut row = LabelRow {
                id: r.id.clone(),
                source: source_of(r),
                group: group.clone(),
                split: split_of(&r.id, opts.validation_fraction).to_string(),
                text: r.text.as_ref().ok().cloned(),
                scores: Map::new(),
                rationales: Map::new(),
                error: None,
                origin: Some(format!("teacher:{}", teacher.config().model)),
            };
            match reply {
                Ok((s, why)) => {
                    row.scores = s;
                    row.rationales = why;
                }
                Err(e) => row.error = Some(format!("{e:#}")),
            }
            rows.push(row);
        }
    }
    write_labels(out, &rows)?;
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if failed == rows.len() && !rows.is_empty() {
        bail!(
            "the teacher labelled none of {} records (rows with errors written to {}); first error: {}",
            rows.len(),
            out.display(),
            rows[0].error.as_deref().unwrap_or("")
        );
    }
    let position_echo = rows
        .iter()
        .filter(|r| {
            r.error
                .as_deref()
                .is_some_and(|e| e.contains(POSITION_ECHO))
        })
        .count();
    Ok(LabelSummary {
        rows: rows.len(),
        labelled: rows.len() - failed,
        failed,
        position_echo,
        per_group,
        teacher: teacher.stats().since(&before),
    })
}

pub use super::ingest::{ingest, IngestFormat, IngestOptions};

#[cfg(test)]
mod tests {
    use super::*;

    fn anchors(names: &[&str]) -> Vec<Anchor> {
        names
            .iter()
            .map(|n| Anchor {
                name: n.to_string(),
                definition: format!("how {n} the document is"),
                exemplars: Vec::new(),
                cluster_size: 1,
                teacher_name: n.to_string(),
            })
            .collect()
    }

    #[test]
    fn replies_that_number_the_dimensions_are_rejected() {
        let a = anchors(&["clarity", "accuracy", "depth", "style"]);
        let reply = |s: [u8; 4]| {
            json!({
                "clarity": {"rationale": "r", "score": s[0]},
                "accuracy": {"rationale": "r", "score": s[1]},
                "depth": {"rationale": "r", "score": s[2]},
                "style": {"rationale": "r", "score": s[3]},
            })
            .to_string()
        };
        for echo in [[0, 1, 2, 3], [1, 2, 3, 4]] {
            let e = parse_scores(&reply(echo), &a).unwrap_err().to_string();
            assert!(e.starts_with(POSITION_ECHO), "{e}");
        }
        for fine in [
            [0, 0, 0, 0],
            [2, 3, 4, 5],
            [0, 1, 2, 2],
            [3, 2, 1, 0],
            [7, 8, 9, 10],
        ] {
            assert!(parse_scores(&reply(fine), &a).is_ok(), "{fine:?}");
        }
        // Two dimensions scored 0 and 1 are an ordinary reply.
        let two = anchors(&["clarity", "accuracy"]);
        let r = json!({"clarity": {"score": 0}, "accuracy": {"score": 1}}).to_string();
        assert!(parse_scores(&r, &two).is_ok());
    }
}

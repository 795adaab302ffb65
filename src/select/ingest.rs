//! Labels produced elsewhere (`mira label --ingest`, `[label] ingest` in `mira run`): datatrove
//! rollouts (`metadata.rollout_results`, the mean per key over rollouts) or plain score
//! columns, read into label rows with every value checked against the allowed range.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use super::discover::number;
use super::label::{flatten_scores, split_of, LabelRow};
use super::teacher::extract_json;
use super::{clip, Groups};
use crate::corpus::{FieldNames, InputFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestFormat {
    /// datatrove when a row has `metadata.rollout_results`, else score columns.
    Auto,
    Datatrove,
    ScoreColumns,
}

impl std::str::FromStr for IngestFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IngestFormat::Auto),
            "datatrove" => Ok(IngestFormat::Datatrove),
            "score-columns" | "columns" => Ok(IngestFormat::ScoreColumns),
            _ => bail!("unknown label format '{s}': auto, datatrove or score-columns"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub format: IngestFormat,
    /// Score columns, in order of preference; with `all_columns` every present one is an anchor.
    pub columns: Vec<String>,
    pub all_columns: bool,
    /// Allowed score range (inclusive).
    pub range: (f64, f64),
    pub validation_fraction: f64,
    pub fields: FieldNames,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            format: IngestFormat::Auto,
            columns: vec!["score".into(), "int_score".into(), "label".into()],
            all_columns: false,
            range: (0.0, 10.0),
            validation_fraction: 0.2,
            fields: FieldNames::default(),
        }
    }
}

/// One input row: its location (`file:line` or `file:row N`) and the object, or why not.
type JsonRow = (String, Result<Map<String, Value>>);

/// Rows of a JSONL (optionally compressed) or Parquet file as JSON objects, with locations.
fn json_rows(path: &Path) -> Result<Vec<JsonRow>> {
    let name = path.display().to_string();
    if name.ends_with(".parquet") {
        let reader = crate::corpus::parquet::Batches::open(path, 1024)?;
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch?;
            let arr = crate::corpus::parquet::json_rows(&batch).with_context(|| name.clone())?;
            for obj in arr {
                rows.push((format!("{name}:row {}", rows.len()), Ok(obj)));
            }
        }
        return Ok(rows);
    }
    let reader = crate::corpus::open_decompressed(path)?;
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let loc = format!("{name}:{}", i + 1);
        let line = line.with_context(|| format!("{loc}: unreadable"))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str::<Value>(&line)
            .map_err(|e| anyhow!("{loc}: malformed JSON: {e}"))
            .and_then(|v| match v {
                Value::Object(o) => Ok(o),
                _ => Err(anyhow!("{loc}: not a JSON object")),
            });
        rows.push((loc, row));
    }
    Ok(rows)
}

/// Scores in one datatrove rollout result: an InferenceResult (`{"text": reply, ...}`) whose
/// text holds JSON scores or "score: N"; a scores object; or a bare number.
fn rollout_scores(v: &Value) -> Result<BTreeMap<String, f64>> {
    let from_flat = |flat: BTreeMap<String, (Option<f64>, String)>| -> BTreeMap<String, f64> {
        flat.into_iter()
            .filter_map(|(k, (s, _))| s.map(|s| (k, s)))
            .collect()
    };
    match v {
        Value::Number(_) => Ok(BTreeMap::from([("score".to_string(), number(v).unwrap())])),
        Value::Object(o) if o.contains_key("text") => {
            let text = o["text"]
                .as_str()
                .ok_or_else(|| anyhow!("rollout 'text' is not a string"))?;
            if let Some(j) = extract_json(text) {
                if let Some(n) = number(&j) {
                    return Ok(BTreeMap::from([("score".to_string(), n)]));
                }
                let s = from_flat(flatten_scores(&j));
                if !s.is_empty() {
                    return Ok(s);
                }
            }
            last_score_in_text(text)
                .map(|n| BTreeMap::from([("score".to_string(), n)]))
                .ok_or_else(|| anyhow!("no score found in rollout text: {}", clip(text, 120)))
        }
        Value::Object(_) => {
            let s = from_flat(flatten_scores(v));
            if s.is_empty() {
                bail!("rollout result has no numeric scores");
            }
            Ok(s)
        }
        Value::String(t) => last_score_in_text(t)
            .map(|n| BTreeMap::from([("score".to_string(), n)]))
            .ok_or_else(|| anyhow!("no score found in rollout text: {}", clip(t, 120))),
        _ => bail!("rollout result is neither text, an object nor a number"),
    }
}

/// The number after the last "score" in a text ("Educational score: 3", "Score: 4/5").
fn last_score_in_text(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let pos = lower.rfind("score")?;
    let rest = &text[pos + 5..];
    let start = rest.find(|c: char| c.is_ascii_digit())?;
    if rest[..start].chars().any(|c| c.is_alphabetic()) {
        return None;
    }
    let num: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.trim_end_matches('.').parse().ok()
}

/// A label row's scores in datatrove's format (`metadata.rollout_results`): the mean per key
/// over the rollouts, and the keys in first-appearance order.
fn rollout_means(
    rollouts: Option<&Value>,
    loc: &str,
) -> Result<(BTreeMap<String, f64>, Vec<String>)> {
    let mut ordered: Vec<String> = Vec::new();
    let list = rollouts
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{loc}: no metadata.rollout_results list (datatrove format)"))?;
    if list.is_empty() {
        bail!("{loc}: metadata.rollout_results is empty");
    }
    // Several rollouts: the mean per key.
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (k, r) in list.iter().enumerate() {
        let s = rollout_scores(r).with_context(|| format!("{loc}: rollout {k}"))?;
        for (name, v) in s {
            if !ordered.contains(&name) {
                ordered.push(name.clone());
            }
            let e = sums.entry(name).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    let scores = sums
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect();
    Ok((scores, ordered))
}

/// A label row's scores from its label columns: the first present one (or all, with
/// `all_columns`), in column order.
fn column_scores(
    row: &Map<String, Value>,
    opts: &IngestOptions,
    loc: &str,
) -> Result<(BTreeMap<String, f64>, Vec<String>)> {
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    let mut ordered: Vec<String> = Vec::new();
    for c in &opts.columns {
        if let Some(v) = row.get(c) {
            if v.is_null() {
                continue;
            }
            let n = number(v)
                .ok_or_else(|| anyhow!("{loc}: label column '{c}' is not a number: {v}"))?;
            scores.insert(c.clone(), n);
            ordered.push(c.clone());
            if !opts.all_columns {
                break;
            }
        }
    }
    if scores.is_empty() {
        bail!(
            "{loc}: none of the label columns {:?} is present",
            opts.columns
        );
    }
    Ok((scores, ordered))
}

/// Read labels produced elsewhere into label rows. Sources map to groups through `groups`
/// (every source must be known), or all fall in group `all` without one.
pub fn ingest(
    files: &[InputFile],
    groups: Option<&Groups>,
    opts: &IngestOptions,
) -> Result<Vec<LabelRow>> {
    let (lo, hi) = opts.range;
    let mut out = Vec::new();
    for f in files {
        for (loc, row) in json_rows(&f.path)? {
            let row = row?;
            let text = match row.get(&opts.fields.text) {
                Some(Value::String(t)) if !t.trim().is_empty() => t.clone(),
                Some(Value::String(_)) => bail!("{loc}: '{}' is empty", opts.fields.text),
                Some(_) => bail!("{loc}: '{}' is not a string", opts.fields.text),
                None => bail!("{loc}: no '{}' field", opts.fields.text),
            };
            let id = match row.get(&opts.fields.id) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => loc.clone(),
            };
            let source = row
                .get(&opts.fields.source)
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            let group = match groups {
                Some(g) => g
                    .group_of(&source)
                    .ok_or_else(|| anyhow!("{loc}: source '{source}' is not in groups.json"))?
                    .to_string(),
                None => "all".to_string(),
            };
            let rollouts = row.get("metadata").and_then(|m| m.get("rollout_results"));
            let use_datatrove = match opts.format {
                IngestFormat::Datatrove => true,
                IngestFormat::ScoreColumns => false,
                IngestFormat::Auto => rollouts.is_some(),
            };
            let (scores, ordered) = if use_datatrove {
                rollout_means(rollouts, &loc)?
            } else {
                column_scores(&row, opts, &loc)?
            };
            let mut map = Map::new();
            for name in ordered {
                let v = scores[&name];
                if !v.is_finite() || v < lo || v > hi {
                    bail!("{loc}: label '{name}' = {v} is outside the allowed range [{lo}, {hi}] (see --label-range)");
                }
                map.insert(name, json!(v));
            }
            out.push(LabelRow {
                split: split_of(&id, opts.validation_fraction).to_string(),
                id,
                source,
                group,
                text: Some(text),
                scores: map,
                rationales: Map::new(),
                error: None,
                origin: Some(format!("ingest:{}", f.path.display())),
            });
        }
    }
    if out.is_empty() {
        bail!("no label rows in the inputs");
    }
    Ok(out)
}

//! Step 2, `mira discover`: self-anchored rubrics.
//!
//! For each group, the teacher judges sampled records free-form: it names the quality
//! dimensions that matter for that record, each with a score and a reason (no preset rubric).
//! Every judgment point "dimension: reason" is embedded; k-means over the points (k = anchors
//! per group) and the point nearest each centroid becomes an anchor. Rubrics are JSONL a person
//! can read and edit before labelling; the raw judgments are kept beside them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::teacher::{extract_json, ChatRequest, Teacher};
use super::{clip, rubric_path, source_of, stats, write_rubric, Anchor, Groups};
use crate::corpus::{FieldNames, InputFile};
use crate::Scorer;

#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Records the teacher judges per group.
    pub records_per_group: usize,
    /// Anchors per group (clusters of judgment points).
    pub anchors: usize,
    /// Characters of each record shown to the teacher.
    pub max_chars: usize,
    pub seed: u64,
    pub fields: FieldNames,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            records_per_group: 32,
            anchors: 15,
            max_chars: 3000,
            seed: 2,
            fields: FieldNames::default(),
        }
    }
}

/// One judgment point as the teacher wrote it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Judgment {
    pub name: String,
    pub score: Option<f64>,
    pub reason: String,
}

pub const JUDGE_SYSTEM: &str = "You are an expert data curator judging documents that may be used \
to train a language model. Judge the document in your own terms: name the quality dimensions \
that matter most for this kind of document (between 3 and 8), and for each give a score from 0 \
(worst) to 10 (best) after a one-sentence reason. Reply with JSON only, in the form \
{\"dimensions\": [{\"name\": \"<dimension>\", \"reason\": \"<why>\", \"score\": <0-10>}]}.";

pub fn judge_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "dimensions": {
                "type": "array",
                "minItems": 3,
                "maxItems": 8,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 2, "maxLength": 40},
                        "reason": {"type": "string", "minLength": 2, "maxLength": 160},
                        "score": {"type": "integer", "minimum": 0, "maximum": 10}
                    },
                    "required": ["name", "reason", "score"]
                }
            }
        },
        "required": ["dimensions"]
    })
}

pub fn judge_request(source: &str, text: &str, max_chars: usize) -> ChatRequest {
    ChatRequest {
        system: JUDGE_SYSTEM.to_string(),
        user: format!(
            "Source: {source}\n\nDocument:\n<<<\n{}\n>>>",
            clip(text, max_chars)
        ),
        schema: Some(judge_schema()),
        max_tokens: 700,
    }
}

/// A number from a JSON value: `7`, `7.5`, `"7"`, `"7/10"`.
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let head = s.trim().split('/').next()?.trim();
            head.parse::<f64>().ok()
        }
        _ => None,
    }
}

fn text_field(o: &serde_json::Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The judgment points in a reply, tolerantly: `{"dimensions": [...]}` (or any array field),
/// a bare array, or a map `{"clarity": {"score": 7, "reason": ...}}` / `{"clarity": 7}`; item
/// keys `name|dimension|criterion|title`, `score|rating`, `reason|rationale|explanation`.
pub fn parse_judgments(reply: &str) -> Result<Vec<Judgment>> {
    let v = extract_json(reply).ok_or_else(|| anyhow::anyhow!("no JSON in the reply"))?;
    let items: Vec<Value> = match &v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => {
            if let Some(a) = o.values().find_map(Value::as_array) {
                a.clone()
            } else {
                o.iter()
                    .map(|(k, val)| match val {
                        Value::Object(inner) => {
                            let mut m = inner.clone();
                            m.entry("name").or_insert(Value::String(k.clone()));
                            Value::Object(m)
                        }
                        other => json!({"name": k, "score": other}),
                    })
                    .collect()
            }
        }
        _ => bail!("reply is JSON but neither an object nor an array"),
    };
    let mut out = Vec::new();
    for it in &items {
        let Some(o) = it.as_object() else { continue };
        let Some(name) = text_field(o, &["name", "dimension", "criterion", "title", "aspect"])
        else {
            continue;
        };
        let score = ["score", "rating", "value"]
            .iter()
            .find_map(|k| o.get(*k).and_then(number))
            .filter(|s| (0.0..=10.0).contains(s));
        let reason = text_field(
            o,
            &["reason", "rationale", "explanation", "justification", "why"],
        )
        .unwrap_or_default();
        out.push(Judgment {
            name,
            score,
            reason,
        });
    }
    if out.is_empty() {
        bail!("the reply names no quality dimension");
    }
    Ok(out)
}

/// `snake_case` identifier of a dimension name (ASCII letters and digits), at most 48 chars.
pub fn anchor_id(name: &str) -> String {
    let mut s = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('_') && !s.is_empty() {
            s.push('_');
        }
    }
    let s = s.trim_end_matches('_');
    let s: String = s.chars().take(48).collect();
    let s = s.trim_end_matches('_').to_string();
    if s.is_empty() {
        "dimension".to_string()
    } else {
        s
    }
}

/// Cluster judgment points into at most `k` anchors (largest clusters first).
// Long: deduplicate, cluster and pick each cluster's anchor over the same point tables.
pub fn anchors_from_points(
    scorer: &Scorer,
    points: &[Judgment],
    k: usize,
    seed: u64,
) -> Result<Vec<Anchor>> {
    if points.is_empty() {
        bail!("no judgment points to cluster");
    }
    // Identical points (a weak teacher repeats itself) are clustered once, with their count.
    let mut texts: Vec<String> = Vec::new();
    let mut first: Vec<usize> = Vec::new();
    let mut weight: Vec<usize> = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let t = if p.reason.is_empty() {
            p.name.clone()
        } else {
            format!("{}: {}", p.name, p.reason)
        };
        match texts.iter().position(|x| *x == t) {
            Some(j) => weight[j] += 1,
            None => {
                texts.push(t);
                first.push(i);
                weight.push(1);
            }
        }
    }
    let emb = scorer.embed(&texts)?;
    let k = k.min(texts.len()).max(1);
    let km = stats::kmeans(&emb.values, emb.dim, k, seed, 8);
    let nearest = km.nearest_points(&emb.values);
    let mut clusters: Vec<(usize, usize)> = (0..k)
        .map(|c| {
            let size = (0..texts.len())
                .filter(|&i| km.assignment[i] == c)
                .map(|i| weight[i])
                .sum::<usize>();
            (c, size)
        })
        .collect();
    clusters.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut anchors: Vec<Anchor> = Vec::new();
    for (c, size) in clusters {
        let p = &points[first[nearest[c]]];
        let mut name = anchor_id(&p.name);
        let base = name.clone();
        let mut n = 2;
        while anchors.iter().any(|a| a.name == name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        // Other members nearest the centroid first, distinct reasons only.
        let dim = emb.dim;
        let mut members: Vec<usize> = (0..texts.len())
            .filter(|&i| km.assignment[i] == c && i != nearest[c])
            .collect();
        let dist = |i: usize| -> f64 {
            emb.values[i * dim..(i + 1) * dim]
                .iter()
                .zip(km.centroid(c))
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        members.sort_by(|&a, &b| dist(a).total_cmp(&dist(b)));
        let mut exemplars: Vec<String> = Vec::new();
        for i in members {
            let t = texts[i].clone();
            if !exemplars.contains(&t) && exemplars.len() < 3 {
                exemplars.push(t);
            }
        }
        anchors.push(Anchor {
            name,
            definition: if p.reason.is_empty() {
                p.name.clone()
            } else {
                p.reason.clone()
            },
            exemplars,
            cluster_size: size,
            teacher_name: p.name.clone(),
        });
    }
    Ok(anchors)
}

/// What `discover` did per group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiscoverSummary {
    pub judged: BTreeMap<String, usize>,
    pub failed: BTreeMap<String, usize>,
    pub points: BTreeMap<String, usize>,
    pub anchors: BTreeMap<String, usize>,
    pub teacher: super::teacher::TeacherStats,
}

/// Judge samples of every group and write `rubrics/<group>.jsonl` (+ `.judgments.jsonl`).
pub fn discover(
    teacher: &Teacher,
    scorer: &Scorer,
    files: &[InputFile],
    groups: &Groups,
    out_dir: &Path,
    opts: &DiscoverOptions,
) -> Result<DiscoverSummary> {
    let before = teacher.stats();
    let samples = groups.sample(files, &opts.fields, opts.records_per_group, opts.seed)?;
    std::fs::create_dir_all(out_dir)?;
    let mut summary = DiscoverSummary {
        judged: BTreeMap::new(),
        failed: BTreeMap::new(),
        points: BTreeMap::new(),
        anchors: BTreeMap::new(),
        teacher: Default::default(),
    };
    for group in groups.names() {
        let Some(recs) = samples.get(&group) else {
            eprintln!(
                "mira discover: group {group} has no readable records in the inputs; skipped"
            );
            continue;
        };
        let reqs: Vec<ChatRequest> = recs
            .iter()
            .map(|r| judge_request(&source_of(r), r.text.as_deref().unwrap(), opts.max_chars))
            .collect();
        let replies = teacher.ask_all(&reqs, &format!("discover {group}"), parse_judgments);
        let mut points = Vec::new();
        let mut log = String::new();
        let mut failed = 0;
        for (r, reply) in recs.iter().zip(replies) {
            let row = match reply {
                Ok(js) => {
                    points.extend(js.iter().cloned());
                    json!({"id": r.id, "source": source_of(r), "dimensions": js})
                }
                Err(e) => {
                    failed += 1;
                    json!({"id": r.id, "source": source_of(r), "error": format!("{e:#}")})
                }
            };
            log.push_str(&row.to_string());
            log.push('\n');
        }
        crate::corpus::write_atomic(
            &out_dir.join(format!(
                "{}.judgments.jsonl",
                crate::names::file_name(&group)
            )),
            log.as_bytes(),
        )?;
        summary.judged.insert(group.clone(), recs.len() - failed);
        summary.failed.insert(group.clone(), failed);
        summary.points.insert(group.clone(), points.len());
        if points.is_empty() {
            bail!("group {group}: the teacher gave no usable judgment ({failed} requests failed)");
        }
        let anchors = anchors_from_points(scorer, &points, opts.anchors, opts.seed)?;
        summary.anchors.insert(group.clone(), anchors.len());
        write_rubric(&rubric_path(out_dir, &group), &anchors)?;
    }
    summary.teacher = teacher.stats().since(&before);
    Ok(summary)
}

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

use super::points::{self, Checked};
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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judgment {
    pub name: String,
    /// What the dimension measures, in general (empty when the teacher gave none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub definition: String,
    pub score: Option<f64>,
    pub reason: String,
}

impl Judgment {
    /// What the dimension means: its definition, else the reason, else the name.
    pub fn meaning(&self) -> &str {
        [&self.definition, &self.reason, &self.name]
            .into_iter()
            .map(|s| s.trim())
            .find(|s| !s.is_empty())
            .unwrap_or("")
    }
}

pub const JUDGE_SYSTEM: &str = "You are an expert data curator judging documents that may be used \
to train a language model. Judge the document in your own terms: name the quality dimensions \
that matter most for this kind of document (between 3 and 6). Give each dimension a short \
noun-phrase name (1 to 4 lower-case words naming a general quality, never a word taken from the \
document), a one-sentence definition of what a good document does on it, a one-sentence reason \
about this document, and a score from 0 (worst) to 10 (best). Reply with JSON only, in the form \
{\"dimensions\": [{\"name\": ..., \"definition\": ..., \"reason\": ..., \"score\": ...}]}.";

/// The worked example shown before every document, from a domain no corpus here is about (a
/// recipe), so that the teacher learns the form without copying the content.
pub const JUDGE_EXAMPLE_USER: &str = "Source: recipes\n\nDocument:\n<<<\nPancakes. Ingredients: \
flour, milk, two eggs. Mix the ingredients. Fry in a hot pan until golden. Serve.\n>>>";
pub const JUDGE_EXAMPLE_REPLY: &str = r#"{"dimensions": [{"name": "step clarity", "definition": "Steps are in order and each says exactly what to do.", "reason": "The steps are in order but the pan temperature and times are vague.", "score": 6}, {"name": "ingredients listed", "definition": "Every ingredient used is listed with its amount.", "reason": "Flour and milk have no amounts.", "score": 3}, {"name": "usefulness", "definition": "A reader can act on the text without looking elsewhere.", "reason": "A cook can follow it but must guess the quantities.", "score": 5}]}"#;

/// The worked example, which a reply must not copy.
pub fn judge_example() -> points::Example {
    points::Example {
        document: JUDGE_EXAMPLE_USER.to_string(),
        points: parse_judgments(JUDGE_EXAMPLE_REPLY).expect("the worked example parses"),
    }
}

/// The reply's JSON schema. Servers that turn schemas into grammars (llama.cpp, vLLM, SGLang)
/// then cannot emit a name that is not a short lower-case phrase, or a definition shorter than
/// five words.
pub fn judge_schema() -> Value {
    let sentence = |max_words: usize| {
        json!({
            "type": "string",
            "pattern": format!("^[A-Z][A-Za-z',-]*( [A-Za-z0-9',;()/-]+){{4,{max_words}}}[.]$"),
        })
    };
    json!({
        "type": "object",
        "properties": {
            "dimensions": {
                "type": "array",
                "minItems": 3,
                "maxItems": 6,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z]{3,16}( [a-z]{2,16}){0,3}$"},
                        "definition": sentence(24),
                        "reason": sentence(30),
                        "score": {"type": "integer", "minimum": 0, "maximum": 10}
                    },
                    "required": ["name", "definition", "reason", "score"]
                }
            }
        },
        "required": ["dimensions"]
    })
}

pub fn judge_request(source: &str, text: &str, max_chars: usize) -> ChatRequest {
    ChatRequest {
        system: JUDGE_SYSTEM.to_string(),
        examples: vec![(
            JUDGE_EXAMPLE_USER.to_string(),
            JUDGE_EXAMPLE_REPLY.to_string(),
        )],
        user: judge_user(source, text, max_chars),
        schema: Some(judge_schema()),
        max_tokens: 700,
        top_logprobs: None,
    }
}

/// The user message for one document (also the text point validation checks names against).
fn judge_user(source: &str, text: &str, max_chars: usize) -> String {
    format!(
        "Source: {source}\n\nDocument:\n<<<\n{}\n>>>",
        clip(text, max_chars)
    )
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
        let definition =
            text_field(o, &["definition", "meaning", "description"]).unwrap_or_default();
        out.push(Judgment {
            name,
            definition,
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

/// Cluster judgment points into at most `k` anchors (largest clusters first). Points are
/// clustered by canonical name and meaning ([`points::clustering_text`]), so format variants
/// of one dimension are one point with a weight. A cluster whose nearest point names a
/// dimension an earlier anchor already has takes its nearest member with a new name, or else
/// joins that anchor.
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
        let t = points::clustering_text(p);
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
    let dim = emb.dim;
    let mut clusters: Vec<(usize, usize)> = (0..k)
        .map(|c| {
            let size = (0..texts.len())
                .filter(|&i| km.assignment[i] == c)
                .map(|i| weight[i])
                .sum::<usize>();
            (c, size)
        })
        .filter(|&(_, size)| size > 0)
        .collect();
    clusters.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut anchors: Vec<Anchor> = Vec::new();
    for (c, size) in clusters {
        // Members nearest the centroid first.
        let dist = |i: usize| -> f64 {
            emb.values[i * dim..(i + 1) * dim]
                .iter()
                .zip(km.centroid(c))
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let mut members: Vec<usize> = (0..texts.len())
            .filter(|&i| km.assignment[i] == c)
            .collect();
        members.sort_by(|&a, &b| dist(a).total_cmp(&dist(b)).then(a.cmp(&b)));
        let name_of = |i: usize| points::canonical_name(&points[first[i]].name);
        let Some(&chosen) = members
            .iter()
            .find(|&&i| !anchors.iter().any(|a| a.name == name_of(i)))
        else {
            // Every member names a dimension already anchored: the cluster joins the anchor
            // its nearest point names.
            let name = name_of(members[0]);
            let a = anchors.iter_mut().find(|a| a.name == name).expect("named");
            a.cluster_size += size;
            continue;
        };
        // The definition most of the cluster's points with this name give (nearest first).
        let name = name_of(chosen);
        let mut best = chosen;
        for &i in &members {
            if name_of(i) == name && weight[i] > weight[best] {
                best = i;
            }
        }
        let p = &points[first[best]];
        let chosen = best;
        let mut exemplars: Vec<String> = Vec::new();
        for &i in &members {
            if i != chosen && !exemplars.contains(&texts[i]) && exemplars.len() < 3 {
                exemplars.push(texts[i].clone());
            }
        }
        anchors.push(Anchor {
            name,
            definition: p.meaning().to_string(),
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
    /// Judgment points the teacher gave, valid or not.
    pub points: BTreeMap<String, usize>,
    /// Points left after validation ([`points`]), the ones clustered.
    pub valid_points: BTreeMap<String, usize>,
    /// Rejected points by reason ([`points::REASONS`]).
    pub rejected: BTreeMap<String, BTreeMap<String, usize>>,
    pub anchors: BTreeMap<String, usize>,
    /// Groups that got fewer anchors than asked for, and why.
    pub warnings: Vec<String>,
    pub teacher: super::teacher::TeacherStats,
}

fn judge_requests(recs: &[crate::corpus::Record], opts: &DiscoverOptions) -> Vec<ChatRequest> {
    recs.iter()
        .map(|r| judge_request(&source_of(r), r.text.as_deref().unwrap(), opts.max_chars))
        .collect()
}

/// Every request `discover` would send, in order (for `--estimate`).
pub fn requests(
    files: &[InputFile],
    groups: &Groups,
    opts: &DiscoverOptions,
) -> Result<Vec<ChatRequest>> {
    let samples = groups.sample(files, &opts.fields, opts.records_per_group, opts.seed)?;
    Ok(samples
        .values()
        .flat_map(|recs| judge_requests(recs, opts))
        .collect())
}

/// Judge samples of every group and write `rubrics/<group>.jsonl` (+ `.judgments.jsonl`) and
/// the rubric report `rubrics/report.md`.
// Long: one loop per group: ask, log every reply, validate, cluster, write.
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
        valid_points: BTreeMap::new(),
        rejected: BTreeMap::new(),
        anchors: BTreeMap::new(),
        warnings: Vec::new(),
        teacher: Default::default(),
    };
    let example = judge_example();
    let mut rubrics = BTreeMap::new();
    for group in groups.names() {
        let Some(recs) = samples.get(&group) else {
            eprintln!(
                "mira discover: group {group} has no readable records in the inputs; skipped"
            );
            continue;
        };
        let reqs = judge_requests(recs, opts);
        let replies = teacher.ask_all(&reqs, &format!("discover {group}"), parse_judgments);
        let mut checked = Checked::default();
        let mut given = 0;
        let mut log = String::new();
        let mut failed = 0;
        for ((r, req), reply) in recs.iter().zip(&reqs).zip(replies) {
            let row = match reply {
                Ok(js) => {
                    given += js.len();
                    checked.add_reply(&js, &req.user, &example);
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
        summary.points.insert(group.clone(), given);
        summary
            .valid_points
            .insert(group.clone(), checked.kept.len());
        summary
            .rejected
            .insert(group.clone(), checked.rejected.clone());
        if checked.kept.is_empty() {
            bail!(
                "group {group}: no valid judgment point ({given} given, rejected by reason: {:?}; \
                 {failed} requests failed); see {}",
                checked.rejected,
                out_dir.display()
            );
        }
        let k = checked.anchors_supported(opts.anchors);
        let anchors = anchors_from_points(scorer, &checked.kept, k, opts.seed)?;
        if anchors.len() < opts.anchors {
            let w = format!(
                "group {group}: {} anchors, not {}: {} valid judgment points of {given} \
                 ({} rejected), {} per anchor needed",
                anchors.len(),
                opts.anchors,
                checked.kept.len(),
                checked.rejected_total(),
                points::POINTS_PER_ANCHOR
            );
            eprintln!("mira discover: warning: {w}");
            summary.warnings.push(w);
        }
        summary.anchors.insert(group.clone(), anchors.len());
        write_rubric(&rubric_path(out_dir, &group), &anchors)?;
        rubrics.insert(group.clone(), anchors);
    }
    crate::corpus::write_atomic(
        &out_dir.join("report.md"),
        rubric_report(&summary, &rubrics).as_bytes(),
    )?;
    summary.teacher = teacher.stats().since(&before);
    Ok(summary)
}

/// The rubric report: per group, the anchors with their definitions and cluster sizes, and
/// how many judgment points each rule rejected.
pub fn rubric_report(s: &DiscoverSummary, rubrics: &BTreeMap<String, Vec<Anchor>>) -> String {
    let mut md = String::from("# Rubrics\n\n");
    md.push_str(
        "| group | judged | failed | points | valid | anchors |\n|---|---|---|---|---|---|\n",
    );
    for (g, anchors) in rubrics {
        md.push_str(&format!(
            "| {g} | {} | {} | {} | {} | {} |\n",
            s.judged.get(g).unwrap_or(&0),
            s.failed.get(g).unwrap_or(&0),
            s.points.get(g).unwrap_or(&0),
            s.valid_points.get(g).unwrap_or(&0),
            anchors.len()
        ));
    }
    md.push_str("\n## Rejected judgment points\n\n| group |");
    for r in points::REASONS {
        md.push_str(&format!(" {r} |"));
    }
    md.push_str(&format!(
        "\n|---|{}\n",
        "---|".repeat(points::REASONS.len())
    ));
    for g in rubrics.keys() {
        md.push_str(&format!("| {g} |"));
        for r in points::REASONS {
            let n = s.rejected.get(g).and_then(|m| m.get(*r)).unwrap_or(&0);
            md.push_str(&format!(" {n} |"));
        }
        md.push('\n');
    }
    for w in &s.warnings {
        md.push_str(&format!("\n- warning: {w}"));
    }
    for (g, anchors) in rubrics {
        md.push_str(&format!(
            "\n\n## {g}\n\n| anchor | points | definition |\n|---|---|---|\n"
        ));
        for a in anchors {
            md.push_str(&format!(
                "| {} | {} | {} |\n",
                a.name,
                a.cluster_size,
                a.definition.replace('|', "\\|")
            ));
        }
    }
    md
}

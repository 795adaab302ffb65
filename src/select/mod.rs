//! MIRA selection: the method the engine exists for.
//!
//! ```text
//! group     per-source mean embeddings -> k-means            -> groups.json (+ groups.md)
//! discover  teacher judges samples free-form -> cluster points -> rubrics/<group>.jsonl
//! label     teacher scores samples on every anchor (or ingest) -> labels.jsonl (train/validation)
//! distill   frozen encoder + ridge head per group              -> students/<group>/ (+ validation)
//! reliability  per (source, anchor) MAE / Spearman thresholds  -> reliability.json
//! select    trimmed mean of unmasked anchors, token budget     -> kept corpus + report
//! run       all of the above from one TOML file, step by step, resumable
//! ```
//!
//! Every step reads and writes plain files a person can inspect and edit between steps.

pub mod cache;
pub mod cutoff;
pub mod discover;
pub mod distill;
pub mod estimate;
pub mod expected_scores;
pub mod export;
pub mod features;
pub mod group;
pub mod ingest;
pub mod label;
pub mod points;
pub mod reduce;
pub mod reliability;
pub mod reply_json;
pub mod report;
pub mod retain;
pub mod run;
pub mod run_config;
pub mod selection;
pub mod stats;
pub mod students;
pub mod teacher;

use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::corpus::{self, FieldNames, InputFile, Record};

/// A progress bar counting items (drawn only on a terminal, and only when `enabled`).
pub(crate) fn count_bar(total: u64, enabled: bool, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// `groups.json`: which group each source belongs to, and how the grouping was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Groups {
    /// source -> group name
    pub groups: BTreeMap<String, String>,
    /// group name -> its sources
    pub members: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub encoder: String,
    #[serde(default)]
    pub k: usize,
    /// Mean silhouette for every k tried (when k was chosen by silhouette).
    #[serde(default)]
    pub silhouette: BTreeMap<String, f64>,
    /// Records embedded per source.
    #[serde(default)]
    pub sampled: BTreeMap<String, usize>,
    /// Mean cosine similarity between the sources' mean embeddings within each group.
    #[serde(default)]
    pub intra_similarity: BTreeMap<String, f64>,
    /// Mean cosine similarity between sources of different groups, per pair of groups.
    #[serde(default)]
    pub inter_similarity: BTreeMap<String, f64>,
}

impl Groups {
    pub fn load(path: &Path) -> Result<Groups> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read groups file {}", path.display()))?;
        let g: Groups = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a groups.json", path.display()))?;
        for (source, group) in &g.groups {
            if !g.members.get(group).is_some_and(|m| m.contains(source)) {
                bail!(
                    "{}: source '{source}' maps to group '{group}' but is not among its members",
                    path.display()
                );
            }
        }
        Ok(g)
    }
    /// Groups from a source -> group map (members derived; nothing else recorded).
    pub fn from_sources(groups: BTreeMap<String, String>) -> Groups {
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (source, group) in &groups {
            members
                .entry(group.clone())
                .or_default()
                .push(source.clone());
        }
        Groups {
            k: members.len(),
            groups,
            members,
            encoder: String::new(),
            silhouette: BTreeMap::new(),
            sampled: BTreeMap::new(),
            intra_similarity: BTreeMap::new(),
            inter_similarity: BTreeMap::new(),
        }
    }

    /// Up to `per_group` records of each group's sources (see [`sample_records`]); sources in
    /// no group are not sampled.
    pub fn sample(
        &self,
        files: &[InputFile],
        fields: &FieldNames,
        per_group: usize,
        seed: u64,
    ) -> Result<BTreeMap<String, Vec<Record>>> {
        sample_records(files, fields, per_group, seed, |r| {
            self.group_of(&source_of(r)).map(str::to_string)
        })
    }

    /// The group of a source.
    pub fn group_of(&self, source: &str) -> Option<&str> {
        self.groups.get(source).map(String::as_str)
    }
    pub fn names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }
}

/// One rubric anchor: a quality dimension the teacher named, chosen as the judgment point
/// nearest its cluster's centroid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Anchor {
    /// Unique within the group; the student's output label.
    pub name: String,
    /// What the dimension measures (the anchor point's reason; edit freely).
    pub definition: String,
    /// Reasons of other points in the cluster, nearest the centroid first.
    #[serde(default)]
    pub exemplars: Vec<String>,
    /// Judgment points in the cluster.
    #[serde(default)]
    pub cluster_size: usize,
    /// The dimension name as the teacher wrote it.
    #[serde(default)]
    pub teacher_name: String,
}

/// Read `rubrics/<group>.jsonl` (one anchor per line).
pub fn read_rubric(path: &Path) -> Result<Vec<Anchor>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rubric {}", path.display()))?;
    let mut anchors: Vec<Anchor> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let a: Anchor = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a rubric anchor", path.display(), i + 1))?;
        if a.name.trim().is_empty() {
            bail!("{}:{}: anchor has an empty name", path.display(), i + 1);
        }
        if anchors.iter().any(|b| b.name == a.name) {
            bail!(
                "{}:{}: duplicate anchor name '{}'",
                path.display(),
                i + 1,
                a.name
            );
        }
        anchors.push(a);
    }
    if anchors.is_empty() {
        bail!("{}: rubric has no anchors", path.display());
    }
    Ok(anchors)
}

pub fn write_rubric(path: &Path, anchors: &[Anchor]) -> Result<()> {
    let mut out = String::new();
    for a in anchors {
        out.push_str(&serde_json::to_string(a)?);
        out.push('\n');
    }
    corpus::write_atomic(path, out.as_bytes())
}

/// The rubric file of a group.
pub fn rubric_path(dir: &Path, group: &str) -> std::path::PathBuf {
    dir.join(format!("{}.jsonl", crate::names::file_name(group)))
}

/// Records sampled per key: for each key, the `per_key` records with the smallest
/// `keyed_hash(seed, id)`. Order-independent and deterministic, streaming with bounded memory.
/// Records without text are skipped.
pub fn sample_records(
    files: &[InputFile],
    fields: &FieldNames,
    per_key: usize,
    seed: u64,
    key_of: impl Fn(&Record) -> Option<String>,
) -> Result<BTreeMap<String, Vec<Record>>> {
    // Max-heap of (hash, tie-break) per key: the largest is evicted.
    let mut heaps: BTreeMap<String, BinaryHeap<(u64, u64, HeapRecord)>> = BTreeMap::new();
    let mut seen = 0u64;
    for f in files {
        for rec in corpus::open_input(&f.path, fields)? {
            let rec = rec?;
            seen += 1;
            if rec.text.is_err() {
                continue;
            }
            let Some(key) = key_of(&rec) else { continue };
            let h = stats::keyed_hash(seed, &rec.id);
            let heap = heaps.entry(key).or_default();
            if heap.len() < per_key {
                heap.push((h, seen, HeapRecord(rec)));
            } else if let Some(top) = heap.peek() {
                if (h, seen) < (top.0, top.1) {
                    heap.pop();
                    heap.push((h, seen, HeapRecord(rec)));
                }
            }
        }
    }
    let out = heaps
        .into_iter()
        .map(|(k, heap)| {
            let mut v = heap.into_sorted_vec();
            v.sort_by_key(|(h, s, _)| (*h, *s));
            (k, v.into_iter().map(|(_, _, r)| r.0).collect())
        })
        .collect();
    Ok(out)
}

/// Orders nothing: heap entries compare by (hash, sequence), which are unique.
struct HeapRecord(Record);
impl PartialEq for HeapRecord {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for HeapRecord {}
impl PartialOrd for HeapRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapRecord {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// The source of a record, or `"unknown"` when it has none.
pub fn source_of(rec: &Record) -> String {
    rec.source.clone().unwrap_or_else(|| "unknown".to_string())
}

/// Cut a text to at most `max_chars` characters (on a char boundary) for a teacher prompt.
pub fn clip(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

//! The `mira run` config (`CONFIG.toml`): one section per step, paths relative to the file,
//! and [`RunConfig::validate`], which checks every step's settings before any step reads or
//! writes anything.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::discover::DiscoverOptions;
use super::distill::DistillOptions;
use super::group::GroupOptions;
use super::label::{IngestFormat, LabelOptions};
use super::reliability::Thresholds;
use super::selection::SelectOptions;
use crate::corpus::{FieldNames, TextFields};
use crate::Device;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where every step writes (relative paths in the config are relative to the config file).
    pub work_dir: PathBuf,
    /// Corpus files, directories or globs.
    pub inputs: Vec<PathBuf>,
    /// The encoder for grouping, rubric clustering and the students.
    pub encoder: PathBuf,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub fields: TextFields,
    #[serde(default)]
    pub group: GroupSection,
    pub teacher: Option<TeacherSection>,
    #[serde(default)]
    pub discover: DiscoverSection,
    #[serde(default)]
    pub label: LabelSection,
    #[serde(default)]
    pub distill: DistillSection,
    #[serde(default)]
    pub reliability: ReliabilitySection,
    #[serde(default)]
    pub select: SelectSection,
}

fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSection {
    /// 0: choose by silhouette.
    pub k: usize,
    pub max_k: usize,
    pub per_source: usize,
}
impl Default for GroupSection {
    fn default() -> Self {
        let d = GroupOptions::default();
        GroupSection {
            k: 0,
            max_k: d.max_k,
            per_source: d.per_source,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    pub base_url: String,
    pub model: String,
    /// Environment variable holding the API key.
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default)]
    pub price_prompt_per_mtok: f64,
    #[serde(default)]
    pub price_completion_per_mtok: f64,
    /// Response cache [default: <work_dir>/teacher-cache].
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}
fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> f64 {
    300.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverSection {
    pub records_per_group: usize,
    pub anchors: usize,
    /// Use these rubrics (a folder of `<group>.jsonl`) instead of asking the teacher.
    pub rubrics: Option<PathBuf>,
}
impl Default for DiscoverSection {
    fn default() -> Self {
        let d = DiscoverOptions::default();
        DiscoverSection {
            records_per_group: d.records_per_group,
            anchors: d.anchors,
            rubrics: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelSection {
    pub records_per_group: usize,
    pub validation_fraction: f64,
    /// Use this labels file (from an earlier `mira label`) instead of asking the teacher.
    pub labels: Option<PathBuf>,
    /// Or ingest labels produced elsewhere (datatrove output, score columns).
    pub ingest: Vec<PathBuf>,
    pub ingest_format: String,
    pub label_range: [f64; 2],
    /// `reply` (one JSON reply per record with a 0-10 score per anchor) or `probabilities`
    /// (one request per anchor; the expected 1-5 digit under the teacher's probabilities,
    /// mapped to 0-10; needs a server that returns `top_logprobs`). Not written when `reply`, so
    /// work dirs fingerprinted before the setting existed stay up to date.
    #[serde(skip_serializing_if = "is_reply")]
    pub scoring: String,
}
fn is_reply(scoring: &str) -> bool {
    scoring == "reply"
}
impl Default for LabelSection {
    fn default() -> Self {
        let d = LabelOptions::default();
        LabelSection {
            records_per_group: d.records_per_group,
            validation_fraction: d.validation_fraction,
            labels: None,
            ingest: Vec::new(),
            ingest_format: "auto".into(),
            label_range: [0.0, 10.0],
            scoring: d.scoring.to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// What the students' heads read: `auto` (chosen per group by validation), `pooler`, `cls`
    /// or `mean`.
    pub feature: String,
    /// Tokens of a document each student reads (default: the encoder's
    /// `max_position_embeddings`, as transformers' defaults read it).
    pub max_tokens: Option<usize>,
}
impl Default for DistillSection {
    fn default() -> Self {
        DistillSection {
            feature: "auto".into(),
            max_tokens: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReliabilitySection {
    pub max_mae: f64,
    pub min_spearman: f64,
    pub min_count: usize,
}
impl Default for ReliabilitySection {
    fn default() -> Self {
        let t = Thresholds::default();
        ReliabilitySection {
            max_mae: t.max_mae,
            min_spearman: t.min_spearman,
            min_count: t.min_count,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectSection {
    pub budget: f64,
    pub cutoff: String,
    pub trim: f64,
    pub unknown_source: String,
}
impl Default for SelectSection {
    fn default() -> Self {
        SelectSection {
            budget: 0.5,
            cutoff: "group".into(),
            trim: 0.1,
            unknown_source: "error".into(),
        }
    }
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = crate::checked::read_metadata(path)?;
        let mut cfg: RunConfig =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.work_dir);
        fix(&mut cfg.encoder);
        cfg.inputs.iter_mut().for_each(fix);
        cfg.label.ingest.iter_mut().for_each(fix);
        if let Some(p) = cfg.discover.rubrics.as_mut() {
            fix(p)
        }
        if let Some(p) = cfg.label.labels.as_mut() {
            fix(p)
        }
        if let Some(p) = cfg.teacher.as_mut().and_then(|t| t.cache_dir.as_mut()) {
            fix(p)
        }
        Ok(cfg)
    }

    pub(super) fn field_names(&self) -> FieldNames {
        self.fields.names()
    }
}

impl RunConfig {
    /// Check every step's settings, before any step reads or writes anything: a bad number in
    /// the last section must not cost the outputs of an earlier run.
    pub fn validate(&self) -> Result<()> {
        use crate::checked::{count, finite, in_range, non_negative, seconds};
        self.device.parse::<Device>()?;
        let g = &self.group;
        count("[group] k", g.k, 0, 1 << 10)?;
        count("[group] max_k", g.max_k, 2, 1 << 10)?;
        count("[group] per_source", g.per_source, 1, 1 << 24)?;
        if let Some(t) = &self.teacher {
            count("[teacher] concurrency", t.concurrency, 1, 1 << 16)?;
            seconds("[teacher] timeout_s", t.timeout_s)?;
            non_negative("[teacher] price_prompt_per_mtok", t.price_prompt_per_mtok)?;
            non_negative(
                "[teacher] price_completion_per_mtok",
                t.price_completion_per_mtok,
            )?;
        }
        count(
            "[discover] records_per_group",
            self.discover.records_per_group,
            1,
            1 << 24,
        )?;
        count("[discover] anchors", self.discover.anchors, 1, 1 << 10)?;
        let l = &self.label;
        count("[label] records_per_group", l.records_per_group, 1, 1 << 30)?;
        in_range(
            "[label] validation_fraction",
            l.validation_fraction,
            0.0,
            1.0,
            true,
            true,
        )?;
        l.ingest_format.parse::<IngestFormat>()?;
        l.scoring
            .parse::<crate::select::label::Scoring>()
            .map_err(|e| anyhow!("[label] {e}"))?;
        let [lo, hi] = l.label_range;
        finite("[label] label_range's low end", lo)?;
        finite("[label] label_range's high end", hi)?;
        if lo >= hi {
            bail!(
                "[label] label_range [{lo}, {hi}] is empty: the low end must be below the high end"
            );
        }
        self.distill_options()?;
        let r = &self.reliability;
        non_negative("[reliability] max_mae", r.max_mae)?;
        in_range(
            "[reliability] min_spearman",
            r.min_spearman,
            -1.0,
            1.0,
            false,
            false,
        )?;
        count("[reliability] min_count", r.min_count, 0, 1 << 30)?;
        self.select_options(Device::Cpu, false)?.validate()
    }

    pub(super) fn distill_options(&self) -> Result<DistillOptions> {
        Ok(DistillOptions {
            feature: self
                .distill
                .feature
                .parse()
                .map_err(|e| anyhow!("[distill] feature: {e}"))?,
            max_tokens: self
                .distill
                .max_tokens
                .map(|n| crate::checked::count("[distill] max_tokens", n, 3, 1 << 20))
                .transpose()?,
            ..Default::default()
        })
    }

    pub(super) fn select_options(&self, device: Device, progress: bool) -> Result<SelectOptions> {
        Ok(SelectOptions {
            budget: self.select.budget,
            cutoff: self.select.cutoff.parse()?,
            trim: self.select.trim,
            unknown: self.select.unknown_source.parse()?,
            fields: self.field_names(),
            device,
            progress,
            ..Default::default()
        })
    }
}

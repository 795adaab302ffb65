//! `mira run CONFIG.toml`: the whole method from one file, step by step, resumable.
//!
//! Each step records a fingerprint of its settings and of the steps before it in
//! `<work_dir>/steps/<step>.json`; a rerun skips a step whose fingerprint and outputs are
//! unchanged and redoes it (and everything after) otherwise. Teacher replies are cached on disk,
//! so a killed run resumes without paying twice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::discover::{self, DiscoverOptions};
use super::distill::{self, DistillOptions};
use super::group::{self, GroupOptions};
use super::label::{self, IngestFormat, IngestOptions, LabelOptions};
use super::reliability::{self, Thresholds};
use super::retain::{self, SelectOptions};
use super::teacher::{Teacher, TeacherConfig};
use super::{read_rubric, rubric_path, Groups};
use crate::corpus::{self, FieldNames};
use crate::{Device, Scorer};

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
    pub fields: Fields,
    #[serde(default)]
    pub group: GroupSection,
    pub teacher: Option<TeacherSection>,
    #[serde(default)]
    pub discover: DiscoverSection,
    #[serde(default)]
    pub label: LabelSection,
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
pub struct Fields {
    pub text: String,
    pub id: String,
    pub source: String,
}
impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
        }
    }
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
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
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

    fn field_names(&self) -> FieldNames {
        FieldNames {
            text: self.fields.text.clone(),
            id: self.fields.id.clone(),
            source: self.fields.source.clone(),
            keep_input: false,
            keep_raw: false,
        }
    }
}

/// Fingerprint of a step: its settings and the fingerprint of what it depends on.
fn fingerprint(parts: &[&dyn erased::Json]) -> String {
    let mut h = Sha256::new();
    // A new mira (prompts, numerics) redoes the steps.
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    for p in parts {
        h.update(p.json().as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hash of files' contents (a missing file hashes as such): downstream steps depend on what
/// upstream steps wrote (or a person edited), not only on their settings.
fn contents(paths: &[&Path]) -> String {
    let mut h = Sha256::new();
    for p in paths {
        match std::fs::read(p) {
            Ok(bytes) => h.update(&bytes),
            Err(_) => h.update(b"\0missing"),
        }
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

struct Steps {
    dir: PathBuf,
}

impl Steps {
    fn done(&self, step: &str, fp: &str, outputs: &[&Path]) -> bool {
        let stamp =
            std::fs::read_to_string(self.dir.join(format!("{step}.json"))).unwrap_or_default();
        stamp.contains(&format!("\"{fp}\"")) && outputs.iter().all(|p| p.exists())
    }
    fn mark(&self, step: &str, fp: &str, seconds: f64, summary: serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let v = serde_json::json!({"step": step, "fingerprint": fp, "seconds": seconds, "summary": summary});
        crate::corpus::write_atomic(
            &self.dir.join(format!("{step}.json")),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )
    }
}

fn say(step: &str, msg: &str) {
    eprintln!("mira run [{step}] {msg}");
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
        let [lo, hi] = l.label_range;
        finite("[label] label_range's low end", lo)?;
        finite("[label] label_range's high end", hi)?;
        if lo >= hi {
            bail!(
                "[label] label_range [{lo}, {hi}] is empty: the low end must be below the high end"
            );
        }
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

    fn select_options(&self, device: Device, progress: bool) -> Result<SelectOptions> {
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

/// Run every step of `cfg`; returns the selection. Each step is skipped while its fingerprint
/// (its settings and what it depends on) is unchanged and its outputs exist.
pub fn run(cfg: &RunConfig, progress: bool) -> Result<retain::Selection> {
    cfg.validate()?;
    let ctx = Ctx::new(cfg, progress)?;
    let fp_group = ctx.group()?;
    let groups = Groups::load(&ctx.work.join("groups.json"))?;
    let fp_discover = ctx.discover(&fp_group, &groups)?;
    let fp_label = ctx.label(&fp_discover, &groups)?;
    let fp_distill = ctx.distill(&fp_label)?;
    let fp_rel = ctx.reliability(&fp_distill)?;
    ctx.select(&fp_rel)
}

/// What every step reads: the config, the work folder and its step stamps, the inputs (and
/// their fingerprint), the encoder and the teacher.
struct Ctx<'a> {
    cfg: &'a RunConfig,
    work: &'a Path,
    steps: Steps,
    fields: FieldNames,
    files: Vec<corpus::InputFile>,
    inputs_fp: Vec<(String, u64, Option<std::time::SystemTime>)>,
    encoder: Scorer,
    teacher: Option<Teacher>,
    device: Device,
    progress: bool,
}

impl<'a> Ctx<'a> {
    fn new(cfg: &'a RunConfig, progress: bool) -> Result<Ctx<'a>> {
        let device: Device = cfg.device.parse()?;
        let work = &cfg.work_dir;
        std::fs::create_dir_all(work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        let steps = Steps {
            dir: work.join("steps"),
        };
        let fields = cfg.field_names();
        let files = corpus::expand_inputs_excluding(&cfg.inputs, std::slice::from_ref(work))?;
        let inputs_fp: Vec<(String, u64, Option<std::time::SystemTime>)> = files
            .iter()
            .map(|f| {
                let m = std::fs::metadata(&f.path).ok();
                (
                    f.path.display().to_string(),
                    m.as_ref().map_or(0, |m| m.len()),
                    m.and_then(|m| m.modified().ok()),
                )
            })
            .collect();
        let encoder = Scorer::load(&cfg.encoder, device)?;
        if let Some(note) = encoder.device_note() {
            eprintln!("mira: {note}");
        }
        let teacher = match &cfg.teacher {
            Some(t) => {
                let mut tc = TeacherConfig::new(&t.base_url, &t.model);
                tc.api_key = std::env::var(&t.api_key_env).ok().filter(|k| !k.is_empty());
                tc.concurrency = t.concurrency;
                tc.timeout = crate::checked::seconds("[teacher] timeout_s", t.timeout_s)?;
                tc.cache_dir = Some(
                    t.cache_dir
                        .clone()
                        .unwrap_or_else(|| work.join("teacher-cache")),
                );
                tc.price_prompt_per_mtok = t.price_prompt_per_mtok;
                tc.price_completion_per_mtok = t.price_completion_per_mtok;
                tc.progress = progress;
                Some(Teacher::new(tc)?)
            }
            None => None,
        };
        Ok(Ctx {
            cfg,
            work,
            steps,
            fields,
            files,
            inputs_fp,
            encoder,
            teacher,
            device,
            progress,
        })
    }

    fn need_teacher(&self, what: &str) -> Result<&Teacher> {
        self.teacher.as_ref().ok_or_else(|| {
            anyhow!("{what} needs a [teacher] section (or shipped {what} results in the config)")
        })
    }

    /// Step 1: `groups.json`.
    fn group(&self) -> Result<String> {
        // 1. group
        let groups_path = self.work.join("groups.json");
        let fp_group = fingerprint(&[
            &"group",
            &self.inputs_fp,
            &self.cfg.encoder,
            &self.cfg.group,
            &self.cfg.fields,
        ]);
        if self.steps.done("group", &fp_group, &[&groups_path]) {
            say("group", "up to date");
        } else {
            let t = Instant::now();
            let opts = GroupOptions {
                k: (self.cfg.group.k > 0).then_some(self.cfg.group.k),
                max_k: self.cfg.group.max_k,
                per_source: self.cfg.group.per_source,
                fields: self.fields.clone(),
                ..Default::default()
            };
            let g = group::group_sources(&self.encoder, &self.files, &opts)?;
            group::write(&g, &groups_path)?;
            say(
                "group",
                &format!(
                    "{} sources in {} groups -> {}",
                    g.groups.len(),
                    g.k,
                    groups_path.display()
                ),
            );
            self.steps.mark(
                "group",
                &fp_group,
                t.elapsed().as_secs_f64(),
                serde_json::json!({"k": g.k}),
            )?;
        }
        Ok(fp_group)
    }

    /// Step 2: `rubrics/<group>.jsonl` (or the shipped rubrics).
    fn discover(&self, fp_group: &str, groups: &Groups) -> Result<String> {
        let groups_path = self.work.join("groups.json");
        // 2. discover
        let rubrics = self.work.join("rubrics");
        let rubric_files: Vec<PathBuf> = groups
            .names()
            .iter()
            .map(|g| rubric_path(&rubrics, g))
            .collect();
        let shipped_rubrics: Vec<PathBuf> = match &self.cfg.discover.rubrics {
            Some(src) => groups.names().iter().map(|g| rubric_path(src, g)).collect(),
            None => Vec::new(),
        };
        let shipped_refs: Vec<&Path> = shipped_rubrics.iter().map(PathBuf::as_path).collect();
        let fp_discover = fingerprint(&[
            &"discover",
            &fp_group,
            &contents(&[&groups_path]),
            &contents(&shipped_refs),
            &self.cfg.discover,
            &self.cfg.teacher.as_ref().map(|t| &t.model),
        ]);
        let rubric_refs: Vec<&Path> = rubric_files.iter().map(PathBuf::as_path).collect();
        if self.steps.done("discover", &fp_discover, &rubric_refs) {
            say("discover", "up to date");
        } else if !self.cfg.label.ingest.is_empty() {
            say(
                "discover",
                "skipped: labels are ingested, their columns are the anchors",
            );
        } else {
            let t = Instant::now();
            let summary = if let Some(src) = &self.cfg.discover.rubrics {
                std::fs::create_dir_all(&rubrics)?;
                for g in groups.names() {
                    let from = rubric_path(src, &g);
                    read_rubric(&from).with_context(|| format!("shipped rubric for group {g}"))?;
                    let bytes = std::fs::read(&from)
                        .with_context(|| format!("cannot read {}", from.display()))?;
                    corpus::write_atomic(&rubric_path(&rubrics, &g), &bytes)?;
                }
                say(
                    "discover",
                    &format!("using the rubrics in {}", src.display()),
                );
                serde_json::json!({"rubrics": src})
            } else {
                let opts = DiscoverOptions {
                    records_per_group: self.cfg.discover.records_per_group,
                    anchors: self.cfg.discover.anchors,
                    fields: self.fields.clone(),
                    ..Default::default()
                };
                let s = discover::discover(
                    self.need_teacher("discover")?,
                    &self.encoder,
                    &self.files,
                    groups,
                    &rubrics,
                    &opts,
                )?;
                say(
                    "discover",
                    &format!("anchors per group {:?} -> {}", s.anchors, rubrics.display()),
                );
                serde_json::to_value(&s)?
            };
            self.steps
                .mark("discover", &fp_discover, t.elapsed().as_secs_f64(), summary)?;
        }
        Ok(fp_discover)
    }

    /// Step 3: `labels.jsonl` (teacher, shipped or ingested labels).
    fn label(&self, fp_discover: &str, groups: &Groups) -> Result<String> {
        let rubrics = self.work.join("rubrics");
        let rubric_files: Vec<PathBuf> = groups
            .names()
            .iter()
            .map(|g| rubric_path(&rubrics, g))
            .collect();
        let rubric_refs: Vec<&Path> = rubric_files.iter().map(PathBuf::as_path).collect();
        // 3. label
        let labels_path = self.work.join("labels.jsonl");
        let shipped_labels: Vec<&Path> =
            self.cfg.label.labels.iter().map(PathBuf::as_path).collect();
        let ingested: Vec<&Path> = self.cfg.label.ingest.iter().map(PathBuf::as_path).collect();
        let fp_label = fingerprint(&[
            &"label",
            &fp_discover,
            &contents(&rubric_refs),
            &contents(&shipped_labels),
            &contents(&ingested),
            &self.cfg.label,
        ]);
        if self.steps.done("label", &fp_label, &[&labels_path]) {
            say("label", "up to date");
        } else {
            let t = Instant::now();
            let summary = if !self.cfg.label.ingest.is_empty() {
                let opts = IngestOptions {
                    format: self.cfg.label.ingest_format.parse::<IngestFormat>()?,
                    range: (self.cfg.label.label_range[0], self.cfg.label.label_range[1]),
                    validation_fraction: self.cfg.label.validation_fraction,
                    fields: self.fields.clone(),
                    ..Default::default()
                };
                let rows = label::ingest(
                    &corpus::expand_inputs(&self.cfg.label.ingest)?,
                    Some(groups),
                    &opts,
                )?;
                label::write_labels(&labels_path, &rows)?;
                serde_json::json!({"ingested": rows.len()})
            } else if let Some(src) = &self.cfg.label.labels {
                let rows = label::read_labels(src)?;
                for r in &rows {
                    if groups.group_of(&r.source) != Some(r.group.as_str()) {
                        bail!(
                            "{}: record {} of source '{}' was labelled in group '{}' but groups.json puts the source in {:?}: these labels were made with a different grouping",
                            src.display(), r.id, r.source, r.group, groups.group_of(&r.source)
                        );
                    }
                }
                label::write_labels(&labels_path, &rows)?;
                say(
                    "label",
                    &format!("using the {} labels in {}", rows.len(), src.display()),
                );
                serde_json::json!({"labels": src, "rows": rows.len()})
            } else {
                let opts = LabelOptions {
                    records_per_group: self.cfg.label.records_per_group,
                    validation_fraction: self.cfg.label.validation_fraction,
                    fields: self.fields.clone(),
                    ..Default::default()
                };
                let s = label::label(
                    self.need_teacher("label")?,
                    &self.files,
                    groups,
                    &rubrics,
                    &labels_path,
                    &opts,
                )?;
                say(
                    "label",
                    &format!(
                        "{} rows ({} failed) -> {}",
                        s.rows,
                        s.failed,
                        labels_path.display()
                    ),
                );
                serde_json::to_value(&s)?
            };
            self.steps
                .mark("label", &fp_label, t.elapsed().as_secs_f64(), summary)?;
        }
        Ok(fp_label)
    }

    /// Step 4: `students/` and `students/validation.json`.
    fn distill(&self, fp_label: &str) -> Result<String> {
        let labels_path = self.work.join("labels.jsonl");
        // 4. distill
        let students = self.work.join("students");
        let validation_path = students.join("validation.json");
        let fp_distill = fingerprint(&[
            &"distill",
            &fp_label,
            &contents(&[&labels_path]),
            &self.cfg.encoder,
        ]);
        if self.steps.done("distill", &fp_distill, &[&validation_path]) {
            say("distill", "up to date");
        } else {
            let t = Instant::now();
            let rows = label::read_labels(&labels_path)?;
            let v = distill::distill(&self.encoder, &rows, &students, &DistillOptions::default())?;
            say(
                "distill",
                &format!("{} students -> {}", v.students.len(), students.display()),
            );
            self.steps.mark(
                "distill",
                &fp_distill,
                t.elapsed().as_secs_f64(),
                serde_json::json!({"students": v.students.len()}),
            )?;
        }
        Ok(fp_distill)
    }

    /// Step 5: `reliability.json`.
    fn reliability(&self, fp_distill: &str) -> Result<String> {
        let validation_path = self.work.join("students").join("validation.json");
        // 5. reliability
        let rel_path = self.work.join("reliability.json");
        let fp_rel = fingerprint(&[
            &"reliability",
            &fp_distill,
            &contents(&[&validation_path]),
            &self.cfg.reliability,
        ]);
        if self.steps.done("reliability", &fp_rel, &[&rel_path]) {
            say("reliability", "up to date");
        } else {
            let t = Instant::now();
            let v = distill::read_validation(&validation_path)?;
            let th = Thresholds {
                max_mae: self.cfg.reliability.max_mae,
                min_spearman: self.cfg.reliability.min_spearman,
                min_count: self.cfg.reliability.min_count,
            };
            let r = reliability::mask(&v, &th);
            reliability::write(&r, &rel_path)?;
            let masked = r.cells.iter().filter(|c| c.masked).count();
            say(
                "reliability",
                &format!(
                    "{masked} of {} (source, anchor) cells masked",
                    r.cells.len()
                ),
            );
            self.steps.mark(
                "reliability",
                &fp_rel,
                t.elapsed().as_secs_f64(),
                serde_json::json!({"masked": masked}),
            )?;
        }
        Ok(fp_rel)
    }

    /// Step 6: `selected/` (scores, kept corpus, report).
    fn select(&self, fp_rel: &str) -> Result<retain::Selection> {
        let (rel_path, groups_path) = (
            self.work.join("reliability.json"),
            self.work.join("groups.json"),
        );
        let students = self.work.join("students");
        let groups = Groups::load(&groups_path)?;
        // 6. select
        let selected = self.work.join("selected");
        let fp_select = fingerprint(&[
            &"select",
            &fp_rel,
            &contents(&[&rel_path, &groups_path]),
            &self.cfg.select,
            &self.inputs_fp,
        ]);
        let sel_json = selected.join("selection.json");
        if self.steps.done("select", &fp_select, &[&sel_json]) {
            say("select", "up to date");
            let text = std::fs::read_to_string(&sel_json)?;
            return Ok(serde_json::from_str(&text)?);
        }
        let prior = std::fs::read_to_string(self.steps.dir.join("select.json")).unwrap_or_default();
        if selected.exists() && !prior.contains(&fp_select) && !prior.is_empty() {
            // Settings changed since a previous (possibly partial) selection: start afresh.
            std::fs::remove_dir_all(&selected)?;
        }
        // Fingerprint first, so partial work of this same configuration is resumed, not discarded.
        self.steps.mark(
            "select",
            &fp_select,
            0.0,
            serde_json::json!({"state": "running"}),
        )?;
        let t = Instant::now();
        let opts = self.cfg.select_options(self.device, self.progress)?;
        let rel = reliability::Reliability::load(&rel_path)?;
        let sel = retain::select(&self.files, &groups, &students, &rel, &selected, &opts)?;
        say(
            "select",
            &format!(
                "kept {} of {} tokens ({} of {} records) -> {}",
                sel.total.tokens_kept,
                sel.total.tokens,
                sel.total.records_kept,
                sel.total.records,
                selected.join("report.md").display()
            ),
        );
        self.steps.mark(
            "select",
            &fp_select,
            t.elapsed().as_secs_f64(),
            retain::summary_json(&sel),
        )?;
        Ok(sel)
    }
}

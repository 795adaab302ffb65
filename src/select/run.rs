//! `mira run CONFIG.toml`: the whole method from one file, step by step, resumable.
//!
//! Each step records a fingerprint of its settings and of the steps before it in
//! `<work_dir>/steps/<step>.json`; a rerun skips a step whose fingerprint and outputs are
//! unchanged and redoes it (and everything after) otherwise. Teacher replies are cached on disk,
//! so a killed run resumes without paying twice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::discover::{self, DiscoverOptions};
use super::distill;
use super::group::{self, GroupOptions};
use super::label::{self, IngestFormat, IngestOptions, LabelOptions};
use super::reliability::{self, Thresholds};
use super::retain;
pub use super::run_config::*;
use super::teacher::{Teacher, TeacherConfig};
use super::{read_rubric, rubric_path, Groups};
use crate::corpus::{self, FieldNames};
use crate::{Device, Scorer};

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
    /// Run `step` unless its fingerprint and outputs say it is up to date; time it and stamp
    /// it with the summary it returns.
    fn run(
        &self,
        name: &str,
        fp: &str,
        outputs: &[&Path],
        step: impl FnOnce() -> Result<serde_json::Value>,
    ) -> Result<()> {
        if self.done(name, fp, outputs) {
            say(name, "up to date");
            return Ok(());
        }
        let t = Instant::now();
        let summary = step()?;
        self.mark(name, fp, t.elapsed().as_secs_f64(), summary)
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
                let mut tc = TeacherConfig::from_user(
                    (&t.base_url, &t.model),
                    std::env::var(&t.api_key_env).ok(),
                    (t.concurrency, t.timeout_s),
                    (t.price_prompt_per_mtok, t.price_completion_per_mtok),
                    [
                        "[teacher] concurrency",
                        "[teacher] timeout_s",
                        "[teacher] price_prompt_per_mtok",
                        "[teacher] price_completion_per_mtok",
                    ],
                )?;
                tc.cache_dir = Some(
                    t.cache_dir
                        .clone()
                        .unwrap_or_else(|| work.join("teacher-cache")),
                );
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
        let groups_path = self.work.join("groups.json");
        let fp_group = fingerprint(&[
            &"group",
            &self.inputs_fp,
            &self.cfg.encoder,
            &self.cfg.group,
            &self.cfg.fields,
        ]);
        self.steps.run("group", &fp_group, &[&groups_path], || {
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
            Ok(serde_json::json!({"k": g.k}))
        })?;
        Ok(fp_group)
    }

    /// Step 2: `rubrics/<group>.jsonl` (or the shipped rubrics).
    fn discover(&self, fp_group: &str, groups: &Groups) -> Result<String> {
        let groups_path = self.work.join("groups.json");
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
            // The request itself: a changed prompt, example or schema discovers again.
            &discover::judge_request("", "", 0).messages(),
            &discover::judge_schema(),
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
    // Long: the label step's three sources (teacher, shipped labels, ingested labels) and their
    // fingerprint, side by side.
    fn label(&self, fp_discover: &str, groups: &Groups) -> Result<String> {
        let rubrics = self.work.join("rubrics");
        let rubric_files: Vec<PathBuf> = groups
            .names()
            .iter()
            .map(|g| rubric_path(&rubrics, g))
            .collect();
        let rubric_refs: Vec<&Path> = rubric_files.iter().map(PathBuf::as_path).collect();
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
            // The request itself: a changed prompt labels again; so does a new reply check.
            &super::label::score_request(&[], "", "", 0).messages(),
            &super::label::POSITION_ECHO,
            &(self.cfg.label.scoring == "probabilities")
                .then(super::expected_scores::request_fingerprint),
        ]);
        self.steps.run("label", &fp_label, &[&labels_path], || {
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
                    scoring: self.cfg.label.scoring.parse()?,
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
            Ok(summary)
        })?;
        Ok(fp_label)
    }

    /// Step 4: `students/` and `students/validation.json`.
    fn distill(&self, fp_label: &str) -> Result<String> {
        let labels_path = self.work.join("labels.jsonl");
        let students = self.work.join("students");
        let validation_path = students.join("validation.json");
        let opts = self.cfg.distill_options()?;
        let max_tokens = opts.max_tokens.unwrap_or(self.encoder.max_positions());
        let fp_distill = fingerprint(&[
            &"distill",
            &fp_label,
            &contents(&[&labels_path]),
            &self.cfg.encoder,
            &format!("feature {}", self.cfg.distill.feature),
            &format!("max_tokens {max_tokens}"),
        ]);
        self.steps
            .run("distill", &fp_distill, &[&validation_path], || {
                let rows = label::read_labels(&labels_path)?;
                let v = distill::distill(&self.encoder, &rows, &students, &opts)?;
                let heads: Vec<String> = v
                    .students
                    .iter()
                    .map(|(g, i)| format!("{g}: {} ({}/{})", i.feature, i.n_train, i.n_validation))
                    .collect();
                say(
                    "distill",
                    &format!(
                        "{} students (feature, train/validation rows: {}) -> {}",
                        v.students.len(),
                        heads.join(", "),
                        students.display()
                    ),
                );
                Ok(serde_json::json!({"students": v.students.len()}))
            })?;
        Ok(fp_distill)
    }

    /// Step 5: `reliability.json`.
    fn reliability(&self, fp_distill: &str) -> Result<String> {
        let validation_path = self.work.join("students").join("validation.json");
        let rel_path = self.work.join("reliability.json");
        let fp_rel = fingerprint(&[
            &"reliability",
            &fp_distill,
            &contents(&[&validation_path]),
            &self.cfg.reliability,
        ]);
        self.steps.run("reliability", &fp_rel, &[&rel_path], || {
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
            Ok(serde_json::json!({"masked": masked}))
        })?;
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

//! The score/embed job: read records, tokenize in parallel, pack, run the engine, write one
//! output line per input record in input order. Records that cannot be scored are written with an
//! `error` field (or stop the job with `strict`); nothing is dropped.
//!
//! This is the simple in-order loop (chunks of records processed one after another); the
//! streaming, multi-threaded corpus job replaces the loop body, not its contract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::corpus::{self, FieldNames, InputFile, Record, RecordError, RecordSink};
use crate::Scorer;

/// What the job computes for each record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `{"id", "embedding": [...]}`
    Embed,
    /// `{"id", "scores": {"<label>": x}}`
    Score,
}

/// How output rows look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `{"id", "source", "scores": {...}}` or `{"id", "source", "embedding": [...]}`.
    Jsonl,
    /// dolma attribute side-cars: `{"id", "source", "attributes": {"<experiment>__<model>__<label>":
    /// [[0, n_chars, score]]}}`, spans in Unicode code points, written to
    /// `<output-dir>/attributes/<experiment>/<the input's relative path>` (same name and
    /// compression as the documents file), one row per document row, in order.
    Dolma { experiment: String, model: String },
}

#[derive(Debug, Clone)]
pub struct JobOptions {
    pub format: Format,
    pub fields: FieldNames,
    /// Fail on the first bad record (naming file and line) instead of writing an error row.
    pub strict: bool,
    /// Records read before a chunk is tokenized and run.
    pub chunk_records: usize,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            format: Format::Jsonl,
            fields: FieldNames::default(),
            strict: false,
            chunk_records: 4096,
            progress: true,
        }
    }
}

/// Final accounting of a job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    pub files: usize,
    /// Files whose output was already complete (resume).
    pub files_skipped: usize,
    pub records: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, usize>,
    pub tokens: usize,
    pub seconds: f64,
    pub docs_per_s: f64,
    pub tokens_per_s: f64,
}

/// Where a job writes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Every record of every input, in order, to one file (`-` for stdout).
    File(PathBuf),
    /// One output per input under this directory, mirroring the input's relative path, each
    /// written atomically and followed by a `<output>.done` marker; inputs whose output and marker
    /// both exist are skipped, so a killed job resumes where it stopped.
    PerFile(PathBuf),
}

/// Run `task` over every input file, writing one line per record to `output`.
pub fn run_job(
    scorer: &Scorer,
    task: Task,
    inputs: &[InputFile],
    output: &Output,
    opts: &JobOptions,
) -> Result<JobSummary> {
    if matches!(opts.format, Format::Dolma { .. }) {
        if task != Task::Score {
            bail!("dolma attributes hold scores: use `mira score` with --format dolma");
        }
        if !matches!(output, Output::PerFile(_)) {
            bail!("--format dolma writes one attribute file per input: use --output-dir");
        }
    }
    if task == Task::Score && scorer.head().is_none() {
        bail!(
            "{} has no classification head: use `mira embed`, or a checkpoint with a classifier",
            scorer.model_dir().display()
        );
    }
    let total_bytes: u64 = inputs
        .iter()
        .map(|f| {
            std::fs::metadata(&f.path)
                .map(|m| m.len())
                .map_err(|e| anyhow::anyhow!("cannot open input {}: {e}", f.path.display()))
        })
        .sum::<Result<u64>>()?;
    let bar = progress_bar(opts.progress, total_bytes);
    let start = Instant::now();
    let mut summary = JobSummary {
        files: inputs.len(),
        ..Default::default()
    };
    let mut done_bytes = 0u64;
    let mut single: Option<Box<dyn RecordSink>> = match output {
        Output::File(path) => Some(Box::new(corpus::JsonlWriter::create(path)?)),
        Output::PerFile(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            None
        }
    };
    for input in inputs {
        let file_bytes = std::fs::metadata(&input.path)?.len();
        match (&mut single, output) {
            (Some(sink), _) => run_file(
                scorer,
                task,
                input,
                sink.as_mut(),
                opts,
                &mut summary,
                &bar,
                start,
            )?,
            (None, Output::PerFile(dir)) => {
                let out = match &opts.format {
                    Format::Jsonl => dir.join(corpus::output_name(&input.rel)),
                    Format::Dolma { experiment, .. } => {
                        dir.join("attributes").join(experiment).join(&input.rel)
                    }
                };
                let marker = done_marker(&out);
                if marker.exists() && out.exists() {
                    summary.files_skipped += 1;
                } else {
                    if let Some(parent) = out.parent() {
                        std::fs::create_dir_all(parent)
                            .with_context(|| format!("cannot create {}", parent.display()))?;
                    }
                    corpus::remove_stale_temps(&out)?;
                    let mut sink: Box<dyn RecordSink> =
                        Box::new(corpus::JsonlWriter::create(&out)?);
                    let before = summary.clone();
                    run_file(
                        scorer,
                        task,
                        input,
                        sink.as_mut(),
                        opts,
                        &mut summary,
                        &bar,
                        start,
                    )?;
                    sink.finish()?;
                    let file_summary = serde_json::json!({
                        "input": input.path.display().to_string(),
                        "records": summary.records - before.records,
                        "ok": summary.ok - before.ok,
                    });
                    corpus::write_atomic(&marker, format!("{file_summary}\n").as_bytes())?;
                }
            }
            (None, Output::File(_)) => unreachable!("a single output always has a sink"),
        }
        done_bytes += file_bytes;
        bar.set_position(done_bytes);
        update(&bar, &summary, start);
    }
    if let Some(sink) = single {
        sink.finish()?;
    }
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    summary.docs_per_s = summary.records as f64 / summary.seconds.max(1e-9);
    summary.tokens_per_s = summary.tokens as f64 / summary.seconds.max(1e-9);
    Ok(summary)
}

/// `<output>.done`, written after the output is complete.
pub fn done_marker(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_os_string();
    name.push(".done");
    PathBuf::from(name)
}

/// Read one input file in chunks and run each chunk into `sink`.
#[allow(clippy::too_many_arguments)]
fn run_file(
    scorer: &Scorer,
    task: Task,
    input: &InputFile,
    sink: &mut dyn RecordSink,
    opts: &JobOptions,
    summary: &mut JobSummary,
    bar: &ProgressBar,
    start: Instant,
) -> Result<()> {
    let mut chunk: Vec<Record> = Vec::with_capacity(opts.chunk_records);
    for rec in corpus::open_input(&input.path, &opts.fields)? {
        chunk.push(rec?);
        if chunk.len() == opts.chunk_records {
            process_chunk(scorer, task, &mut chunk, sink, opts, summary)?;
            update(bar, summary, start);
        }
    }
    process_chunk(scorer, task, &mut chunk, sink, opts, summary)
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg} eta {eta}")
            .expect("valid template"),
    );
    bar
}

fn update(bar: &ProgressBar, s: &JobSummary, start: Instant) {
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    bar.set_message(format!(
        "{} docs, {:.0} docs/s, {:.0} tok/s",
        s.records,
        s.records as f64 / secs,
        s.tokens as f64 / secs
    ));
}

/// Non-finite floats become JSON `null` in `f32_value`; such a row is an error, not a score.
fn contains_non_finite(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(contains_non_finite),
        Value::Object(m) => m.values().any(contains_non_finite),
        _ => false,
    }
}

/// `file:line` of the first and last record of a chunk, for errors that concern all of it.
fn span(chunk: &[Record]) -> String {
    match (chunk.first(), chunk.last()) {
        (Some(a), Some(b)) => format!("while running records {} to {}", a.location, b.location),
        _ => "while running an empty chunk".into(),
    }
}

/// A JSON number that prints as the shortest decimal that reads back as the same f32
/// (`0.1`, not `0.10000000149011612`): a third of the bytes per embedding value, no precision lost.
fn f32_value(v: f32) -> Value {
    // Rust's float Display is the shortest round-trip representation.
    let short: f64 = v.to_string().parse().expect("a float's Display parses");
    serde_json::Number::from_f64(short).map_or(Value::Null, Value::Number)
}

fn process_chunk(
    scorer: &Scorer,
    task: Task,
    chunk: &mut Vec<Record>,
    sink: &mut dyn RecordSink,
    opts: &JobOptions,
    summary: &mut JobSummary,
) -> Result<()> {
    if chunk.is_empty() {
        return Ok(());
    }
    // Tokenize the usable records in parallel; a tokenizer failure marks only its record.
    let texts: Vec<(usize, &str)> = chunk
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.text.as_ref().ok().map(|t| (i, t.as_str())))
        .collect();
    let encoded: Vec<Result<Vec<u32>>> = {
        use rayon::prelude::*;
        texts
            .par_iter()
            .map(|(_, t)| scorer.tokenize_one(t))
            .collect()
    };
    let mut failures: BTreeMap<usize, RecordError> = BTreeMap::new();
    let mut ids = Vec::with_capacity(texts.len());
    let mut owners = Vec::with_capacity(texts.len());
    for ((i, _), enc) in texts.iter().zip(encoded) {
        match enc {
            Ok(v) => {
                ids.push(v);
                owners.push(*i);
            }
            Err(e) => {
                failures.insert(
                    *i,
                    RecordError::Failed(format!("{}: {e:#}", chunk[*i].location)),
                );
            }
        }
    }
    let outputs: Vec<Value> = match task {
        Task::Score => {
            let s = scorer.score_ids(&ids).with_context(|| span(chunk))?;
            (0..ids.len())
                .map(|d| {
                    let m: Map<String, Value> = s
                        .labels
                        .iter()
                        .zip(s.row(d))
                        .map(|(l, v)| (l.clone(), f32_value(*v)))
                        .collect();
                    Value::Object(m)
                })
                .collect()
        }
        Task::Embed => {
            let e = scorer.embed_ids(&ids).with_context(|| span(chunk))?;
            (0..ids.len())
                .map(|d| Value::Array(e.row(d).iter().map(|v| f32_value(*v)).collect()))
                .collect()
        }
    };
    let key = match (&opts.format, task) {
        (Format::Dolma { .. }, _) => "attributes",
        (Format::Jsonl, Task::Score) => "scores",
        (Format::Jsonl, Task::Embed) => "embedding",
    };
    let mut results = owners.iter().zip(outputs);
    for (i, rec) in chunk.iter().enumerate() {
        summary.records += 1;
        let mut obj = Map::new();
        obj.insert("id".into(), Value::String(rec.id.clone()));
        if let Some(src) = &rec.source {
            obj.insert("source".into(), Value::String(src.clone()));
        }
        let mut result = None;
        if rec.text.is_ok() && !failures.contains_key(&i) {
            let (&owner, value) = results.next().expect("one result per usable record");
            debug_assert_eq!(owner, i);
            if contains_non_finite(&value) {
                failures.insert(
                    i,
                    RecordError::Failed(format!(
                        "{}: the model produced NaN or infinity",
                        rec.location
                    )),
                );
            } else {
                result = Some(value);
            }
        }
        if let (Format::Dolma { experiment, model }, Some(Value::Object(scores))) =
            (&opts.format, &result)
        {
            let n_chars = rec.text.as_ref().map_or(0, |t| t.chars().count());
            let attributes: Map<String, Value> = scores
                .iter()
                .map(|(label, v)| {
                    (
                        format!("{experiment}__{model}__{label}"),
                        serde_json::json!([[0, n_chars, v]]),
                    )
                })
                .collect();
            result = Some(Value::Object(attributes));
        }
        let error = rec.text.as_ref().err().or(failures.get(&i));
        if let Some(err) = error {
            if opts.strict {
                bail!("{err}");
            }
            *summary.errors.entry(err.kind().to_string()).or_default() += 1;
            if matches!(opts.format, Format::Dolma { .. }) {
                // Rows must stay aligned with the documents file: an empty attribute set.
                obj.insert(key.into(), Value::Object(Map::new()));
            }
            obj.insert("error".into(), Value::String(err.to_string()));
        } else if let Some(value) = result {
            summary.ok += 1;
            obj.insert(key.into(), value);
        }
        sink.write(&Value::Object(obj))?;
    }
    summary.tokens += ids.iter().map(Vec::len).sum::<usize>();
    chunk.clear();
    Ok(())
}

//! The score/embed job: read records, tokenize in parallel, pack, run the engine, write one
//! output line per input record in input order. Records that cannot be scored are written with an
//! `error` field (or stop the job with `strict`); nothing is dropped.
//!
//! This is the simple in-order loop (chunks of records processed one after another); the
//! streaming, multi-threaded corpus job replaces the loop body, not its contract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::corpus::{self, FieldNames, InputFile, Record, RecordError, RecordSink};
use crate::names::dolma_key_part;
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
    /// Parquet: `id`, `source`, `error` and one `float32` column per label (or an `embedding`
    /// list column).
    Parquet,
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
    /// Compression of per-file JSON Lines outputs (default: as the input).
    pub compression: corpus::OutputCompression,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            format: Format::Jsonl,
            fields: FieldNames::default(),
            strict: false,
            chunk_records: 4096,
            progress: true,
            compression: corpus::OutputCompression::Keep,
        }
    }
}

/// Final accounting of a job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    pub files: usize,
    /// Files whose output was already complete (resume).
    pub files_skipped: usize,
    /// Files another live job was writing (same output folder), left to it.
    pub files_busy: usize,
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
///
/// Four stages on their own threads, joined by bounded channels so memory stays bounded however
/// large the corpus: a reader (chunks of records, file by file), a tokenizer (rayon-parallel within
/// a chunk), the engine (pack + forward), and the writer (this thread). Every stage is a FIFO, so
/// chunks reach the writer in input order, and the engine works on one chunk while the next is
/// being read and tokenized.
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
    if opts.fields.keep_input && opts.format != Format::Jsonl {
        bail!("--keep-input copies input records into JSON Lines outputs: use --format jsonl");
    }
    if task == Task::Score && scorer.head().is_none() {
        bail!(
            "{} has no classification head: use `mira embed`, or a checkpoint with a classifier",
            scorer.model_dir().display()
        );
    }
    let start = Instant::now();
    let mut summary = JobSummary {
        files: inputs.len(),
        ..Default::default()
    };
    // Per-file outputs already complete are skipped (resume).
    let mut todo: Vec<(&InputFile, Option<PathBuf>)> = Vec::new();
    match output {
        Output::File(path) => {
            corpus::refuse_input(path, inputs)?;
            todo.extend(inputs.iter().map(|f| (f, None)))
        }
        Output::PerFile(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let mut live = corpus::LiveWriters::default();
            let input_ids = corpus::InputIds::of(inputs);
            for f in inputs {
                let out = match &opts.format {
                    Format::Jsonl => dir.join(corpus::output_name_compressed(
                        &f.rel,
                        "jsonl",
                        opts.compression,
                    )),
                    Format::Parquet => dir.join(corpus::output_name(&f.rel, "parquet")),
                    Format::Dolma { experiment, .. } => {
                        dir.join("attributes").join(experiment).join(&f.rel)
                    }
                };
                input_ids.refuse(&out)?;
                if corpus::is_done(dir, &out) {
                    summary.files_skipped += 1;
                } else if live.holds(&out) {
                    // Another job on the same output folder is writing it: leave it to that job.
                    eprintln!(
                        "note: {} is being written by another job; skipped (rerun to check it is done)",
                        out.display()
                    );
                    summary.files_busy += 1;
                } else {
                    todo.push((f, Some(out)));
                }
            }
        }
    }
    let total_bytes: u64 = todo
        .iter()
        .map(|(f, _)| std::fs::metadata(&f.path).map_or(0, |m| m.len()))
        .sum();
    let bar = progress_bar(opts.progress, total_bytes);
    let create = |path: &Path| -> Result<Box<dyn RecordSink>> {
        Ok(match opts.format {
            Format::Parquet => Box::new(corpus::ParquetWriter::create(
                path,
                parquet_columns(scorer, task),
            )?),
            _ => Box::new(corpus::JsonlWriter::create(path)?),
        })
    };
    let mut single: Option<Box<dyn RecordSink>> = match output {
        Output::File(path) => Some(create(path)?),
        Output::PerFile(_) => None,
    };
    std::thread::scope(|scope| -> Result<()> {
        let (read_tx, read_rx) = sync_channel::<Result<Chunk>>(2);
        let (tok_tx, tok_rx) = sync_channel::<Result<Tokenized>>(2);
        let (run_tx, run_rx) = sync_channel::<Result<(Tokenized, Vec<Result<Value, String>>)>>(1);
        let files: Vec<&InputFile> = todo.iter().map(|(f, _)| *f).collect();
        scope.spawn(move || read_stage(&files, opts, read_tx));
        scope.spawn(move || {
            for chunk in read_rx {
                if tok_tx
                    .send(chunk.map(|c| tokenize_chunk(scorer, c)))
                    .is_err()
                {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for tok in tok_rx {
                let scored = tok.and_then(|t| run_chunk(scorer, task, &t).map(|out| (t, out)));
                if run_tx.send(scored).is_err() {
                    return;
                }
            }
        });
        // Writer: open each file's output on its first chunk, finish it on its last.
        let mut sink: Option<Box<dyn RecordSink>> = None;
        let mut done_bytes = 0u64;
        let (mut files_done, mut read_errors_before_file) = (0usize, 0usize);
        for scored in run_rx {
            let (tok, outputs) = scored?;
            let (input, out) = &todo[tok.chunk.file];
            if let (None, Some(out)) = (&sink, out) {
                if let Some(parent) = out.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                corpus::remove_stale_temps(out)?;
                sink = Some(create(out)?);
            }
            let writer = match (&mut single, &mut sink) {
                (Some(w), _) | (None, Some(w)) => w.as_mut(),
                (None, None) => unreachable!("a per-file sink is opened above"),
            };
            let before = (summary.records, summary.ok);
            write_chunk(&tok, task, outputs, writer, opts, &mut summary)?;
            tok.chunk
                .file_records
                .fetch_add(summary.records - before.0, Ordering::Relaxed);
            tok.chunk
                .file_ok
                .fetch_add(summary.ok - before.1, Ordering::Relaxed);
            if tok.chunk.last {
                files_done += 1;
                if let (Some(w), Some(out)) = (sink.take(), out) {
                    w.finish()?;
                    // A file that could not be read to its end gets no marker: a rerun retries it.
                    let read_errors = summary.errors.get("read_error").copied().unwrap_or(0);
                    let complete = read_errors == read_errors_before_file;
                    read_errors_before_file = read_errors;
                    if complete {
                        let file_summary = serde_json::json!({
                            "input": input.path.display().to_string(),
                            "records": tok.chunk.file_records.load(Ordering::Relaxed),
                            "ok": tok.chunk.file_ok.load(Ordering::Relaxed),
                        });
                        let marker = format!("{file_summary}\n");
                        let root = match output {
                            Output::PerFile(dir) => dir,
                            Output::File(_) => unreachable!("per-file outputs only"),
                        };
                        corpus::mark_done(root, out, marker.as_bytes())?;
                    }
                }
                done_bytes += std::fs::metadata(&input.path).map_or(0, |m| m.len());
                bar.set_position(done_bytes);
            }
            update(&bar, &summary, start);
            bar.set_prefix(format!("files {files_done}/{}", todo.len()));
        }
        Ok(())
    })?;
    if let Some(sink) = single {
        sink.finish()?;
    }
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    summary.docs_per_s = summary.records as f64 / summary.seconds.max(1e-9);
    summary.tokens_per_s = summary.tokens as f64 / summary.seconds.max(1e-9);
    Ok(summary)
}

/// The columns of a Parquet output for this task.
fn parquet_columns(scorer: &Scorer, task: Task) -> corpus::ParquetColumns {
    match (task, scorer.head()) {
        (Task::Score, Some(head)) => corpus::ParquetColumns::Scores(head.labels.clone()),
        _ => corpus::ParquetColumns::Embedding(scorer.embedding_dim()),
    }
}

/// A run of consecutive records of one input file.
struct Chunk {
    /// Index into the job's list of files to do.
    file: usize,
    records: Vec<Record>,
    /// The file's final chunk (a file always sends one, even when empty).
    last: bool,
    /// Running per-file counts for the done marker, shared by the file's chunks.
    file_records: Arc<AtomicUsize>,
    file_ok: Arc<AtomicUsize>,
}

/// A chunk with the token ids of its usable records.
struct Tokenized {
    chunk: Chunk,
    /// Token ids of the usable records, and the chunk index each belongs to.
    ids: Vec<Vec<u32>>,
    owners: Vec<usize>,
    /// Records the tokenizer refused.
    failures: BTreeMap<usize, RecordError>,
}

/// Reader stage: every file in order, in chunks of `opts.chunk_records`.
fn read_stage(files: &[&InputFile], opts: &JobOptions, tx: SyncSender<Result<Chunk>>) {
    for (i, f) in files.iter().enumerate() {
        let (file_records, file_ok) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let chunk = |records, last| Chunk {
            file: i,
            records,
            last,
            file_records: file_records.clone(),
            file_ok: file_ok.clone(),
        };
        let reader = match corpus::open_input(&f.path, &opts.fields) {
            Ok(r) => r,
            Err(e) => {
                // An unreadable file is one error row; the job goes on with the next file.
                let row = Record::unreadable(format!("{}:0", f.path.display()), format!("{e:#}"));
                if tx.send(Ok(chunk(vec![row], true))).is_err() {
                    return;
                }
                continue;
            }
        };
        let mut records = Vec::with_capacity(opts.chunk_records);
        for rec in reader {
            match rec {
                Ok(r) => records.push(r),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            if records.len() == opts.chunk_records {
                let full = std::mem::replace(&mut records, Vec::with_capacity(opts.chunk_records));
                if tx.send(Ok(chunk(full, false))).is_err() {
                    return;
                }
            }
        }
        if tx.send(Ok(chunk(records, true))).is_err() {
            return;
        }
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} {msg} eta {eta}")
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

/// Tokenizer stage: token ids of the usable records, in parallel; a tokenizer failure marks only
/// its record.
fn tokenize_chunk(scorer: &Scorer, chunk: Chunk) -> Tokenized {
    use rayon::prelude::*;
    let texts: Vec<(usize, &str)> = chunk
        .records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.text.as_ref().ok().map(|t| (i, t.as_str())))
        .collect();
    let mut failures = BTreeMap::new();
    // An empty (or whitespace-only) document has nothing to score: an error row, not a score.
    let texts: Vec<(usize, &str)> = texts
        .into_iter()
        .filter(|(i, t)| {
            let empty = t.trim().is_empty();
            if empty {
                let msg = format!("{}: the text is empty", chunk.records[*i].location);
                failures.insert(*i, RecordError::EmptyText(msg));
            }
            !empty
        })
        .collect();
    let encoded: Vec<Result<Vec<u32>>> = texts
        .par_iter()
        .map(|(_, t)| scorer.tokenize_one(t))
        .collect();
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
                    RecordError::Failed(format!("{}: {e:#}", chunk.records[*i].location)),
                );
            }
        }
    }
    Tokenized {
        chunk,
        ids,
        owners,
        failures,
    }
}

/// Engine stage: one JSON value per tokenized record (a label -> score map, or an embedding), or
/// why the model could not score it (a non-finite output: that record only, the rest of its
/// batch is scored).
fn run_chunk(scorer: &Scorer, task: Task, t: &Tokenized) -> Result<Vec<Result<Value, String>>> {
    let failed = |failures: Vec<crate::DocFailure>| -> BTreeMap<usize, String> {
        failures.into_iter().map(|f| (f.doc, f.message)).collect()
    };
    Ok(match task {
        Task::Score => {
            let (s, failures) = scorer
                .score_ids_lenient(&t.ids)
                .with_context(|| span(&t.chunk.records))?;
            let mut failures = failed(failures);
            (0..t.ids.len())
                .map(|d| match failures.remove(&d) {
                    Some(message) => Err(message),
                    None => Ok(Value::Object(
                        s.labels
                            .iter()
                            .zip(s.row(d))
                            .map(|(l, v)| (l.clone(), f32_value(*v)))
                            .collect(),
                    )),
                })
                .collect()
        }
        Task::Embed => {
            let (e, failures) = scorer
                .embed_ids_lenient(&t.ids)
                .with_context(|| span(&t.chunk.records))?;
            let mut failures = failed(failures);
            (0..t.ids.len())
                .map(|d| match failures.remove(&d) {
                    Some(message) => Err(message),
                    None => Ok(Value::Array(
                        e.row(d).iter().map(|v| f32_value(*v)).collect(),
                    )),
                })
                .collect()
        }
    })
}

/// Writer stage: one output row per input record, in order, with errors inline.
fn write_chunk(
    t: &Tokenized,
    task: Task,
    outputs: Vec<Result<Value, String>>,
    sink: &mut dyn RecordSink,
    opts: &JobOptions,
    summary: &mut JobSummary,
) -> Result<()> {
    let mut failures = t.failures.clone();
    let key = match (&opts.format, task) {
        (Format::Dolma { .. }, _) => "attributes",
        (_, Task::Embed) => "embedding",
        (_, Task::Score) => "scores",
    };
    let mut results = t.owners.iter().zip(outputs);
    for (i, rec) in t.chunk.records.iter().enumerate() {
        summary.records += 1;
        // With --keep-input the output row is the input object plus the results.
        let mut obj = rec.input.clone().unwrap_or_default();
        // An integer id stays an integer (dolma's mix compares ids with their documents').
        let id = match (&opts.format, &rec.id_value) {
            (Format::Parquet, _) | (_, None) => Value::String(rec.id.clone()),
            (_, Some(v)) => v.clone(),
        };
        obj.insert("id".into(), id);
        let dolma = matches!(opts.format, Format::Dolma { .. });
        match &rec.source {
            Some(src) => {
                obj.insert("source".into(), Value::String(src.clone()));
            }
            // Every JSON Lines row has every column (`null` when absent), so schema inference
            // (polars `read_ndjson`, pandas) sees `source` and `error` from the first row.
            None if !dolma => {
                obj.insert("source".into(), Value::Null);
            }
            None => {}
        }
        let mut result = None;
        if rec.text.is_ok() && !failures.contains_key(&i) {
            let (&owner, value) = results.next().expect("one result per usable record");
            debug_assert_eq!(owner, i);
            match value {
                Ok(value) => result = Some(value),
                Err(message) => {
                    let msg = format!("{}: {message}", rec.location);
                    failures.insert(i, RecordError::NonFiniteOutput(msg));
                }
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
                        format!(
                            "{}__{}__{}",
                            dolma_key_part(experiment),
                            dolma_key_part(model),
                            dolma_key_part(label)
                        ),
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
            if dolma {
                // Rows must stay aligned with the documents file: an empty attribute set.
                obj.insert(key.into(), Value::Object(Map::new()));
            }
            obj.insert("error".into(), Value::String(err.to_string()));
        } else if let Some(value) = result {
            summary.ok += 1;
            obj.insert(key.into(), value);
            if !dolma {
                obj.insert("error".into(), Value::Null);
            }
        }
        sink.write(&Value::Object(obj))?;
    }
    summary.tokens += t.ids.iter().map(Vec::len).sum::<usize>();
    Ok(())
}

//! The score/embed job: read records, tokenize in parallel, pack, run the engine, write one
//! output line per input record in input order. Records that cannot be scored are written with an
//! `error` field (or stop the job with `strict`); nothing is dropped.
//!
//! This is the simple in-order loop (chunks of records processed one after another); the
//! streaming, multi-threaded corpus job replaces the loop body, not its contract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::corpus::{
    self, FieldNames, InputFile, OutputRow, Record, RecordError, RecordSink, RowValues,
};
use crate::Scorer;

mod outputs;
use outputs::{create_sink, plan_outputs, Writer};

/// What the job computes for each record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `{"id", "embedding": [...]}`
    Embed,
    /// `{"id", "scores": {"<label>": x}}`
    Score,
    /// What a linear head reads, `[hidden]` per record (BERT's pooler output), for heads applied
    /// outside the model: `mira select` runs one shared encoder and each group's head after it.
    Features,
    /// `[CLS | mean]` final hidden states, `[2 · hidden]` per record: what `mira select` reads
    /// when its students' heads read features other than the pooler (`select::features`).
    ClsAndMean,
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
    /// The caller's own rows (`mira select`'s score rows), one file per input.
    Custom(CustomFormat),
}

/// Opens the caller's sink for one output file.
pub type SinkMaker = dyn Fn(&Path) -> Result<Box<dyn RecordSink>> + Send + Sync;

/// A sink the caller supplies, with the extension of its per-file outputs
/// (`<input's relative path>.<extension>`).
#[derive(Clone)]
pub struct CustomFormat {
    pub extension: String,
    pub create: Arc<SinkMaker>,
}

impl PartialEq for CustomFormat {
    fn eq(&self, other: &Self) -> bool {
        self.extension == other.extension && Arc::ptr_eq(&self.create, &other.create)
    }
}

impl Eq for CustomFormat {}

impl std::fmt::Debug for CustomFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CustomFormat(.{})", self.extension)
    }
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
    /// Count each record's whole-text tokens in the tokenizer pass ([`OutputRow::tokens`]).
    pub count_tokens: bool,
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
            count_tokens: false,
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
    check_job(scorer, task, output, opts)?;
    let start = Instant::now();
    let mut summary = JobSummary {
        files: inputs.len(),
        ..Default::default()
    };
    let todo = plan_outputs(inputs, output, opts, &mut summary)?;
    let total_bytes: u64 = todo
        .iter()
        .map(|(f, _)| std::fs::metadata(&f.path).map_or(0, |m| m.len()))
        .sum();
    let values = row_values(scorer, task);
    let single = match output {
        Output::File(path) => Some(create_sink(path, &values, &opts.format)?),
        Output::PerFile(_) => None,
    };
    let mut writer = Writer {
        todo: &todo,
        output,
        opts,
        values,
        bar: progress_bar(opts.progress, total_bytes),
        start,
        summary,
        single,
        sink: None,
        done_bytes: 0,
        files_done: 0,
        read_errors_before_file: 0,
    };
    std::thread::scope(|scope| -> Result<()> {
        let (read_tx, read_rx) = sync_channel::<Result<Chunk>>(2);
        let (tok_tx, tok_rx) = sync_channel::<Result<Tokenized>>(2);
        let (run_tx, run_rx) = sync_channel::<Result<(Tokenized, Vec<EngineResult>)>>(1);
        let files: Vec<&InputFile> = todo.iter().map(|(f, _)| *f).collect();
        scope.spawn(move || read_stage(&files, opts, read_tx));
        scope.spawn(move || {
            for chunk in read_rx {
                if tok_tx
                    .send(chunk.map(|c| tokenize_chunk(scorer, c, opts.count_tokens)))
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
        for scored in run_rx {
            let (tok, results) = scored?;
            writer.write(&tok, results)?;
        }
        Ok(())
    })?;
    writer.finish()
}

/// Refuse a job that cannot work before reading anything.
fn check_job(scorer: &Scorer, task: Task, output: &Output, opts: &JobOptions) -> Result<()> {
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
    Ok(())
}

/// What the model makes of each record, by the rules of `mira score`/`mira embed`: its values
/// (scores in label order, or an embedding), or why it has none (the reader's error, an empty
/// text, a tokenizer refusal, a non-finite output). For library callers that hold their texts
/// in memory (the Python package); the results are those of the CLI on the same records.
pub fn run_records(
    scorer: &Scorer,
    task: Task,
    records: Vec<Record>,
) -> Result<Vec<std::result::Result<Vec<f32>, RecordError>>> {
    if task == Task::Score && scorer.head().is_none() {
        bail!(
            "{} has no classification head: use embed, or a checkpoint with a classifier",
            scorer.model_dir().display()
        );
    }
    let chunk = Chunk {
        file: 0,
        records,
        last: true,
        file_records: Arc::default(),
        file_ok: Arc::default(),
    };
    let tokenized = tokenize_chunk(scorer, chunk, false);
    let results = run_chunk(scorer, task, &tokenized)?;
    Ok(tok_outcomes(&tokenized, results))
}

/// The values each output row of this task carries.
fn row_values(scorer: &Scorer, task: Task) -> RowValues {
    match (task, scorer.head()) {
        (Task::Score, Some(head)) => RowValues::Scores(head.labels.clone()),
        (Task::Features, _) => RowValues::Embedding(scorer.hidden_size()),
        (Task::ClsAndMean, _) => RowValues::Embedding(2 * scorer.hidden_size()),
        _ => RowValues::Embedding(scorer.embedding_dim()),
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
    /// Whole-text token counts of the usable records (with `count_tokens`; else empty).
    counts: Vec<u64>,
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

/// Tokenizer stage: token ids of the usable records, in parallel; a tokenizer failure marks only
/// its record.
fn tokenize_chunk(scorer: &Scorer, chunk: Chunk, count_tokens: bool) -> Tokenized {
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
    let encoded: Vec<Result<(Vec<u32>, usize)>> = texts
        .par_iter()
        .map(|(_, t)| match count_tokens {
            true => scorer.tokenize_counting(t),
            false => scorer.tokenize_one(t).map(|ids| (ids, 0)),
        })
        .collect();
    let mut ids = Vec::with_capacity(texts.len());
    let mut owners = Vec::with_capacity(texts.len());
    let mut counts = Vec::new();
    for ((i, _), enc) in texts.iter().zip(encoded) {
        match enc {
            Ok((v, n)) => {
                ids.push(v);
                owners.push(*i);
                if count_tokens {
                    counts.push(n as u64);
                }
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
        counts,
        failures,
    }
}

/// What the engine made of one tokenized record: its values (scores in label order, or an
/// embedding), or a `non_finite_output` error for that record only (the rest of its batch is
/// scored).
type EngineResult = std::result::Result<Vec<f32>, RecordError>;

/// Engine stage: one result per tokenized record.
fn run_chunk(scorer: &Scorer, task: Task, t: &Tokenized) -> Result<Vec<EngineResult>> {
    let (rows, failures) = match task {
        Task::Score => {
            let (s, failures) = scorer
                .score_ids_lenient(&t.ids)
                .with_context(|| span(&t.chunk.records))?;
            let rows: Vec<Vec<f32>> = (0..t.ids.len()).map(|d| s.row(d).to_vec()).collect();
            (rows, failures)
        }
        Task::Embed | Task::Features | Task::ClsAndMean => {
            let (e, failures) = match task {
                Task::Embed => scorer.embed_ids_lenient(&t.ids),
                Task::ClsAndMean => scorer.cls_and_mean_ids_lenient(&t.ids),
                _ => scorer.features_ids_lenient(&t.ids),
            }
            .with_context(|| span(&t.chunk.records))?;
            let rows: Vec<Vec<f32>> = (0..t.ids.len()).map(|d| e.row(d).to_vec()).collect();
            (rows, failures)
        }
    };
    let mut failed: BTreeMap<usize, String> =
        failures.into_iter().map(|f| (f.doc, f.message)).collect();
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(d, row)| match failed.remove(&d) {
            Some(message) => {
                let location = &t.chunk.records[t.owners[d]].location;
                Err(RecordError::NonFiniteOutput(format!(
                    "{location}: {message}"
                )))
            }
            None => Ok(row),
        })
        .collect())
}

/// The one place that decides what becomes of each record of a chunk: the reader's error (not
/// JSON, no text, ...), else the tokenizer's (empty text, refused), else the engine's result.
fn tok_outcomes(t: &Tokenized, results: Vec<EngineResult>) -> Vec<EngineResult> {
    let mut results = t.owners.iter().zip(results);
    t.chunk
        .records
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            if let Err(e) = &rec.text {
                return Err(e.clone());
            }
            if let Some(e) = t.failures.get(&i) {
                return Err(e.clone());
            }
            let (&owner, result) = results.next().expect("one result per usable record");
            debug_assert_eq!(owner, i);
            result
        })
        .collect()
}

/// Writer stage: one output row per input record, in order, with errors inline (or the job's
/// end at the first error, with `strict`).
fn write_chunk(
    outcomes: Vec<EngineResult>,
    t: &Tokenized,
    sink: &mut dyn RecordSink,
    opts: &JobOptions,
    summary: &mut JobSummary,
) -> Result<()> {
    let mut counts = vec![None; t.chunk.records.len()];
    for (&owner, &n) in t.owners.iter().zip(&t.counts) {
        counts[owner] = Some(n);
    }
    for ((rec, outcome), tokens) in t.chunk.records.iter().zip(&outcomes).zip(counts) {
        summary.records += 1;
        match outcome {
            Err(err) if opts.strict => bail!("{err}"),
            Err(err) => *summary.errors.entry(err.kind().to_string()).or_default() += 1,
            Ok(_) => summary.ok += 1,
        }
        sink.write(&OutputRow {
            record: rec,
            outcome: outcome.as_ref().map(Vec::as_slice),
            tokens,
        })?;
    }
    summary.tokens += t.ids.iter().map(Vec::len).sum::<usize>();
    Ok(())
}

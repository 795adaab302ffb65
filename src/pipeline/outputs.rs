//! The job's outputs: which inputs to do and where each one's output goes (resume and live-job
//! checks), the sink for a format, and the writer stage that fills them in input order and
//! leaves a done marker per finished file.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use super::{
    tok_outcomes, update, write_chunk, Chunk, EngineResult, Format, JobOptions, JobSummary, Output,
    Tokenized,
};
use crate::corpus::{self, InputFile, JsonRows, JsonStyle, RecordSink, RowValues};

/// The inputs to do and each one's output file (none for a single `--output`). Per-file outputs
/// already complete are skipped (resume), and so are those another live job is writing.
pub(super) fn plan_outputs<'a>(
    inputs: &'a [InputFile],
    output: &Output,
    opts: &JobOptions,
    summary: &mut JobSummary,
) -> Result<Vec<(&'a InputFile, Option<PathBuf>)>> {
    let dir = match output {
        Output::File(path) => {
            corpus::refuse_input(path, inputs)?;
            return Ok(inputs.iter().map(|f| (f, None)).collect());
        }
        Output::PerFile(dir) => dir,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut todo = Vec::new();
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
            Format::Custom(c) => dir.join(corpus::output_name(&f.rel, &c.extension)),
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
    Ok(todo)
}

/// A sink for typed rows in `format` at `path`.
pub(super) fn create_sink(
    path: &Path,
    values: &RowValues,
    format: &Format,
) -> Result<Box<dyn RecordSink>> {
    let style = match format {
        Format::Parquet => {
            return Ok(Box::new(corpus::ParquetWriter::create(
                path,
                values.clone(),
            )?))
        }
        Format::Custom(c) => return (c.create)(path),
        Format::Jsonl => JsonStyle::Plain,
        Format::Dolma { experiment, model } => JsonStyle::Dolma {
            experiment: experiment.clone(),
            model: model.clone(),
        },
    };
    let rows = JsonRows {
        values: values.clone(),
        style,
    };
    Ok(Box::new(corpus::JsonlRowWriter::create(path, rows)?))
}

/// The writer stage (on the job's own thread): each file's output opened on its first chunk and
/// finished, with its done marker, on its last; the summary and progress bar kept up to date.
pub(super) struct Writer<'a> {
    pub(super) todo: &'a [(&'a InputFile, Option<PathBuf>)],
    pub(super) output: &'a Output,
    pub(super) opts: &'a JobOptions,
    pub(super) values: RowValues,
    pub(super) bar: ProgressBar,
    pub(super) start: Instant,
    pub(super) summary: JobSummary,
    /// The one output of `Output::File`.
    pub(super) single: Option<Box<dyn RecordSink>>,
    /// The current file's output of `Output::PerFile`.
    pub(super) sink: Option<Box<dyn RecordSink>>,
    pub(super) done_bytes: u64,
    pub(super) files_done: usize,
    pub(super) read_errors_before_file: usize,
}

impl Writer<'_> {
    pub(super) fn write(&mut self, tok: &Tokenized, results: Vec<EngineResult>) -> Result<()> {
        let (input, out) = &self.todo[tok.chunk.file];
        if let (None, Some(out)) = (&self.sink, out) {
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            corpus::remove_stale_temps(out)?;
            self.sink = Some(create_sink(out, &self.values, &self.opts.format)?);
        }
        let sink = match (&mut self.single, &mut self.sink) {
            (Some(w), _) | (None, Some(w)) => w.as_mut(),
            (None, None) => unreachable!("a per-file sink is opened above"),
        };
        let before = (self.summary.records, self.summary.ok);
        let outcomes = tok_outcomes(tok, results);
        write_chunk(outcomes, tok, sink, self.opts, &mut self.summary)?;
        let chunk = &tok.chunk;
        let s = &self.summary;
        chunk
            .file_records
            .fetch_add(s.records - before.0, Ordering::Relaxed);
        chunk.file_ok.fetch_add(s.ok - before.1, Ordering::Relaxed);
        if chunk.last {
            self.files_done += 1;
            if let (Some(w), Some(out)) = (self.sink.take(), out) {
                w.finish()?;
                self.mark_done(input, out, chunk)?;
            }
            self.done_bytes += std::fs::metadata(&input.path).map_or(0, |m| m.len());
            self.bar.set_position(self.done_bytes);
        }
        update(&self.bar, &self.summary, self.start);
        let files = format!("files {}/{}", self.files_done, self.todo.len());
        self.bar.set_prefix(files);
        Ok(())
    }

    /// The done marker of a finished per-file output, unless the file could not be read to its
    /// end (then a rerun retries it).
    fn mark_done(&mut self, input: &InputFile, out: &Path, chunk: &Chunk) -> Result<()> {
        let read_errors = self.summary.errors.get("read_error").copied();
        let read_errors = read_errors.unwrap_or(0);
        let complete = read_errors == self.read_errors_before_file;
        self.read_errors_before_file = read_errors;
        if !complete {
            return Ok(());
        }
        let file_summary = serde_json::json!({
            "input": input.path.display().to_string(),
            "records": chunk.file_records.load(Ordering::Relaxed),
            "ok": chunk.file_ok.load(Ordering::Relaxed),
        });
        let marker = format!("{file_summary}\n");
        let root = match self.output {
            Output::PerFile(dir) => dir,
            Output::File(_) => unreachable!("per-file outputs only"),
        };
        corpus::mark_done(root, out, marker.as_bytes())
    }

    pub(super) fn finish(self) -> Result<JobSummary> {
        if let Some(sink) = self.single {
            sink.finish()?;
        }
        self.bar.finish_and_clear();
        let mut summary = self.summary;
        summary.seconds = self.start.elapsed().as_secs_f64();
        summary.docs_per_s = summary.records as f64 / summary.seconds.max(1e-9);
        summary.tokens_per_s = summary.tokens as f64 / summary.seconds.max(1e-9);
        Ok(summary)
    }
}

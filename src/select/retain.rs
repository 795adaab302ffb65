//! Step 6, `mira select`: score the whole corpus with the students and keep a token budget.
//!
//! A record's score is the trimmed mean of its group student's outputs on the anchors left
//! unmasked for its source. The cutoff keeps `budget` of the tokens per group (default),
//! globally, or per source: records are ranked by score (ties in input order) and kept until
//! the kept tokens reach the budget, so each bucket keeps its share to within one record.
//!
//! Four passes, each resumable, the first and third sharded over `--rank/--world-size`:
//! 1. **score**: the streaming job of `mira score` (every device option, per-file outputs with
//!    done markers) writes a score row per record under `<out>/scores/`; students that share an
//!    encoder run it once per record and apply the record's group head after it;
//! 2. **cutoff**: exact cutoffs from every file's scores in bounded memory (`cutoff.rs`) ->
//!    `cutoffs.json`;
//! 3. **keep**: each input's kept records, in its format and compression, under `<out>/kept/`,
//!    its share of the report's counts in its done marker;
//! 4. **report**: the counts added up -> `selection.json`, `report.md`, SVG histograms.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::features::Row;
use super::reduce::{self, kept_path, read_score_rows, scores_path, scores_root, Cutoffs};
use super::reliability::Reliability;
use super::students::{Head, Students};
use super::{source_of, stats, Groups};
use crate::corpus::{
    self, remove_stale_temps, InputFile, JsonlWriter, OutputFile, OutputRow, RecordSink,
};
use crate::pipeline::{self, CustomFormat, Format, JobOptions, Output, Task};
use crate::Scorer;

pub use super::selection::{
    summary_json, Cutoff, ScoreRow, SelectOptions, Selection, Tally, UnknownSource,
};

/// Which part of the selection to run (`--pass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything, in one process.
    All,
    Score,
    Cutoff,
    Keep,
    Report,
}

impl std::str::FromStr for Pass {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "all" => Pass::All,
            "score" => Pass::Score,
            "cutoff" => Pass::Cutoff,
            "keep" => Pass::Keep,
            "report" => Pass::Report,
            _ => bail!("unknown pass '{s}': all, score, cutoff, keep or report"),
        })
    }
}

/// Run the whole selection in this process.
pub fn select(
    files: &[InputFile],
    groups: &Groups,
    students_dir: &Path,
    rel: &Reliability,
    out: &Path,
    opts: &SelectOptions,
) -> Result<Selection> {
    let sel = run_pass(Pass::All, files, groups, students_dir, rel, out, opts)?;
    Ok(sel.expect("the report pass returns the selection"))
}

/// Run one pass (or all); `files` is the whole corpus, in order, on every rank. The report pass
/// (and `All`) return the selection.
pub fn run_pass(
    pass: Pass,
    files: &[InputFile],
    groups: &Groups,
    students_dir: &Path,
    rel: &Reliability,
    out: &Path,
    opts: &SelectOptions,
) -> Result<Option<Selection>> {
    opts.validate()?;
    if pass == Pass::All && opts.shard.1 > 1 {
        bail!("a selection sharded over {} workers runs pass by pass: --pass score, then cutoff (once), keep, and report (once)", opts.shard.1);
    }
    // Two passes over the inputs (score, then keep): standard input cannot be read twice.
    if files.iter().any(|f| f.path.as_os_str() == "-") {
        bail!("mira select reads its inputs twice: standard input (`-`) cannot be one of them");
    }
    // No kept file may be an input (`--output-dir` pointing into the corpus).
    let input_ids = corpus::InputIds::of(files);
    for f in files {
        input_ids.refuse(&kept_path(out, f))?;
    }
    if matches!(pass, Pass::All | Pass::Score) {
        let students = Students::load(
            students_dir,
            &groups.names(),
            opts.device,
            opts.load.clone(),
        )?;
        score_pass(files, groups, &students, rel, out, opts)?;
    }
    if pass == Pass::Score {
        return Ok(None);
    }
    let cutoffs = match pass {
        Pass::All | Pass::Cutoff => reduce::cutoff_pass(files, out, opts)?,
        _ => Cutoffs::load(out)?,
    };
    cutoffs.check(files, opts)?;
    if matches!(pass, Pass::All | Pass::Keep) {
        keep_pass(files, rel, out, &cutoffs, opts)?;
    }
    if matches!(pass, Pass::All | Pass::Report) {
        return Ok(Some(reduce::report_pass(files, rel, out, &cutoffs, opts)?));
    }
    Ok(None)
}

/// This rank's files, with their positions in the corpus.
fn my_files<'a>(files: &'a [InputFile], opts: &SelectOptions) -> Vec<(usize, &'a InputFile)> {
    let (rank, world) = opts.shard;
    files
        .iter()
        .enumerate()
        .filter(|(i, _)| i % world == rank)
        .collect()
}

/// What turns a record's student outputs into its score.
#[derive(Clone)]
struct Scoring {
    groups: Groups,
    rel: Reliability,
    trim: f64,
    unknown: UnknownSource,
}

impl Scoring {
    /// The trimmed mean of the outputs on the anchors left unmasked for `source` (all anchors
    /// when every one is masked).
    fn score(&self, labels: &[String], outputs: &[f32], source: &str) -> Option<f64> {
        let vals: Vec<f64> = match self.rel.unmasked_for(source) {
            Some(names) if !names.is_empty() => labels
                .iter()
                .zip(outputs)
                .filter(|(l, _)| names.contains(l))
                .map(|(_, v)| *v as f64)
                .collect(),
            _ => outputs.iter().map(|v| *v as f64).collect(),
        };
        stats::trimmed_mean(&vals, self.trim)
    }

    /// A record's row before its score: group, or the unknown-source policy's error.
    fn row(&self, rec: &corpus::Record, tokens: u64) -> Result<ScoreRow> {
        let source = source_of(rec);
        let group = self.groups.group_of(&source).map(str::to_string);
        if group.is_none() && rec.text.is_ok() && self.unknown == UnknownSource::Error {
            bail!(
                "{}: source '{source}' is in no group of groups.json (use --unknown-source keep|drop to let such records through or drop them)",
                rec.location
            );
        }
        Ok(ScoreRow {
            id: rec.id.clone(),
            source,
            group,
            tokens,
            score: None,
            error: None,
        })
    }
}

/// Score rows of one file from the shared encoder's features, written atomically.
struct ScoreSink {
    scoring: Arc<Scoring>,
    heads: Arc<BTreeMap<String, Head>>,
    row: Row,
    w: JsonlWriter,
}

impl RecordSink for ScoreSink {
    fn write(&mut self, r: &OutputRow) -> Result<()> {
        let mut row = self.scoring.row(r.record, r.tokens.unwrap_or(0))?;
        match (r.outcome, &row.group) {
            (Err(e), _) => row.error = Some(e.to_string()),
            (Ok(_), None) => {}
            (Ok(features), Some(g)) => {
                let head = &self.heads[g];
                let outputs = head.apply(features, self.row)?;
                row.score = self.scoring.score(&head.info.labels, &outputs, &row.source);
            }
        }
        self.w.write_line(serde_json::to_string(&row)?.as_bytes())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.w.finish()
    }
}

/// Pass 1: this rank's score files (finished ones are skipped: a rerun resumes).
fn score_pass(
    files: &[InputFile],
    groups: &Groups,
    students: &Students,
    rel: &Reliability,
    out: &Path,
    opts: &SelectOptions,
) -> Result<()> {
    let scoring = Arc::new(Scoring {
        groups: groups.clone(),
        rel: rel.clone(),
        trim: opts.trim,
        unknown: opts.unknown,
    });
    let mine: Vec<InputFile> = my_files(files, opts)
        .into_iter()
        .map(|(_, f)| f.clone())
        .collect();
    match students {
        Students::Shared {
            encoder,
            heads,
            row,
        } => {
            let heads = Arc::new(heads.clone());
            let row = *row;
            let create = move |path: &Path| -> Result<Box<dyn RecordSink>> {
                Ok(Box::new(ScoreSink {
                    scoring: scoring.clone(),
                    heads: heads.clone(),
                    row,
                    w: JsonlWriter::create(path)?,
                }))
            };
            let job = JobOptions {
                format: Format::Custom(CustomFormat {
                    extension: "scores.jsonl".into(),
                    create: Arc::new(create),
                }),
                fields: opts.fields.clone(),
                strict: false,
                chunk_records: opts.chunk,
                progress: opts.progress,
                count_tokens: true,
                ..JobOptions::default()
            };
            let task = match row {
                Row::Pooler => Task::Features,
                Row::ClsAndMean => Task::ClsAndMean,
            };
            pipeline::run_job(
                encoder,
                task,
                &mine,
                &Output::PerFile(scores_root(out)),
                &job,
            )?;
        }
        Students::Separate(each) => {
            let bar = super::count_bar(mine.len() as u64, opts.progress, "select: scoring files");
            for f in &mine {
                let sp = scores_path(out, f);
                if !corpus::is_done(&scores_root(out), &sp) {
                    std::fs::create_dir_all(sp.parent().unwrap())?;
                    remove_stale_temps(&sp)?;
                    let rows = score_file_separately(f, &scoring, each, opts)?;
                    let mut w = JsonlWriter::create(&sp)?;
                    for r in &rows {
                        w.write_line(serde_json::to_string(r)?.as_bytes())?;
                    }
                    w.finish()?;
                    corpus::mark_done(&scores_root(out), &sp, b"")?;
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
    }
    Ok(())
}

/// Pass 1 for one file when the students have encoders of their own: each group's records
/// through its student.
fn score_file_separately(
    f: &InputFile,
    scoring: &Scoring,
    students: &BTreeMap<String, Scorer>,
    opts: &SelectOptions,
) -> Result<Vec<ScoreRow>> {
    let any = students.values().next().expect("at least one student");
    let mut rows: Vec<ScoreRow> = Vec::new();
    let mut reader = corpus::open_input(&f.path, &opts.fields)?.peekable();
    while reader.peek().is_some() {
        let chunk: Vec<corpus::Record> = reader.by_ref().take(opts.chunk).collect::<Result<_>>()?;
        let base = rows.len();
        // One tokenizer pass per record, with its group's student: ids and whole-text count.
        type IdsAndCount = Result<(Vec<u32>, usize)>;
        let tokenized: Vec<Option<IdsAndCount>> = chunk
            .par_iter()
            .map(|r| {
                let t = r.text.as_ref().ok()?;
                let s = scoring
                    .groups
                    .group_of(&source_of(r))
                    .map_or(any, |g| &students[g]);
                Some(s.tokenize_counting(t))
            })
            .collect();
        let mut by_group: BTreeMap<String, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
        for (k, (r, t)) in chunk.iter().zip(tokenized).enumerate() {
            let tokens = t
                .as_ref()
                .and_then(|t| t.as_ref().ok())
                .map_or(0, |t| t.1 as u64);
            let mut row = scoring.row(r, tokens)?;
            match (&r.text, t, &row.group) {
                (Err(e), _, _) => row.error = Some(e.to_string()),
                (_, Some(Err(e)), _) => row.error = Some(format!("failed: {}: {e:#}", r.location)),
                (_, Some(Ok((ids, _))), Some(g)) => {
                    by_group.entry(g.clone()).or_default().push((k, ids))
                }
                _ => {}
            }
            rows.push(row);
        }
        for (g, docs) in by_group {
            let student = &students[&g];
            let labels = &student.head().expect("students have heads").labels;
            let ids: Vec<Vec<u32>> = docs.iter().map(|d| d.1.clone()).collect();
            let (scores, failures) = student.score_ids_lenient(&ids)?;
            for f in &failures {
                let k = docs[f.doc].0;
                rows[base + k].error = Some(format!(
                    "non_finite_output: {}: {}",
                    chunk[k].location, f.message
                ));
            }
            for (n, (k, _)) in docs.iter().enumerate() {
                let row = &mut rows[base + k];
                if row.error.is_none() {
                    row.score = scoring.score(labels, scores.row(n), &row.source);
                }
            }
        }
    }
    Ok(rows)
}

/// Which records of one bucket to keep: rank by score (highest first; ties in input order) and
/// keep until the kept tokens reach `budget` of the total, so the kept share exceeds the budget
/// by less than one record. Returns the mask and the lowest kept score.
pub fn budget_keep(scores: &[f64], tokens: &[u64], budget: f64) -> (Vec<bool>, Option<f64>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
    let total: u64 = tokens.iter().sum();
    let target = budget * total as f64;
    let mut keep = vec![false; scores.len()];
    let mut kept = 0u64;
    let mut cutoff = None;
    for i in order {
        if kept as f64 >= target {
            break;
        }
        keep[i] = true;
        kept += tokens[i];
        cutoff = Some(scores[i]);
    }
    (keep, cutoff)
}

/// Pass 3: this rank's kept files, each with its tally in its done marker (a file kept under
/// the same cutoffs is skipped: a rerun resumes).
fn keep_pass(
    files: &[InputFile],
    rel: &Reliability,
    out: &Path,
    cutoffs: &Cutoffs,
    opts: &SelectOptions,
) -> Result<()> {
    let id = cutoffs.id();
    let masked = |s: &str| !matches!(rel.unmasked_for(s), Some(n) if !n.is_empty());
    let mine = my_files(files, opts);
    let bar = super::count_bar(mine.len() as u64, opts.progress, "select: keeping");
    for (fi, f) in mine {
        let dest = kept_path(out, f);
        let current = corpus::done_summary(out, &dest)
            .and_then(|b| serde_json::from_slice::<super::selection::FileTally>(&b).ok())
            .is_some_and(|t| t.cutoffs_id == id);
        if !current {
            let rows = read_score_rows(&scores_path(out, f))?;
            let keep: Vec<bool> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| cutoffs.keeps(r, (fi as u32, i as u64), opts.unknown))
                .collect();
            std::fs::create_dir_all(dest.parent().unwrap())?;
            remove_stale_temps(&dest)?;
            write_kept(f, &dest, &keep, &rows, opts)?;
            let tally = reduce::file_tally(&rows, &keep, cutoffs, &masked);
            corpus::mark_done(out, &dest, serde_json::to_string(&tally)?.as_bytes())?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Copy the kept records of one input file to `dest` in the same format and compression.
fn write_kept(
    f: &InputFile,
    dest: &Path,
    keep: &[bool],
    rows: &[ScoreRow],
    opts: &SelectOptions,
) -> Result<()> {
    let name = f.path.to_string_lossy();
    if name.ends_with(".parquet") {
        return write_kept_parquet(&f.path, dest, keep);
    }
    let mut fields = opts.fields.clone();
    fields.keep_raw = true;
    // Kept records are the input's lines, byte for byte.
    let mut w = JsonlWriter::create(dest)?;
    for (i, rec) in corpus::open_input(&f.path, &fields)?.enumerate() {
        let rec = rec?;
        let row = rows.get(i).ok_or_else(|| {
            anyhow!(
                "{}: more records than when scored: rerun after deleting {}",
                f.path.display(),
                dest.display()
            )
        })?;
        if row.id != rec.id {
            bail!(
                "{}: record {i} is '{}' but was scored as '{}': the input changed since scoring",
                f.path.display(),
                rec.id,
                row.id
            );
        }
        if keep[i] {
            let line = rec
                .raw
                .ok_or_else(|| anyhow!("{}: no input line", rec.location))?;
            w.write_line(&line)?;
        }
    }
    w.finish()
}

fn write_kept_parquet(src: &Path, dest: &Path, keep: &[bool]) -> Result<()> {
    use parquet::arrow::ArrowWriter;
    let reader = corpus::parquet::Batches::open(src, 1024)?;
    let schema = reader.schema();
    let out = std::io::BufWriter::with_capacity(1 << 20, OutputFile::create(dest)?);
    let mut writer = ArrowWriter::try_new(out, schema, None)?;
    let mut offset = 0usize;
    for batch in reader {
        let batch = batch?;
        let n = batch.num_rows();
        let mask = arrow_array::BooleanArray::from(
            (offset..offset + n)
                .map(|i| keep.get(i).copied().unwrap_or(false))
                .collect::<Vec<bool>>(),
        );
        offset += n;
        let filtered = arrow_select::filter::filter_record_batch(&batch, &mask)?;
        writer.write(&filtered)?;
    }
    writer
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", dest.display()))?
        .commit()
}

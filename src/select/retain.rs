//! Step 6, `mira select`: score the whole corpus with the students and keep a token budget.
//!
//! A record's score is the trimmed mean of its group student's outputs on the anchors left
//! unmasked for its source. The cutoff keeps `budget` of the tokens per group (default),
//! globally, or per source: records are ranked by score (ties in input order) and kept until
//! the kept tokens reach the budget, so each bucket keeps its share to within one record.
//!
//! Three passes, each resumable: (1) scores per input file under `<out>/scores/` (atomic, a
//! rerun skips finished files); (2) cutoffs from all scores; (3) the kept records of each input
//! file, in the input's format and compression, under `<out>/kept/` with `.done` markers. The
//! report (`report.md`, SVG histograms, `selection.json`) closes the job.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::distill::student_dir;
use super::reliability::Reliability;
use super::{source_of, stats, Groups};
use crate::corpus::{self, remove_stale_temps, write_atomic, InputFile, JsonlWriter, OutputFile};
use crate::{Device, Scorer};

pub use super::selection::{
    summary_json, Cutoff, ScoreRow, SelectOptions, Selection, Tally, UnknownSource,
};

/// The students and their masks, loaded lazily per group.
struct Students<'a> {
    dir: &'a Path,
    device: Device,
    loaded: HashMap<String, Arc<Scorer>>,
}

impl Students<'_> {
    fn get(&mut self, group: &str) -> Result<Arc<Scorer>> {
        if let Some(s) = self.loaded.get(group) {
            return Ok(s.clone());
        }
        let dir = student_dir(self.dir, group);
        let s = Arc::new(
            Scorer::load(&dir, self.device)
                .with_context(|| format!("cannot load the student of group {group}"))?,
        );
        if s.head().is_none() {
            bail!("{}: the student has no head", dir.display());
        }
        self.loaded.insert(group.to_string(), s.clone());
        Ok(s)
    }
}

fn scores_path(out: &Path, f: &InputFile) -> PathBuf {
    out.join("scores")
        .join(corpus::output_name(&f.rel, "scores.jsonl"))
}

fn kept_path(out: &Path, f: &InputFile) -> PathBuf {
    out.join("kept").join(&f.rel)
}

/// Pass 1 for one file: score every record.
// Long: one pass over a file's records (read, token counts, score per group student, rows) over
// vectors indexed together.
fn score_file(
    f: &InputFile,
    groups: &Groups,
    rel: &Reliability,
    students: &mut Students,
    opts: &SelectOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<ScoreRow>> {
    let mut rows: Vec<ScoreRow> = Vec::new();
    let mut reader = corpus::open_input(&f.path, &opts.fields)?.peekable();
    loop {
        let mut chunk = Vec::with_capacity(opts.chunk);
        while chunk.len() < opts.chunk {
            match reader.next() {
                Some(r) => chunk.push(r?),
                None => break,
            }
        }
        if chunk.is_empty() {
            break;
        }
        let base = rows.len();
        // Token counts in parallel; errors become error rows.
        let st: &Students = students;
        let counted: Vec<Option<u64>> = chunk
            .par_iter()
            .map(|r| match (&r.text, groups.group_of(&source_of(r))) {
                (Ok(t), Some(g)) => students_tokenizer_count(st, g, t),
                (Ok(t), None) => Some(t.split_whitespace().count() as u64),
                _ => None,
            })
            .collect();
        let mut by_group: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (k, r) in chunk.iter().enumerate() {
            let source = source_of(r);
            let group = groups.group_of(&source).map(str::to_string);
            let mut row = ScoreRow {
                id: r.id.clone(),
                source: source.clone(),
                group: group.clone(),
                tokens: counted[k].unwrap_or(0),
                score: None,
                error: None,
            };
            match (&r.text, &group) {
                (Err(e), _) => row.error = Some(e.to_string()),
                (Ok(_), None) if opts.unknown == UnknownSource::Error => bail!(
                    "{}: source '{source}' is in no group of groups.json (use --unknown-source keep|drop to let such records through or drop them)",
                    r.location
                ),
                (Ok(_), None) => {}
                (Ok(_), Some(g)) => by_group.entry(g.clone()).or_default().push(k),
            }
            rows.push(row);
        }
        for (g, idx) in by_group {
            let student = students.get(&g)?;
            let labels = &student.head().unwrap().labels;
            // A record the student cannot take (tokens outside its vocabulary) or score (a
            // non-finite output) is an error row of its own; the others are scored.
            let tokenized: Vec<Result<Vec<u32>>> = idx
                .par_iter()
                .map(|&k| student.tokenize_one(chunk[k].text.as_deref().unwrap()))
                .collect();
            let mut idx_ok = Vec::with_capacity(idx.len());
            let mut ids = Vec::with_capacity(idx.len());
            for (&k, t) in idx.iter().zip(tokenized) {
                match t {
                    Ok(t) => {
                        idx_ok.push(k);
                        ids.push(t);
                    }
                    Err(e) => {
                        rows[base + k].error = Some(format!("failed: {}: {e:#}", chunk[k].location))
                    }
                }
            }
            let (scores, failures) = student.score_ids_lenient(&ids)?;
            for f in failures {
                let k = idx_ok[f.doc];
                rows[base + k].error = Some(format!(
                    "non_finite_output: {}: {}",
                    chunk[k].location, f.message
                ));
            }
            for (n, &k) in idx_ok.iter().enumerate() {
                if rows[base + k].error.is_some() {
                    continue;
                }
                let source = &rows[base + k].source;
                let keep: Vec<usize> = match rel.unmasked_for(source) {
                    Some(names) if !names.is_empty() => labels
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| names.contains(l))
                        .map(|(j, _)| j)
                        .collect(),
                    _ => {
                        let w = format!("source {source}: every anchor masked (or never validated); scored on all anchors");
                        if !warnings.contains(&w) {
                            warnings.push(w);
                        }
                        (0..labels.len()).collect()
                    }
                };
                let vals: Vec<f64> = keep.iter().map(|&j| scores.row(n)[j] as f64).collect();
                rows[base + k].score = stats::trimmed_mean(&vals, opts.trim);
            }
        }
    }
    Ok(rows)
}

/// Whole-text token count with the group student's tokenizer (no truncation).
fn students_tokenizer_count(students: &Students, group: &str, text: &str) -> Option<u64> {
    students
        .loaded
        .get(group)
        .and_then(|s| s.count_tokens(text).ok())
        .map(|n| n as u64)
}

fn read_score_rows(path: &Path) -> Result<Vec<ScoreRow>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad score row", path.display(), i + 1))
        })
        .collect()
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

/// Run the whole selection.
pub fn select(
    files: &[InputFile],
    groups: &Groups,
    students_dir: &Path,
    rel: &Reliability,
    out: &Path,
    opts: &SelectOptions,
) -> Result<Selection> {
    opts.validate()?;
    // Two passes over the inputs (score, then keep): standard input cannot be read twice.
    if files.iter().any(|f| f.path.as_os_str() == "-") {
        bail!("mira select reads its inputs twice: standard input (`-`) cannot be one of them");
    }
    // No kept file may be an input (`--output-dir` pointing into the corpus).
    let input_ids = corpus::InputIds::of(files);
    for f in files {
        input_ids.refuse(&kept_path(out, f))?;
    }
    let mut students = Students {
        dir: students_dir,
        device: opts.device,
        loaded: HashMap::new(),
    };
    // Load every student up front: missing students fail before any work.
    for g in groups.names() {
        students.get(&g)?;
    }
    let mut warnings = Vec::new();
    let all = score_files(files, groups, rel, &mut students, out, opts, &mut warnings)?;
    let (keep, thresholds) = cutoffs(&all, opts, &mut warnings);
    let mut sel = Selection {
        budget: opts.budget,
        cutoff: format!("{:?}", opts.cutoff).to_lowercase(),
        trim: opts.trim,
        thresholds,
        warnings,
        ..Default::default()
    };
    write_kept_files(files, &all, &keep, out, opts, &mut sel)?;
    super::report::write(out, &sel, &all, &keep)?;
    Ok(sel)
}

/// Pass 1: every input's score rows, from its scores file when one exists (a rerun), else
/// scored now and written atomically.
fn score_files(
    files: &[InputFile],
    groups: &Groups,
    rel: &Reliability,
    students: &mut Students,
    out: &Path,
    opts: &SelectOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<Vec<ScoreRow>>> {
    let bar = super::count_bar(files.len() as u64, opts.progress, "select: scoring files");
    let mut all: Vec<Vec<ScoreRow>> = Vec::new();
    for f in files {
        let sp = scores_path(out, f);
        let rows = if sp.exists() {
            read_score_rows(&sp)?
        } else {
            std::fs::create_dir_all(sp.parent().unwrap())?;
            remove_stale_temps(&sp)?;
            let rows = score_file(f, groups, rel, students, opts, warnings)?;
            let mut text = String::new();
            for r in &rows {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            write_atomic(&sp, text.as_bytes())?;
            rows
        };
        all.push(rows);
        bar.inc(1);
    }
    bar.finish_and_clear();

    Ok(all)
}

/// Pass 2: the cutoff of each bucket (group, source or everything) and which records it keeps.
fn cutoffs(
    all: &[Vec<ScoreRow>],
    opts: &SelectOptions,
    warnings: &mut Vec<String>,
) -> (Vec<Vec<bool>>, BTreeMap<String, f64>) {
    let bucket_of = |r: &ScoreRow| -> Option<String> {
        match opts.cutoff {
            Cutoff::Group => r.group.clone(),
            Cutoff::Global => r.group.as_ref().map(|_| "all".to_string()),
            Cutoff::Source => r.group.as_ref().map(|_| r.source.clone()),
        }
    };
    let mut buckets: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (fi, rows) in all.iter().enumerate() {
        for (i, r) in rows.iter().enumerate() {
            if r.error.is_none() && r.score.is_some() {
                if let Some(b) = bucket_of(r) {
                    buckets.entry(b).or_default().push((fi, i));
                }
            }
        }
    }
    let mut keep: Vec<Vec<bool>> = all
        .iter()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    r.error.is_none() && r.group.is_none() && opts.unknown == UnknownSource::Keep
                })
                .collect()
        })
        .collect();
    let mut thresholds = BTreeMap::new();
    for (b, members) in buckets {
        let scores: Vec<f64> = members
            .iter()
            .map(|&(fi, i)| all[fi][i].score.unwrap())
            .collect();
        let tokens: Vec<u64> = members.iter().map(|&(fi, i)| all[fi][i].tokens).collect();
        let (kept, cutoff) = budget_keep(&scores, &tokens, opts.budget);
        if let Some(c) = cutoff {
            // Records tied at the cutoff on both sides: input order decided between them.
            let tied_out = scores
                .iter()
                .zip(&kept)
                .filter(|(s, k)| !**k && **s == c)
                .count();
            if tied_out > 0 {
                let tied_in = scores
                    .iter()
                    .zip(&kept)
                    .filter(|(s, k)| **k && **s == c)
                    .count();
                warnings.push(format!(
                    "{b}: {} records score exactly {c} at the cutoff ({tied_in} kept, {tied_out} dropped, in input order); the students do not separate them",
                    tied_in + tied_out
                ));
            }
            thresholds.insert(b.clone(), c);
        }
        for (m, k) in members.iter().zip(kept) {
            keep[m.0][m.1] = k;
        }
    }
    (keep, thresholds)
}

/// Pass 3: the kept corpus, in the input's format, and the tallies.
fn write_kept_files(
    files: &[InputFile],
    all: &[Vec<ScoreRow>],
    keep: &[Vec<bool>],
    out: &Path,
    opts: &SelectOptions,
    sel: &mut Selection,
) -> Result<()> {
    for (fi, f) in files.iter().enumerate() {
        let dest = kept_path(out, f);
        if !corpus::is_done(out, &dest) {
            std::fs::create_dir_all(dest.parent().unwrap())?;
            remove_stale_temps(&dest)?;
            write_kept(f, &dest, &keep[fi], &all[fi], opts)?;
            corpus::mark_done(out, &dest, b"")?;
        }
        sel.outputs.push(
            dest.strip_prefix(out)
                .unwrap_or(&dest)
                .display()
                .to_string(),
        );
        for (i, r) in all[fi].iter().enumerate() {
            if r.error.is_some() {
                *sel.errors.entry(r.source.clone()).or_default() += 1;
                continue;
            }
            let k = keep[fi][i];
            let group = r.group.clone().unwrap_or_else(|| "(no group)".into());
            for t in [
                &mut sel.total,
                sel.groups.entry(group).or_default(),
                sel.sources.entry(r.source.clone()).or_default(),
            ] {
                t.records += 1;
                t.tokens += r.tokens;
                if k {
                    t.records_kept += 1;
                    t.tokens_kept += r.tokens;
                    if let Some(s) = r.score {
                        t.threshold = Some(t.threshold.map_or(s, |x: f64| x.min(s)));
                    }
                }
            }
        }
    }
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

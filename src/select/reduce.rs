//! The two reduce steps of `mira select`, each over every rank's files: the cutoff pass (exact
//! cutoffs from all score files in bounded memory, `cutoffs.json`) and the report pass (every
//! kept file's tally added up: `selection.json`, `report.md`, the histograms).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cutoff::{self, BucketCut, Entry};
use super::reliability::Reliability;
use super::selection::{
    AnchorUse, Cutoff, FileTally, ScoreHistogram, ScoreRow, SelectOptions, Selection, UnknownSource,
};
use crate::corpus::{self, InputFile};

/// `cutoffs.json`: what the cutoff pass decided, read by every rank's keep pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cutoffs {
    pub budget: f64,
    pub cutoff: Cutoff,
    /// The inputs' relative paths in corpus order (positions in `BucketCut::last_kept` index it).
    pub files: Vec<String>,
    /// Per bucket (group, source, or `all`): where its kept records end; `null` keeps none.
    pub buckets: BTreeMap<String, Option<BucketCut>>,
    /// Per group: the lowest and highest score (the report histograms' range).
    pub groups: BTreeMap<String, (f64, f64)>,
}

pub fn scores_path(out: &Path, f: &InputFile) -> PathBuf {
    scores_root(out).join(corpus::output_name(&f.rel, "scores.jsonl"))
}

pub fn scores_root(out: &Path) -> PathBuf {
    out.join("scores")
}

pub fn kept_path(out: &Path, f: &InputFile) -> PathBuf {
    out.join("kept").join(&f.rel)
}

fn cutoffs_path(out: &Path) -> PathBuf {
    out.join("cutoffs.json")
}

/// The bucket a scored record competes in.
pub fn bucket_of(row: &ScoreRow, cutoff: Cutoff) -> Option<&str> {
    let g = row.group.as_deref()?;
    Some(match cutoff {
        Cutoff::Group => g,
        Cutoff::Global => "all",
        Cutoff::Source => &row.source,
    })
}

impl Cutoffs {
    pub fn load(out: &Path) -> Result<Cutoffs> {
        let path = cutoffs_path(out);
        let bytes = crate::checked::read_small_file(&path, crate::checked::MAX_METADATA_BYTES)
            .with_context(|| "run `mira select --pass cutoff` first".to_string())?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: invalid", path.display()))
    }

    /// A short digest of the decision, stamped on each kept file.
    pub fn id(&self) -> String {
        let text = serde_json::to_string(self).expect("cutoffs serialise");
        // FNV-1a, 64 bits: enough to tell two decisions apart.
        let h = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        format!("{h:016x}")
    }

    /// Whether the record at `pos` is kept.
    pub fn keeps(&self, row: &ScoreRow, pos: (u32, u64), unknown: UnknownSource) -> bool {
        if row.error.is_some() {
            return false;
        }
        if row.group.is_none() {
            return unknown == UnknownSource::Keep;
        }
        match (row.score, bucket_of(row, self.cutoff)) {
            (Some(s), Some(b)) => self
                .buckets
                .get(b)
                .copied()
                .flatten()
                .is_some_and(|c| c.keeps(s, pos)),
            _ => false,
        }
    }

    /// Refuse cutoffs made for other inputs or options.
    pub fn check(&self, files: &[InputFile], opts: &SelectOptions) -> Result<()> {
        let rels: Vec<String> = files.iter().map(|f| f.rel.display().to_string()).collect();
        if rels != self.files || self.budget != opts.budget || self.cutoff != opts.cutoff {
            bail!("cutoffs.json was computed for other inputs or another --budget/--cutoff: rerun `mira select --pass cutoff`");
        }
        Ok(())
    }
}

/// The score rows of one file, in order.
pub fn read_score_rows(path: &Path) -> Result<Vec<ScoreRow>> {
    let mut rows = Vec::new();
    for_each_score_row(path, &mut |_, r| {
        rows.push(r);
        Ok(())
    })?;
    Ok(rows)
}

fn for_each_score_row(path: &Path, f: &mut dyn FnMut(u64, ScoreRow) -> Result<()>) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    for (i, line) in std::io::BufReader::with_capacity(1 << 20, file)
        .lines()
        .enumerate()
    {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let row: ScoreRow = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: bad score row", path.display(), i + 1))?;
        f(i as u64, row)?;
    }
    Ok(())
}

/// The cutoff pass: every file's scores must be done; writes and returns `cutoffs.json`.
pub fn cutoff_pass(files: &[InputFile], out: &Path, opts: &SelectOptions) -> Result<Cutoffs> {
    let missing: Vec<&InputFile> = files
        .iter()
        .filter(|f| !corpus::is_done(&scores_root(out), &scores_path(out, f)))
        .collect();
    if let Some(first) = missing.first() {
        bail!(
            "{} of {} input files have no finished scores (first: {}): run the score pass on every rank first",
            missing.len(),
            files.len(),
            first.path.display()
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ranges: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut scan = |each: &mut dyn FnMut(Entry)| -> Result<()> {
        for (fi, f) in files.iter().enumerate() {
            for_each_score_row(&scores_path(out, f), &mut |i, row| {
                let (Some(score), None) = (row.score, &row.error) else {
                    return Ok(());
                };
                let Some(b) = bucket_of(&row, opts.cutoff) else {
                    return Ok(());
                };
                let r = ranges
                    .entry(row.group.clone().unwrap_or_default())
                    .or_insert((score, score));
                *r = (r.0.min(score), r.1.max(score));
                // Looked up by reference: a name is allocated once per bucket, not per row.
                let bucket = match names.get(b) {
                    Some(&i) => i,
                    None => {
                        let i = names.len();
                        names.insert(b.to_string(), i);
                        i
                    }
                };
                each(Entry {
                    bucket,
                    score,
                    tokens: row.tokens,
                    pos: (fi as u32, i),
                });
                Ok(())
            })?;
        }
        Ok(())
    };
    let stats = cutoff::bucket_stats(&mut scan)?;
    let cuts = cutoff::find_cuts(&stats, opts.budget, cutoff::Limits::default(), &mut scan)?;
    let mut buckets = BTreeMap::new();
    for (name, i) in names {
        buckets.insert(name, cuts[i]);
    }
    let c = Cutoffs {
        budget: opts.budget,
        cutoff: opts.cutoff,
        files: files.iter().map(|f| f.rel.display().to_string()).collect(),
        buckets,
        groups: ranges,
    };
    corpus::write_once(
        &cutoffs_path(out),
        serde_json::to_string_pretty(&c)?.as_bytes(),
    )?;
    Ok(c)
}

/// One kept file's tally, from its score rows and which of them were kept.
pub fn file_tally(
    rows: &[ScoreRow],
    keep: &[bool],
    cutoffs: &Cutoffs,
    masked: &dyn Fn(&str) -> bool,
) -> FileTally {
    let mut t = FileTally {
        cutoffs_id: cutoffs.id(),
        ..Default::default()
    };
    let mut masked_seen = BTreeSet::new();
    for (r, &k) in rows.iter().zip(keep) {
        if r.error.is_some() {
            *t.errors.entry(r.source.clone()).or_default() += 1;
            continue;
        }
        let group = r.group.clone().unwrap_or_else(|| "(no group)".into());
        t.total.add(r.tokens, k, r.score);
        t.groups.entry(group).or_default().add(r.tokens, k, r.score);
        t.sources
            .entry(r.source.clone())
            .or_default()
            .add(r.tokens, k, r.score);
        if let (Some(g), Some(s)) = (&r.group, r.score) {
            let (lo, hi) = cutoffs.groups.get(g).copied().unwrap_or((s, s));
            t.histograms
                .entry(g.clone())
                .or_insert_with(|| ScoreHistogram::over(lo, hi))
                .add(s, k);
            if masked(&r.source) {
                masked_seen.insert(r.source.clone());
            }
        }
    }
    t.masked = masked_seen.into_iter().collect();
    t
}

/// The report pass: every kept file's tally (from its done marker) added up, in corpus order.
/// Per group, each anchor and the sources whose scores use it (unmasked) or not.
fn anchor_use(rel: &Reliability) -> BTreeMap<String, Vec<AnchorUse>> {
    let mut out: BTreeMap<String, Vec<AnchorUse>> = BTreeMap::new();
    for c in &rel.cells {
        let anchors = out.entry(c.cell.group.clone()).or_default();
        let i = match anchors.iter().position(|a| a.anchor == c.cell.anchor) {
            Some(i) => i,
            None => {
                anchors.push(AnchorUse {
                    anchor: c.cell.anchor.clone(),
                    ..Default::default()
                });
                anchors.len() - 1
            }
        };
        let list = if c.masked {
            &mut anchors[i].masked_for
        } else {
            &mut anchors[i].used_for
        };
        list.push(c.cell.source.clone());
    }
    out
}

pub fn report_pass(
    files: &[InputFile],
    rel: &Reliability,
    out: &Path,
    cutoffs: &Cutoffs,
    opts: &SelectOptions,
) -> Result<Selection> {
    let mut sel = Selection {
        budget: opts.budget,
        cutoff: format!("{:?}", opts.cutoff).to_lowercase(),
        trim: opts.trim,
        ..Default::default()
    };
    let mut hists: BTreeMap<String, ScoreHistogram> = BTreeMap::new();
    let mut masked = BTreeSet::new();
    let id = cutoffs.id();
    for f in files {
        let dest = kept_path(out, f);
        let tally: Option<FileTally> =
            corpus::done_summary(out, &dest).and_then(|b| serde_json::from_slice(&b).ok());
        let tally = match tally {
            Some(t) if t.cutoffs_id == id => t,
            _ => bail!(
                "{} is not kept yet under the current cutoffs: run the keep pass on every rank first",
                f.path.display()
            ),
        };
        sel.total.merge(&tally.total);
        for (k, v) in &tally.groups {
            sel.groups.entry(k.clone()).or_default().merge(v);
        }
        for (k, v) in &tally.sources {
            sel.sources.entry(k.clone()).or_default().merge(v);
        }
        for (k, v) in &tally.errors {
            *sel.errors.entry(k.clone()).or_default() += v;
        }
        for (g, h) in &tally.histograms {
            hists
                .entry(g.clone())
                .or_insert_with(|| ScoreHistogram::over(h.lo, h.hi))
                .merge(h);
        }
        masked.extend(tally.masked);
        sel.outputs.push(
            dest.strip_prefix(out)
                .unwrap_or(&dest)
                .display()
                .to_string(),
        );
    }
    for s in masked {
        sel.warnings.push(format!(
            "source {s}: every anchor masked (or never validated); scored on all anchors"
        ));
    }
    for (b, cut) in &cutoffs.buckets {
        let Some(c) = cut else { continue };
        sel.thresholds.insert(b.clone(), c.score);
        if c.tied_dropped > 0 {
            sel.warnings.push(format!(
                "{b}: {} records score exactly {} at the cutoff ({} kept, {} dropped, in input order); the students do not separate them",
                c.tied_kept + c.tied_dropped,
                c.score,
                c.tied_kept,
                c.tied_dropped
            ));
        }
    }
    sel.anchors = anchor_use(rel);
    super::report::write(out, &sel, &hists)?;
    Ok(sel)
}

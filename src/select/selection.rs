//! What `mira select` decides and reports, as data: its options (budget, cutoff, trim), a
//! record's line in a scores file, the selection's tallies per group and source, and each kept
//! file's share of them. Shared by `retain.rs` and `reduce.rs` (which compute them) and
//! `report.rs` (which draws them).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::corpus::FieldNames;
use crate::{Device, LoadOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cutoff {
    Group,
    Global,
    Source,
}

impl std::str::FromStr for Cutoff {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "group" => Ok(Cutoff::Group),
            "global" => Ok(Cutoff::Global),
            "source" => Ok(Cutoff::Source),
            _ => bail!("unknown cutoff '{s}': group, global or source"),
        }
    }
}

/// What to do with records whose source is not in `groups.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSource {
    Error,
    Keep,
    Drop,
}

impl std::str::FromStr for UnknownSource {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(UnknownSource::Error),
            "keep" => Ok(UnknownSource::Keep),
            "drop" => Ok(UnknownSource::Drop),
            _ => bail!("unknown policy '{s}': error, keep or drop"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// Share of tokens kept, in (0, 1].
    pub budget: f64,
    pub cutoff: Cutoff,
    /// Fraction trimmed from each end before averaging anchors.
    pub trim: f64,
    pub unknown: UnknownSource,
    pub fields: FieldNames,
    pub device: Device,
    /// How the students load (precision, batch size, max tokens).
    pub load: LoadOptions,
    /// This worker's share of the input files: (rank, world size), files `rank::world_size`.
    pub shard: (usize, usize),
    /// Records scored per chunk.
    pub chunk: usize,
    pub progress: bool,
}

impl Default for SelectOptions {
    fn default() -> Self {
        SelectOptions {
            budget: 0.5,
            cutoff: Cutoff::Group,
            trim: 0.1,
            unknown: UnknownSource::Error,
            fields: FieldNames::default(),
            device: Device::Auto,
            load: LoadOptions::default(),
            shard: (0, 1),
            chunk: 2048,
            progress: false,
        }
    }
}

impl SelectOptions {
    /// Check the numbers before anything is read or written.
    pub fn validate(&self) -> Result<()> {
        crate::checked::in_range("the budget", self.budget, 0.0, 1.0, true, false)?;
        crate::checked::in_range("the trim", self.trim, 0.0, 0.5, false, true)?;
        crate::checked::count("the chunk size", self.chunk, 1, 1 << 24)?;
        let (rank, world) = self.shard;
        crate::checked::count("the world size", world, 1, 1 << 20)?;
        if rank >= world {
            bail!("rank {rank} is not below world size {world}");
        }
        Ok(())
    }
}

/// One record's line in a scores file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub id: String,
    pub source: String,
    /// `None`: the source is in no group (kept or dropped per `--unknown-source`).
    pub group: Option<String>,
    pub tokens: u64,
    pub score: Option<f64>,
    /// Why the record could not be scored (it is not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Bins of a report histogram.
pub const HIST_BINS: usize = 30;

/// Records per score bin of one group, all and kept, over the group's score range (from the
/// cutoff pass): a report histogram, summed over files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreHistogram {
    pub lo: f64,
    pub hi: f64,
    pub all: Vec<u64>,
    pub kept: Vec<u64>,
}

impl ScoreHistogram {
    /// Empty, over scores from `min` to `max` (widened to 1 around a single value).
    pub fn over(min: f64, max: f64) -> Self {
        let (lo, hi) = if !min.is_finite() || !max.is_finite() {
            (0.0, 1.0)
        } else if max - min < 1e-9 {
            (min - 0.5, max + 0.5)
        } else {
            (min, max)
        };
        ScoreHistogram {
            lo,
            hi,
            all: vec![0; HIST_BINS],
            kept: vec![0; HIST_BINS],
        }
    }

    pub fn bin(&self, v: f64) -> usize {
        (((v - self.lo) / (self.hi - self.lo) * HIST_BINS as f64) as usize).min(HIST_BINS - 1)
    }

    pub fn add(&mut self, score: f64, kept: bool) {
        let b = self.bin(score);
        self.all[b] += 1;
        if kept {
            self.kept[b] += 1;
        }
    }

    pub fn merge(&mut self, other: &ScoreHistogram) {
        for (a, b) in self.all.iter_mut().zip(&other.all) {
            *a += b;
        }
        for (a, b) in self.kept.iter_mut().zip(&other.kept) {
            *a += b;
        }
    }
}

/// One kept file's share of the report, kept in its done marker; the report pass adds them up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileTally {
    /// Which `cutoffs.json` decided the file (a changed cutoff redoes it).
    pub cutoffs_id: String,
    pub total: Tally,
    pub groups: BTreeMap<String, Tally>,
    pub sources: BTreeMap<String, Tally>,
    pub errors: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, ScoreHistogram>,
    /// Sources scored on all anchors because every anchor was masked for them.
    pub masked: Vec<String>,
}

/// The numbers of one bucket (group, source, or everything).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub records: u64,
    pub records_kept: u64,
    pub tokens: u64,
    pub tokens_kept: u64,
    /// Lowest kept score.
    pub threshold: Option<f64>,
}

impl Tally {
    /// Count one record (its score, if kept, may lower the threshold).
    pub fn add(&mut self, tokens: u64, kept: bool, score: Option<f64>) {
        self.records += 1;
        self.tokens += tokens;
        if kept {
            self.records_kept += 1;
            self.tokens_kept += tokens;
            if let Some(s) = score {
                self.threshold = Some(self.threshold.map_or(s, |x: f64| x.min(s)));
            }
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.records += o.records;
        self.records_kept += o.records_kept;
        self.tokens += o.tokens;
        self.tokens_kept += o.tokens_kept;
        self.threshold = match (self.threshold, o.threshold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub budget: f64,
    pub cutoff: String,
    pub trim: f64,
    pub total: Tally,
    pub groups: BTreeMap<String, Tally>,
    pub sources: BTreeMap<String, Tally>,
    /// Cutoff score per bucket.
    pub thresholds: BTreeMap<String, f64>,
    /// Records that could not be scored or read (not kept), by source.
    pub errors: BTreeMap<String, u64>,
    /// Sources with every anchor masked: scored on all anchors instead.
    pub warnings: Vec<String>,
    /// Output files written (relative to the output directory).
    pub outputs: Vec<String>,
    /// Per group, each anchor and the sources it scores (from `reliability.json`).
    #[serde(default)]
    pub anchors: BTreeMap<String, Vec<AnchorUse>>,
}

/// One anchor of a group: the sources whose scores use it, and those it is masked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnchorUse {
    pub anchor: String,
    pub used_for: Vec<String>,
    pub masked_for: Vec<String>,
}

/// JSON summary row for the CLI.
pub fn summary_json(sel: &Selection) -> Value {
    json!({
        "records": sel.total.records,
        "records_kept": sel.total.records_kept,
        "tokens": sel.total.tokens,
        "tokens_kept": sel.total.tokens_kept,
        "thresholds": sel.thresholds,
        "errors": sel.errors,
        "warnings": sel.warnings,
    })
}

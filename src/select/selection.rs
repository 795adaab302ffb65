//! What `mira select` decides and reports, as data: its options (budget, cutoff, trim), a
//! record's line in a scores file, and the selection's tallies per group and source. Shared by
//! `retain.rs` (which computes it) and `report.rs` (which draws it).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::corpus::FieldNames;
use crate::Device;

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

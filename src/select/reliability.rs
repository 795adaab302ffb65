//! Step 5, the reliability mask: a (source, anchor) cell whose validation MAE is above
//! `max_mae`, whose Spearman is below `min_spearman` (or undefined: a constant side), or that
//! has fewer than `min_count` validation records is masked. `select` averages only unmasked
//! anchors of a record's source.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::distill::{Cell, Validation};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Largest acceptable validation MAE, on the labels' scale (0-10 for teacher labels).
    pub max_mae: f64,
    /// Smallest acceptable validation Spearman correlation.
    pub min_spearman: f64,
    /// Fewest validation records a cell needs to be judged at all.
    pub min_count: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_mae: 2.0,
            min_spearman: 0.3,
            min_count: 5,
        }
    }
}

/// A validation cell and the mask's verdict on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedCell {
    #[serde(flatten)]
    pub cell: Cell,
    pub masked: bool,
    /// Why it is masked (empty when not).
    pub reasons: Vec<String>,
}

/// `reliability.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reliability {
    pub thresholds: Thresholds,
    pub cells: Vec<MaskedCell>,
    /// source -> anchors kept for its records' scores
    pub unmasked: BTreeMap<String, Vec<String>>,
}

impl Reliability {
    pub fn load(path: &Path) -> Result<Reliability> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a reliability.json", path.display()))
    }
    /// Anchors usable for a source (`None` when the source had no validation cell at all).
    pub fn unmasked_for(&self, source: &str) -> Option<&[String]> {
        self.unmasked.get(source).map(Vec::as_slice)
    }
}

pub fn mask(v: &Validation, t: &Thresholds) -> Reliability {
    let mut cells = Vec::new();
    let mut unmasked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &v.cells {
        let mut reasons = Vec::new();
        if c.n < t.min_count {
            reasons.push(format!("{} validation records < {}", c.n, t.min_count));
        }
        match c.mae {
            Some(m) if m > t.max_mae => reasons.push(format!("MAE {m:.3} > {}", t.max_mae)),
            None => reasons.push("no MAE".into()),
            _ => {}
        }
        match c.spearman {
            Some(r) if r < t.min_spearman => {
                reasons.push(format!("Spearman {r:.3} < {}", t.min_spearman))
            }
            None => reasons.push("Spearman undefined (a constant side)".into()),
            _ => {}
        }
        let masked = !reasons.is_empty();
        let entry = unmasked.entry(c.source.clone()).or_default();
        if !masked {
            entry.push(c.anchor.clone());
        }
        cells.push(MaskedCell {
            cell: c.clone(),
            masked,
            reasons,
        });
    }
    Reliability {
        thresholds: *t,
        cells,
        unmasked,
    }
}

pub fn write(r: &Reliability, path: &Path) -> Result<()> {
    crate::corpus::write_atomic(path, serde_json::to_string_pretty(r)?.as_bytes())
}

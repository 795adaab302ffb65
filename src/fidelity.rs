//! The fidelity guard: how far a model run at one precision (int8, bf16 on the CPU, f16 on a GPU)
//! lands from the same model at a reference precision (f32), on the user's own documents, and
//! whether that is close enough to trust (`mira bench --precision P --against f32`).
//!
//! Reported: the pooled embedding's (`mira embed`'s output) cosine to the reference (min, 1st percentile, mean); per
//! label, the largest absolute difference, that difference as a share of the reference scores'
//! range, and the Spearman correlation; and the overlap of a 50% token-budget selection (by the
//! mean of the labels, as `mira select` keeps a budget) with the reference's, as a share of the
//! reference's kept tokens.

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::select::retain::budget_keep;
use crate::select::stats::spearman;
use crate::Scorer;

/// The thresholds a precision must meet to be trusted by default.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Guard {
    /// Lowest cosine of any document's pooled embedding to the reference's.
    pub min_cosine: f64,
    /// Largest difference of any label, as a share of that label's range on these documents.
    pub max_share_of_range: f64,
    /// Smallest share of the reference's kept tokens a 50% selection must also keep.
    pub min_selection_overlap: f64,
}

impl Default for Guard {
    fn default() -> Guard {
        Guard {
            min_cosine: 0.999,
            max_share_of_range: 0.01,
            min_selection_overlap: 0.98,
        }
    }
}

/// Embedding agreement over the documents.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingFidelity {
    pub cosine_min: f64,
    pub cosine_p1: f64,
    pub cosine_mean: f64,
    pub max_abs: f64,
}

/// One label's agreement.
#[derive(Debug, Clone, Serialize)]
pub struct LabelFidelity {
    pub label: String,
    pub max_abs: f64,
    /// `max_abs` over the reference's (max − min) on these documents.
    pub share_of_range: f64,
    pub spearman: Option<f64>,
}

/// The guard's report.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityReport {
    pub precision: String,
    pub against: String,
    pub docs: usize,
    pub tokens: usize,
    pub embedding: EmbeddingFidelity,
    pub labels: Vec<LabelFidelity>,
    /// Share of the reference's kept tokens (50% budget, mean of labels) the candidate also
    /// keeps; `None` for a model without labels.
    pub selection_overlap: Option<f64>,
    pub guard: Guard,
    /// Each threshold missed, in words; empty when the precision passes.
    pub failures: Vec<String>,
}

impl FidelityReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Run `candidate` and `reference` (the same model at two precisions) over `ids` and compare.
pub fn compare(
    candidate: &Scorer,
    reference: &Scorer,
    ids: &[Vec<u32>],
    names: (&str, &str),
    guard: Guard,
) -> Result<FidelityReport> {
    ensure!(
        !ids.is_empty(),
        "the fidelity guard needs at least one document"
    );
    let (got, want) = (candidate.embed_ids(ids)?, reference.embed_ids(ids)?);
    ensure!(
        got.dim == want.dim,
        "the two runs give embeddings of {} and {} values",
        got.dim,
        want.dim
    );
    let embedding = embedding_fidelity(&got.values, &want.values, got.dim);
    let (mut labels, mut selection_overlap) = (Vec::new(), None);
    if candidate.head().is_some() {
        let (got, want) = (candidate.score_ids(ids)?, reference.score_ids(ids)?);
        let n = want.labels.len();
        for (l, name) in want.labels.iter().enumerate() {
            let col = |s: &crate::Scores| -> Vec<f64> {
                (0..s.n_docs()).map(|d| s.row(d)[l] as f64).collect()
            };
            labels.push(label_fidelity(name, &col(&got), &col(&want)));
        }
        let mean = |s: &crate::Scores| -> Vec<f64> {
            (0..s.n_docs())
                .map(|d| s.row(d).iter().map(|&v| v as f64).sum::<f64>() / n as f64)
                .collect()
        };
        let tokens: Vec<u64> = ids.iter().map(|d| d.len() as u64).collect();
        selection_overlap = Some(overlap(&mean(&got), &mean(&want), &tokens, 0.5));
    }
    let mut report = FidelityReport {
        precision: names.0.to_string(),
        against: names.1.to_string(),
        docs: ids.len(),
        tokens: ids.iter().map(Vec::len).sum(),
        embedding,
        labels,
        selection_overlap,
        guard,
        failures: Vec::new(),
    };
    report.failures = failures(&report);
    Ok(report)
}

fn embedding_fidelity(got: &[f32], want: &[f32], dim: usize) -> EmbeddingFidelity {
    let mut cosines: Vec<f64> = got
        .chunks_exact(dim)
        .zip(want.chunks_exact(dim))
        .map(|(g, w)| cosine(g, w))
        .collect();
    cosines.sort_by(f64::total_cmp);
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).abs())
        .fold(0.0, f64::max);
    EmbeddingFidelity {
        cosine_min: cosines[0],
        cosine_p1: cosines[(cosines.len() - 1) / 100],
        cosine_mean: cosines.iter().sum::<f64>() / cosines.len() as f64,
        max_abs,
    }
}

/// Cosine similarity; two zero vectors agree (1), a zero and a non-zero do not (0).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match (aa > 0.0, bb > 0.0) {
        (true, true) => ab / (aa.sqrt() * bb.sqrt()),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

fn label_fidelity(name: &str, got: &[f64], want: &[f64]) -> LabelFidelity {
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    let (lo, hi) = want
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    LabelFidelity {
        label: name.to_string(),
        max_abs,
        share_of_range: if range > 0.0 {
            max_abs / range
        } else if max_abs == 0.0 {
            0.0
        } else {
            f64::INFINITY
        },
        spearman: spearman(got, want),
    }
}

/// Share of the tokens `want`'s top `budget` keeps that `got`'s top `budget` also keeps.
pub fn overlap(got: &[f64], want: &[f64], tokens: &[u64], budget: f64) -> f64 {
    let (keep_got, _) = budget_keep(got, tokens, budget);
    let (keep_want, _) = budget_keep(want, tokens, budget);
    let (mut both, mut kept) = (0u64, 0u64);
    for ((&g, &w), &t) in keep_got.iter().zip(&keep_want).zip(tokens) {
        if w {
            kept += t;
            if g {
                both += t;
            }
        }
    }
    if kept == 0 {
        1.0
    } else {
        both as f64 / kept as f64
    }
}

fn failures(r: &FidelityReport) -> Vec<String> {
    let g = r.guard;
    let mut out = Vec::new();
    if r.embedding.cosine_min < g.min_cosine {
        out.push(format!(
            "embedding cosine {:.5} below {}",
            r.embedding.cosine_min, g.min_cosine
        ));
    }
    for l in &r.labels {
        if l.share_of_range > g.max_share_of_range {
            out.push(format!(
                "label {} off by {:.2}% of its range (limit {}%)",
                l.label,
                100.0 * l.share_of_range,
                100.0 * g.max_share_of_range
            ));
        }
    }
    if let Some(o) = r.selection_overlap.filter(|&o| o < g.min_selection_overlap) {
        out.push(format!(
            "a 50% selection keeps {:.2}% of the reference's tokens (limit {}%)",
            100.0 * o,
            100.0 * g.min_selection_overlap
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_the_reference_tokens_also_kept() {
        let tokens = [10, 10, 10, 10];
        // Same order: identical selections.
        assert_eq!(
            overlap(&[4., 3., 2., 1.], &[4., 3., 2., 1.], &tokens, 0.5),
            1.0
        );
        // The reference keeps docs 0 and 1; the candidate keeps 0 and 2.
        assert_eq!(
            overlap(&[4., 1., 3., 0.], &[4., 3., 2., 1.], &tokens, 0.5),
            0.5
        );
        // Nothing in common.
        assert_eq!(
            overlap(&[1., 2., 3., 4.], &[4., 3., 2., 1.], &tokens, 0.5),
            0.0
        );
    }

    #[test]
    fn cosine_and_ranges_handle_degenerate_inputs() {
        assert_eq!(cosine(&[0., 0.], &[0., 0.]), 1.0);
        assert_eq!(cosine(&[1., 0.], &[0., 0.]), 0.0);
        assert!((cosine(&[1., 2.], &[2., 4.]) - 1.0).abs() < 1e-12);
        let flat = label_fidelity("x", &[1.0, 1.0], &[1.0, 1.0]);
        assert_eq!(flat.share_of_range, 0.0);
        let off = label_fidelity("x", &[1.0, 2.0], &[1.0, 1.0]);
        assert!(off.share_of_range.is_infinite());
    }
}

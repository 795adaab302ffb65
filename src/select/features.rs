//! What a student's head reads from its frozen encoder, chosen per group by validation.
//!
//! Three candidates: the BERT pooler output tanh(P·h_[CLS] + p), which is what
//! `BertForSequenceClassification`'s classifier reads; the final [CLS] hidden state; and the
//! mean of the final hidden states (what most sentence-transformers models pool). The encoder
//! runs once per batch with [`Pooling::ClsAndMean`](crate::Pooling::ClsAndMean) and every
//! candidate is derived from that row, the pooler on the host (an H×H product per record, small
//! beside the encoder). When every head of a shared encoder reads the pooler, `mira select`
//! asks the encoder for the pooler output itself ([`Row::Pooler`]) and the host does nothing.

use std::borrow::Cow;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::model::weights::Weights;

/// One candidate input of a student's linear head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    /// tanh(P·h_[CLS] + p): exported as `BertForSequenceClassification`.
    Pooler,
    /// h_[CLS]: exported as a sentence-transformers folder (CLS pooling, Dense head).
    Cls,
    /// mean over tokens of h: exported as a sentence-transformers folder (mean pooling, Dense).
    Mean,
}

impl Feature {
    /// Every candidate, in the order ties are broken (the pooler first: its export is the one
    /// transformers' `AutoModelForSequenceClassification` loads).
    pub const ALL: [Feature; 3] = [Feature::Pooler, Feature::Cls, Feature::Mean];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Pooler => "pooler",
            Feature::Cls => "cls",
            Feature::Mean => "mean",
        }
    }

    /// A sentence for reports and student cards.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Pooler => "BERT pooler output tanh(P·h_[CLS] + p)",
            Feature::Cls => "final [CLS] hidden state",
            Feature::Mean => "mean of the final hidden states",
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `mira distill --feature`: one feature for every group, or the best by validation per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureChoice {
    #[default]
    Auto,
    Fixed(Feature),
}

impl FeatureChoice {
    /// The candidates tried.
    pub fn candidates(self) -> Vec<Feature> {
        match self {
            FeatureChoice::Auto => Feature::ALL.to_vec(),
            FeatureChoice::Fixed(f) => vec![f],
        }
    }
}

impl FromStr for FeatureChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => FeatureChoice::Auto,
            "pooler" => FeatureChoice::Fixed(Feature::Pooler),
            "cls" => FeatureChoice::Fixed(Feature::Cls),
            "mean" => FeatureChoice::Fixed(Feature::Mean),
            other => bail!("unknown feature '{other}' (expected auto, pooler, cls or mean)"),
        })
    }
}

/// A BERT pooler, applied on the host: tanh(weight · cls + bias).
#[derive(Debug, Clone)]
pub struct Pooler {
    /// `[hidden, hidden]`, row-major (output rows).
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Pooler {
    /// The encoder's `pooler.dense` (under its prefix), or `None` when it has none.
    pub fn read(weights: &Weights, hidden: usize) -> Result<Option<Pooler>> {
        let name = |t: &str| format!("{}pooler.dense.{t}", weights.prefix());
        if !weights.contains(&name("weight")) {
            return Ok(None);
        }
        Ok(Some(Pooler {
            weight: weights.f32(&name("weight"), &[hidden, hidden])?,
            bias: weights.f32(&name("bias"), &[hidden])?,
        }))
    }

    /// tanh(weight · cls + bias) in f32, as the encoder's own pooler computes it. Sixteen
    /// independent partial sums per row, so the compiler vectorises the product: `mira select`
    /// runs this on its writer thread for every record whose head reads the pooler when other
    /// heads read other features.
    pub fn apply(&self, cls: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(cls.len())
            .zip(&self.bias)
            .map(|(w, b)| {
                let mut acc = [0f32; 16];
                let (wc, xc) = (w.chunks_exact(16), cls.chunks_exact(16));
                let tail: f32 = wc
                    .remainder()
                    .iter()
                    .zip(xc.remainder())
                    .map(|(a, x)| a * x)
                    .sum();
                for (wk, xk) in wc.zip(xc) {
                    for (a, (w, x)) in acc.iter_mut().zip(wk.iter().zip(xk)) {
                        *a += w * x;
                    }
                }
                (acc.iter().sum::<f32>() + tail + b).tanh()
            })
            .collect()
    }
}

/// What one record's row from the shared encoder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// The pooler output, `[hidden]` (every head reads the pooler).
    Pooler,
    /// `[CLS | mean]`, `[2 · hidden]`.
    ClsAndMean,
}

impl Row {
    /// The row that serves every feature in `needed`.
    pub fn serving(needed: impl IntoIterator<Item = Feature>) -> Row {
        let mut only_pooler = true;
        for f in needed {
            only_pooler &= f == Feature::Pooler;
        }
        if only_pooler {
            Row::Pooler
        } else {
            Row::ClsAndMean
        }
    }
}

/// Feature `kind` of a record whose row is laid out as `row_kind` says. Fails when the row cannot
/// give it (the pooler of an encoder without one).
pub fn feature<'a>(
    kind: Feature,
    row: &'a [f32],
    row_kind: Row,
    pooler: Option<&Pooler>,
) -> Result<Cow<'a, [f32]>> {
    Ok(match (row_kind, kind) {
        (Row::Pooler, Feature::Pooler) => Cow::Borrowed(row),
        (Row::Pooler, _) => bail!("the encoder's pooler output cannot give the {kind} feature"),
        (Row::ClsAndMean, Feature::Cls) => Cow::Borrowed(&row[..row.len() / 2]),
        (Row::ClsAndMean, Feature::Mean) => Cow::Borrowed(&row[row.len() / 2..]),
        (Row::ClsAndMean, Feature::Pooler) => match pooler {
            Some(p) => Cow::Owned(p.apply(&row[..row.len() / 2])),
            None => bail!("the encoder has no pooler (pooler.dense): no pooler feature"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_come_from_their_half_of_the_row() {
        let row = [1.0, 2.0, 3.0, 4.0];
        let f = |k| feature(k, &row, Row::ClsAndMean, None);
        assert_eq!(&*f(Feature::Cls).unwrap(), &[1.0, 2.0]);
        assert_eq!(&*f(Feature::Mean).unwrap(), &[3.0, 4.0]);
        assert!(f(Feature::Pooler).is_err());
        let p = Pooler {
            weight: vec![1.0, 0.0, 0.5, 0.5],
            bias: vec![0.0, -1.0],
        };
        let got = feature(Feature::Pooler, &row, Row::ClsAndMean, Some(&p)).unwrap();
        assert_eq!(&*got, &[1f32.tanh(), 0.5f32.tanh()]);
        assert!(feature(Feature::Mean, &row, Row::Pooler, None).is_err());
    }

    #[test]
    fn one_row_serves_the_features_heads_need() {
        assert_eq!(
            Row::serving([Feature::Pooler, Feature::Pooler]),
            Row::Pooler
        );
        assert_eq!(
            Row::serving([Feature::Pooler, Feature::Mean]),
            Row::ClsAndMean
        );
        assert_eq!(Row::serving([Feature::Cls]), Row::ClsAndMean);
    }

    #[test]
    fn choices_parse() {
        assert_eq!(
            "auto".parse::<FeatureChoice>().unwrap(),
            FeatureChoice::Auto
        );
        assert_eq!(
            "mean".parse::<FeatureChoice>().unwrap(),
            FeatureChoice::Fixed(Feature::Mean)
        );
        assert!("max".parse::<FeatureChoice>().is_err());
    }
}

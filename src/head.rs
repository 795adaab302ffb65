//! What a checkpoint's outputs mean: its labels (made unique and safe by `crate::names`) and
//! problem type, and the activation that turns its raw outputs into scores. Shared by the
//! scorer and by `mira select`, which applies students' heads itself.

use std::path::Path;

use anyhow::{bail, Result};

use crate::model::config::{ModelConfig, ProblemType};

/// What a checkpoint's outputs mean.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadInfo {
    pub labels: Vec<String>,
    pub problem_type: ProblemType,
}

/// What the `n` outputs of the checkpoint in `dir` mean: labels from `config.json` made unique
/// and safe by [`crate::names::label_names`], and the problem type (transformers' own rule when
/// it is unset).
pub fn head_info(dir: &Path, cfg: &ModelConfig, n: usize) -> Result<HeadInfo> {
    let labels = match &cfg.declared_labels {
        Some(l) if l.len() == n => l.clone(),
        Some(l) if l.len() > 1 || n == 1 => bail!(
            "{}: the classifier has {n} outputs but config.json names {} labels",
            dir.display(),
            l.len()
        ),
        _ => (0..n).map(|i| format!("LABEL_{i}")).collect(),
    };
    let problem_type = cfg.problem_type.unwrap_or(if n == 1 {
        ProblemType::Regression
    } else {
        ProblemType::SingleLabel
    });
    Ok(HeadInfo {
        labels: crate::names::label_names(&labels),
        problem_type,
    })
}

/// A head's raw outputs (logits) turned into scores as the problem type says: raw for
/// regression, softmax for single-label and sigmoid for multi-label classification.
pub fn activate_outputs(problem_type: ProblemType, row: &mut [f32]) {
    match problem_type {
        ProblemType::Regression => {}
        ProblemType::SingleLabel => softmax(row),
        ProblemType::MultiLabel => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
    }
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

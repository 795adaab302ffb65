//! Encoder architectures, written once over the backend interface, and checkpoint loading.

pub mod bert;
pub mod config;
pub mod modernbert;
pub mod st;
pub mod weights;

use std::path::Path;

use anyhow::{bail, Result};

use crate::engine::backend::cpu::CpuBackend;
use crate::engine::{Batch, Device, Pooling};
use config::{Arch, ModelConfig};
use weights::Weights;

/// A loaded encoder on some device: the dyn-safe face of `Bert<B>` / `ModernBert<B>` for every
/// backend `B`.
pub trait Encoder: Send + Sync {
    fn device_name(&self) -> String;
    fn hidden_size(&self) -> usize;
    /// Classifier outputs; 0 when the checkpoint has no head.
    fn num_outputs(&self) -> usize;
    fn max_positions(&self) -> usize;
    /// Rows of the word-embedding table: token ids must be below this.
    fn vocab_size(&self) -> usize;
    /// Pooled final hidden states, `[n_seqs, hidden]`, sequences in batch order.
    fn pooled(&self, batch: &Batch, pooling: Pooling) -> Result<Vec<f32>>;
    /// Raw head outputs, `[n_seqs, num_outputs]`, sequences in batch order.
    fn logits(&self, batch: &Batch) -> Result<Vec<f32>>;
}

/// Build the encoder described by `cfg` from `weights` on a concrete `device`.
pub fn load_encoder(
    cfg: &ModelConfig,
    weights: &Weights,
    device: Device,
) -> Result<Box<dyn Encoder>> {
    let with_head = match cfg.architecture.as_str() {
        "BertForSequenceClassification" | "ModernBertForSequenceClassification" => true,
        "BertModel" | "ModernBertModel" => false,
        _ => weights.contains("classifier.weight"),
    };
    match (&cfg.arch, device) {
        (Arch::Bert(c), Device::Cpu) => Ok(Box::new(bert::Bert::load(
            CpuBackend, c, weights, with_head,
        )?)),
        (Arch::ModernBert(c), Device::Cpu) => Ok(Box::new(modernbert::ModernBert::load(
            CpuBackend, c, weights, with_head,
        )?)),
        (_, other) => bail!("device '{other}' is not available in this build"),
    }
}

/// Whether a folder looks like a checkpoint (used for early, clear errors).
pub fn check_folder(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).exists() {
            bail!("model folder {} has no {f}", dir.display());
        }
    }
    Ok(())
}

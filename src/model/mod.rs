//! Encoder architectures, written once over the backend interface, and checkpoint loading.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod deberta;
pub mod gte;
pub mod modernbert;
mod sizes;
pub mod st;
pub mod weights;

use anyhow::{bail, Context, Result};

use crate::engine::backend::Backend;
use crate::engine::{Batch, GraphStats, OnBackend, Pooling};
use config::{Arch, HeadLayout, ModelConfig};
use weights::Weights;

/// A loaded encoder on some device: the dyn-safe face of `Bert<B>` (BERT, RoBERTa, XLM-R) / `ModernBert<B>` / `Gte<B>` for every
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
    /// What a linear classifier reads, `[n_seqs, hidden]`: for BERT the pooler output
    /// tanh(W·h_[CLS] + b); for a RoBERTa classifier tanh(classifier.dense(h_<s>)). `mira
    /// distill` fits its heads on these.
    fn features(&self, batch: &Batch) -> Result<Vec<f32>>;
    /// Raw head outputs, `[n_seqs, num_outputs]`, sequences in batch order.
    fn logits(&self, batch: &Batch) -> Result<Vec<f32>>;
    /// The most tokens one batch may hold on this device (its largest binding), if bounded.
    fn max_batch_tokens(&self) -> Option<usize>;
    /// Forward FLOPs (a multiply-add is 2) of the encoder on one sequence of `n` tokens: the dense
    /// layers plus the attention products over the keys each token sees (no padding). The head
    /// is left out (a rounding error). Benchmarks turn this into achieved FLOP/s and MFU.
    fn flops(&self, n: usize) -> f64;
    /// Forward passes that may run at once on this encoder (see `Backend::concurrency`).
    fn concurrency(&self) -> usize {
        1
    }
    /// Graph counters of the backend, where it has graphs (see `Backend::graph_stats`).
    fn graph_stats(&self) -> Option<GraphStats> {
        None
    }
    /// Start or end the backend's calibration; whether it calibrates (`Backend::set_calibrating`).
    fn set_calibrating(&self, on: bool) -> bool {
        let _ = on;
        false
    }
}

/// A process-unique name for a loaded model, so the forward passes of two models on one backend
/// never share a `Backend::run_forward` kind.
pub(crate) fn model_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Uploads checkpoint tensors to a backend, checking each against the shape the model expects
/// (errors name the tensor and its file); tensors stored in f32 go in read in place from the
/// mapped file (`HostF32`).
pub(crate) struct Loader<'a, B: crate::engine::Backend> {
    pub be: &'a B,
    pub w: &'a Weights,
}

impl<B: crate::engine::Backend> Loader<'_, B> {
    /// A `[rows, cols]` matrix.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<B::Tensor> {
        self.be
            .weight(self.w.host_f32(name, &[rows, cols])?, rows, cols)
            .with_context(|| format!("cannot place tensor {name} on {}", self.be.name()))
    }

    /// The `[out, in]` weight of an encoder layer's linear map (see `Backend::linear_weight`).
    pub fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        kind: crate::engine::LinearKind,
    ) -> Result<B::Tensor> {
        self.be
            .linear_weight(self.w.host_f32(name, &[rows, cols])?, rows, cols, kind)
            .with_context(|| format!("cannot place tensor {name} on {}", self.be.name()))
    }

    /// A `[n]` vector, as `[1, n]`.
    pub fn vector(&self, name: &str, n: usize) -> Result<B::Tensor> {
        self.be
            .weight(self.w.host_f32(name, &[n])?, 1, n)
            .with_context(|| format!("cannot place tensor {name} on {}", self.be.name()))
    }

    /// Row `row` of a `[rows, cols]` table, as `[1, cols]`.
    pub fn row(&self, name: &str, rows: usize, cols: usize, row: usize) -> Result<B::Tensor> {
        let data = self.w.f32(name, &[rows, cols])?;
        self.be
            .weight(data[row * cols..(row + 1) * cols].to_vec(), 1, cols)
    }

    /// A `[n]` bias that exists only when the config says so.
    pub fn bias(&self, present: bool, name: &str, n: usize) -> Result<Option<B::Tensor>> {
        present.then(|| self.vector(name, n)).transpose()
    }
}

/// The encoder of a checkpoint, to be built on whatever backend the device registry makes
/// (`engine::device::build_on`).
pub struct EncoderLoader<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: &'a Weights,
}

impl OnBackend for EncoderLoader<'_> {
    type Output = Box<dyn Encoder>;
    fn build<B: Backend>(&self, backend: B) -> Result<Box<dyn Encoder>> {
        load_encoder_on(self.cfg, self.weights, backend)
    }
}

/// The encoder of a checkpoint on `backend`, with its head when the checkpoint has one.
pub fn load_encoder_on<B: Backend>(
    cfg: &ModelConfig,
    weights: &Weights,
    backend: B,
) -> Result<Box<dyn Encoder>> {
    let with_head = match cfg.architecture.as_str() {
        "BertForSequenceClassification"
        | "DebertaV2ForSequenceClassification"
        | "RobertaForSequenceClassification"
        | "XLMRobertaForSequenceClassification"
        | "ModernBertForSequenceClassification"
        | "NewForSequenceClassification" => true,
        "BertModel" | "DebertaV2Model" | "RobertaModel" | "XLMRobertaModel" | "ModernBertModel"
        | "NewModel" => false,
        "PyTorchModelHubMixin" => true,
        _ => {
            weights.contains("classifier.weight") || weights.contains("classifier.out_proj.weight")
        }
    };
    Ok(match &cfg.arch {
        Arch::Bert(c) => Box::new(bert::Bert::load(backend, c, weights, with_head, cfg.head)?),
        Arch::Deberta(c) => Box::new(deberta::Deberta::load(
            backend, c, weights, with_head, cfg.head,
        )?),
        Arch::ModernBert(_) if cfg.head == HeadLayout::MixinFc => {
            bail!("a PyTorchModelHubMixin classifier on a ModernBERT base model is not supported")
        }
        Arch::ModernBert(c) => Box::new(modernbert::ModernBert::load(
            backend, c, weights, with_head,
        )?),
        Arch::Gte(_) if cfg.head == HeadLayout::MixinFc => {
            bail!("a PyTorchModelHubMixin classifier on a GTE base model is not supported")
        }
        Arch::Gte(c) => Box::new(gte::Gte::load(backend, c, weights, with_head)?),
    })
}

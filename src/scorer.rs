//! The library's front door: load a checkpoint folder onto a device, then score or embed texts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::engine::backend::Backend;
use crate::engine::{self, BackendOptions, Batch, Device, GraphStats, Packer, Pooling};
pub use crate::head::{activate_outputs, head_info, HeadInfo};
use crate::model::checkpoint::Checkpoint;
use crate::model::st::SentenceConfig;
use crate::model::{self, Encoder};
use crate::text::TextEncoder;

mod calibration;
mod pooled;
mod tokens;

/// On CUDA, batches of at most this many tokens run as CUDA graphs unless told otherwise
/// (`--cuda-graphs`): on an H200, one 128-token document per batch ran 1.2x (BERT-base) to 2.3x
/// (MiniLM) faster replayed from a graph than launched op by op (BENCHMARKS.md), and batches of
/// more tokens than this are not held up by launches.
pub const DEFAULT_CUDA_GRAPH_TOKENS: usize = 512;

/// Options for [`Scorer::load_with`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Truncation limit in tokens, special tokens included. Default: `sentence_bert_config.json`
    /// `max_seq_length` when present, else the model's `max_position_embeddings`.
    pub max_tokens: Option<usize>,
    /// How documents are packed into batches; `None` picks the device's default
    /// ([`engine::default_packer`]).
    pub packer: Option<Packer>,
    /// Storage precision (default `auto`: f16 on GPUs that support it, f32 on the CPU; int8 is
    /// CPU only).
    pub precision: engine::Precision,
    /// On CUDA, batches of at most this many tokens run as CUDA graphs once their shape
    /// repeats (one graph launch instead of ~10 launches per layer); 0 never. Default:
    /// [`DEFAULT_CUDA_GRAPH_TOKENS`].
    pub cuda_graph_tokens: usize,
    /// For a `PyTorchModelHubMixin` classifier (NeMo Curator's): the base model's folder (its
    /// config.json and tokenizer.json). Default: `base_model` from the checkpoint's config.json,
    /// as a local path or in the local Hugging Face cache (see `model::checkpoint`).
    pub base_model: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tokens: None,
            packer: None,
            precision: engine::Precision::default(),
            cuda_graph_tokens: DEFAULT_CUDA_GRAPH_TOKENS,
            base_model: None,
        }
    }
}

/// A documents × outputs matrix of scores, with the output names.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub labels: Vec<String>,
    /// Row-major `[docs, labels.len()]`.
    pub values: Vec<f32>,
}

impl Scores {
    pub fn n_docs(&self) -> usize {
        self.values.len() / self.labels.len().max(1)
    }
    pub fn row(&self, doc: usize) -> &[f32] {
        let n = self.labels.len();
        &self.values[doc * n..(doc + 1) * n]
    }
}

/// A documents × dimension matrix of pooled embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub dim: usize,
    /// Row-major `[docs, dim]`.
    pub values: Vec<f32>,
}

impl Embeddings {
    pub fn n_docs(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }
    pub fn row(&self, doc: usize) -> &[f32] {
        &self.values[doc * self.dim..(doc + 1) * self.dim]
    }
}

/// A loaded student: tokenizer, encoder on a device, head and pooling metadata.
pub struct Scorer {
    dir: PathBuf,
    /// One engine per device (several for `cuda:all`); the first answers questions about the
    /// model, all of them run batches.
    engines: Vec<Box<dyn Encoder>>,
    text: TextEncoder,
    sentence: SentenceConfig,
    head: Option<HeadInfo>,
    /// Whether the head is the sentence-transformers `Dense` module (applied on the host after
    /// the pooling) rather than the checkpoint's own classifier.
    dense_head: bool,
    packer: Packer,
    device_note: Option<String>,
}

/// A lenient call's result, or an error naming its first failed document.
fn strict<T>((value, failures): (T, Vec<DocFailure>)) -> Result<T> {
    match failures.into_iter().next() {
        Some(f) => bail!("document {}: {}", f.doc, f.message),
        None => Ok(value),
    }
}

/// Whether the checkpoint's sentence-transformers `Dense` module is its head (checking that it
/// reads the encoder's width). It is when config.json says what its outputs mean, as `mira
/// distill` writes: a `problem_type` and one `id2label` entry per output, no classifier of the
/// model's own and no Normalize after it. Otherwise it is part of the embedding, as
/// sentence-transformers applies it.
fn dense_is_head(
    dir: &Path,
    cfg: &model::config::ModelConfig,
    sentence: &SentenceConfig,
    encoder: &dyn Encoder,
) -> Result<bool> {
    let Some(d) = &sentence.dense else {
        return Ok(false);
    };
    if d.in_features != encoder.hidden_size() {
        bail!(
            "{}: the Dense module reads {} values but the encoder's hidden size is {}",
            dir.display(),
            d.in_features,
            encoder.hidden_size()
        );
    }
    Ok(encoder.num_outputs() == 0
        && cfg.problem_type.is_some()
        && !sentence.normalize
        && cfg
            .declared_labels
            .as_ref()
            .is_some_and(|l| l.len() == d.out_features))
}

impl Scorer {
    /// Load a Hugging Face checkpoint folder with default options.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Scorer> {
        Self::load_with(dir, device, LoadOptions::default())
    }

    pub fn load_with(dir: impl AsRef<Path>, device: Device, opts: LoadOptions) -> Result<Scorer> {
        let dir = dir.as_ref();
        let (device, mut device_note) = engine::resolve(device)?;
        if let Some(note) = engine::device::precision_note(device, opts.precision) {
            device_note = Some(match device_note {
                Some(auto) => format!("{auto}; {note}"),
                None => note,
            });
        }
        let ckpt = Checkpoint::open(dir, opts.base_model.as_deref())?;
        let backend_opts = BackendOptions {
            precision: opts.precision,
            cuda_graph_tokens: opts.cuda_graph_tokens,
        };
        let loader = model::EncoderLoader {
            cfg: &ckpt.config,
            weights: &ckpt.weights,
        };
        let engines = engine::device::expand(device)?
            .into_iter()
            .map(|d| {
                engine::device::build_on(d, backend_opts, &loader)
                    .with_context(|| format!("cannot load model {} on {d}", dir.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let packer = opts
            .packer
            .unwrap_or_else(|| engine::default_packer(device));
        Self::assemble(ckpt, engines, opts, packer, device_note)
    }

    /// Load a checkpoint onto a backend the caller built (the tests' CPU emulation of the
    /// CUDA kernels, say); batches are packed as for the CPU unless `opts.packer` says otherwise.
    pub fn load_on_backend<B: Backend>(
        dir: impl AsRef<Path>,
        backend: B,
        opts: LoadOptions,
    ) -> Result<Scorer> {
        let dir = dir.as_ref();
        let ckpt = Checkpoint::open(dir, opts.base_model.as_deref())?;
        let name = backend.name();
        let engine = model::load_encoder_on(&ckpt.config, &ckpt.weights, backend)
            .with_context(|| format!("cannot load model {} on {name}", dir.display()))?;
        let packer = opts
            .packer
            .unwrap_or_else(|| engine::default_packer(Device::Cpu));
        Self::assemble(ckpt, vec![engine], opts, packer, None)
    }

    /// The tokenizer, head metadata and batch limits around loaded engines.
    fn assemble(
        ckpt: Checkpoint,
        engines: Vec<Box<dyn Encoder>>,
        opts: LoadOptions,
        mut packer: Packer,
        device_note: Option<String>,
    ) -> Result<Scorer> {
        let (dir, cfg, sentence) = (&ckpt.dir, &ckpt.config, ckpt.sentence.clone());
        let encoder = &engines[0];
        let max_tokens = opts
            .max_tokens
            .or(sentence.max_seq_length)
            .unwrap_or(encoder.max_positions());
        tokens::check_token_limit(dir, &engines, max_tokens)?;
        let text = TextEncoder::from_file(&ckpt.tokenizer(), max_tokens)?;
        let dense_head = dense_is_head(dir, cfg, &sentence, encoder.as_ref())?;
        let head = match (encoder.num_outputs(), &sentence.dense) {
            (0, Some(d)) if dense_head => Some(head_info(dir, cfg, d.out_features)?),
            (0, _) => None,
            (n, _) => Some(head_info(dir, cfg, n)?),
        };
        // A GPU binds at most so many bytes at once: batches are split to fit.
        if let Some(limit) = engines.iter().filter_map(|e| e.max_batch_tokens()).min() {
            packer.max_batch_tokens = packer.max_batch_tokens.min(limit);
        }
        let scorer = Scorer {
            dir: dir.to_path_buf(),
            engines,
            text,
            sentence,
            head,
            dense_head,
            packer,
            device_note,
        };
        scorer.calibrate()?;
        Ok(scorer)
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The backend the model runs on, e.g. `cpu (2 threads, avx2+fma)`.
    /// CUDA graph counters summed over the engines (`None` where no engine has graphs).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        let mut all = self.engines.iter().filter_map(|e| e.graph_stats());
        let first = all.next()?;
        Some(all.fold(first, |sum, s| sum + s))
    }

    pub fn device_name(&self) -> String {
        match &self.engines[..] {
            [one] => one.device_name(),
            all => format!(
                "{} engines: {}",
                all.len(),
                all.iter()
                    .map(|e| e.device_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The first engine: every engine holds the same model.
    fn encoder(&self) -> &dyn Encoder {
        self.engines[0].as_ref()
    }

    /// Why `--device auto` picked what it picked, if it did.
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    /// Output names of the classification head (`None` for an embedding model).
    pub fn head(&self) -> Option<&HeadInfo> {
        self.head.as_ref()
    }

    /// Pooling and normalisation used by [`embed`](Self::embed).
    pub fn pooling(&self) -> (Pooling, bool) {
        (self.sentence.pooling, self.sentence.normalize)
    }

    /// Values per embedding: the Dense module's outputs when there is one, else the hidden size.
    pub fn embedding_dim(&self) -> usize {
        match &self.sentence.dense {
            Some(d) => d.out_features,
            None => self.encoder().hidden_size(),
        }
    }

    /// The encoder's hidden size: the width of its final states and of each pooled vector.
    pub fn hidden_size(&self) -> usize {
        self.encoder().hidden_size()
    }

    pub fn packer(&self) -> Packer {
        self.packer
    }

    /// Scores of each text: raw outputs for regression heads, softmax probabilities for
    /// single-label and sigmoid for multi-label classification heads.
    pub fn score<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Scores> {
        self.score_ids(&self.tokenize(texts)?)
    }

    /// Like [`score`](Self::score) on already tokenized documents.
    pub fn score_ids(&self, ids: &[Vec<u32>]) -> Result<Scores> {
        strict(self.score_ids_lenient(ids)?)
    }

    /// [`score_ids`](Self::score_ids), except that a document the model cannot score (a
    /// non-finite output) gets a row of NaN and a [`DocFailure`] instead of failing the call.
    pub fn score_ids_lenient(&self, ids: &[Vec<u32>]) -> Result<(Scores, Vec<DocFailure>)> {
        let head = self.head.as_ref().with_context(|| {
            format!(
                "{} has no classification head: it can embed but not score",
                self.dir.display()
            )
        })?;
        let n = head.labels.len();
        let (mut values, failures) = if self.dense_head {
            self.pooled_then_dense(ids)?
        } else {
            self.run_lenient(ids, n, |e, b| e.logits(b))?
        };
        for row in values.chunks_exact_mut(n) {
            activate_outputs(head.problem_type, row);
        }
        let scores = Scores {
            labels: head.labels.clone(),
            values,
        };
        Ok((scores, failures))
    }

    /// Raw head outputs (logits) without the softmax/sigmoid of [`score`](Self::score).
    pub fn logits_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let n = self.encoder().num_outputs();
        if self.dense_head {
            return strict(self.pooled_then_dense(ids)?);
        }
        if n == 0 {
            bail!("{} has no classification head", self.dir.display());
        }
        self.run(ids, n, |e, b| e.logits(b))
    }

    /// Token count of the whole text (no truncation, no special tokens): the unit of
    /// `mira select`'s token budget.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        self.text.count_tokens(text)
    }

    /// Forward FLOPs of the encoder on one document of `n` tokens (see `Encoder::flops`).
    pub fn flops(&self, n: usize) -> f64 {
        self.encoder().flops(n)
    }

    /// Run one packed batch through the encoder and head (used by benchmarks).
    pub fn forward_batch(&self, batch: &Batch) -> Result<Vec<f32>> {
        self.forward_on(self.encoder(), batch)
    }

    fn forward_on(&self, engine: &dyn Encoder, batch: &Batch) -> Result<Vec<f32>> {
        if self.head.is_some() && !self.dense_head {
            return engine.logits(batch);
        }
        let pooled = engine.pooled(batch, self.sentence.pooling)?;
        Ok(match &self.sentence.dense {
            Some(d) => pooled
                .chunks_exact(d.in_features)
                .flat_map(|row| d.apply(row))
                .collect(),
            None => pooled,
        })
    }

    /// Run every batch through the encoder and head on all engines (as [`forward_batch`]
    /// each), returning each batch's outputs and its latency in milliseconds, in batch order.
    pub fn forward_batches(&self, batches: &[Batch]) -> Result<Vec<(Vec<f32>, f64)>> {
        self.fan_out(batches, |e, b| {
            let t = std::time::Instant::now();
            let out = self.forward_on(e, b)?;
            Ok((out, t.elapsed().as_secs_f64() * 1e3))
        })
    }

    /// Run `forward` on every batch over all engines, each engine with as many workers as it
    /// can keep busy (`Encoder::concurrency`: 1 on CPU and wgpu, 2 per CUDA device), results in
    /// batch order (`engine::pool`).
    fn fan_out<T: Send>(
        &self,
        batches: &[Batch],
        forward: impl Fn(&dyn Encoder, &Batch) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let workers: Vec<&dyn Encoder> = self
            .engines
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.as_ref(), e.concurrency().max(1)))
            .collect();
        engine::pool::run_in_order(&workers, batches, |e, b| forward(*e, b))
    }

    /// Pack, run every batch and put each document's `width` outputs back in input order. The
    /// first document whose outputs are not all finite fails the call (see [`Self::run_lenient`]).
    fn run(
        &self,
        ids: &[Vec<u32>],
        width: usize,
        forward: impl Fn(&dyn Encoder, &Batch) -> Result<Vec<f32>> + Sync,
    ) -> Result<Vec<f32>> {
        strict(self.run_lenient(ids, width, forward)?)
    }

    /// [`Self::run`], except that a document whose outputs are not all finite gets a row of NaN
    /// and a [`DocFailure`] (in document order) instead of failing the call: the other documents
    /// of its batch are scored as usual.
    fn run_lenient(
        &self,
        ids: &[Vec<u32>],
        width: usize,
        forward: impl Fn(&dyn Encoder, &Batch) -> Result<Vec<f32>> + Sync,
    ) -> Result<(Vec<f32>, Vec<DocFailure>)> {
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            bail!("document {i} has no tokens");
        }
        let mut out = vec![0f32; ids.len() * width];
        let mut failures = Vec::new();
        let batches = self.packer.pack(ids);
        let outputs = self.fan_out(&batches, forward)?;
        for (batch, rows) in batches.iter().zip(outputs) {
            for (s, &doc) in batch.docs.iter().enumerate() {
                let row = &rows[s * width..(s + 1) * width];
                let dest = &mut out[doc * width..(doc + 1) * width];
                if let Some(v) = row.iter().find(|v| !v.is_finite()) {
                    failures.push(DocFailure {
                        doc,
                        message: format!(
                            "{} tokens: the model's output is {v} on {}; with f16 storage this \
                             usually means an activation overflowed f16's range (65,504): rerun \
                             with --precision bf16 or f32",
                            ids[doc].len(),
                            self.device_name()
                        ),
                    });
                    dest.fill(f32::NAN);
                } else {
                    dest.copy_from_slice(row);
                }
            }
        }
        failures.sort_by_key(|f| f.doc);
        Ok((out, failures))
    }
}

/// A document a lenient call could not score (its row holds NaN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocFailure {
    /// Its index in the call's input.
    pub doc: usize,
    /// Why, e.g. a non-finite model output and what to do about it.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::weights::Weights;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert-cls-regression")
    }

    /// The FLOP count behind `mira bench`'s TFLOP/s: two per weight of every encoder matrix
    /// (counted from the checkpoint's tensors) per token, plus Q·Kᵀ and P·V.
    #[test]
    fn bert_flops_count_every_encoder_matrix_once_per_token() {
        let s = Scorer::load(fixture(), Device::Cpu).unwrap();
        let w = Weights::open(&fixture()).unwrap();
        let matrix_weights: usize = w
            .names()
            .into_iter()
            .filter(|n| n.contains("encoder.layer.") && n.ends_with(".weight"))
            .map(|n| w.get(n).unwrap().shape)
            .filter(|shape| shape.len() == 2)
            .map(|shape| shape[0] * shape[1])
            .sum();
        let cfg = ModelConfig::from_file(&fixture().join("config.json")).unwrap();
        let crate::model::config::Arch::Bert(c) = &cfg.arch else {
            panic!("a BERT fixture")
        };
        for n in [1usize, 7, 100] {
            let want = 2.0 * n as f64 * matrix_weights as f64
                + (c.num_hidden_layers * 4 * n * n * c.hidden_size) as f64;
            assert_eq!(s.flops(n), want, "n = {n}");
        }
    }

    /// Two engines (as `cuda:all` makes one per GPU), small batches: the fan-out returns exactly
    /// what one engine computes, in input order, and a failing batch fails the whole call.
    #[test]
    fn several_engines_split_the_batches_and_keep_input_order() {
        let opts = LoadOptions {
            packer: Some(Packer {
                max_batch_tokens: 40,
                max_batch_seqs: 3,
                sort_window: 64,
            }),
            ..Default::default()
        };
        let one = Scorer::load_with(fixture(), Device::Cpu, opts.clone()).unwrap();
        let mut two = Scorer::load_with(fixture(), Device::Cpu, opts).unwrap();
        let cfg = ModelConfig::from_file(&fixture().join("config.json")).unwrap();
        let weights = Weights::open(&fixture()).unwrap();
        let loader = model::EncoderLoader {
            cfg: &cfg,
            weights: &weights,
        };
        two.engines.push(
            engine::device::build_on(Device::Cpu, BackendOptions::default(), &loader).unwrap(),
        );
        assert!(two.device_name().starts_with("2 engines: cpu"));
        let ids: Vec<Vec<u32>> = (0..57)
            .map(|d| {
                (0..(1 + (d * 7) % 23))
                    .map(|t| 5 + ((t * 13 + d) % 900) as u32)
                    .collect()
            })
            .collect();
        assert!(one.packer().pack(&ids).len() > 10, "many batches");
        let want = one.logits_ids(&ids).unwrap();
        let got = two.logits_ids(&ids).unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "engines disagree by {worst}");
        // Per document, not just as a multiset: document 3 alone gives row 3.
        let alone = one.logits_ids(&ids[3..4]).unwrap();
        let n = alone.len();
        assert!(alone
            .iter()
            .zip(&got[3 * n..4 * n])
            .all(|(a, b)| (a - b).abs() <= 1e-6));

        let mut bad = ids.clone();
        bad[40] = vec![5, 999_999];
        let err = two.logits_ids(&bad).unwrap_err().to_string();
        assert!(err.contains("999999"), "{err}");
    }
}

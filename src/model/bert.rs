//! BERT (`BertModel`, `BertForSequenceClassification`) and its RoBERTa family (`RobertaModel`,
//! `XLMRobertaModel` and their `ForSequenceClassification`) as a sequence of backend ops.
//!
//! The struct tree mirrors the checkpoint's key tree (`encoder.layer.{i}.attention.self.query`),
//! with or without the `bert.`/`roberta.` prefix. Q, K and V are fused into one `[3H, H]`
//! projection at load. RoBERTa differs in two places only: its positions start after the padding
//! index (the position table is loaded from that row on, so the backends' embedding op is the
//! same), and its classification head reads the first token's hidden state through dense ->
//! tanh -> out_proj instead of BERT's pooler -> classifier.

use anyhow::{Context, Result};

use super::weights::Weights;
use super::Loader;
use crate::engine::backend::EmbeddingTables;
use crate::engine::LinearKind::{AttentionInput, AttentionOutput, FeedForwardDown, FeedForwardUp};
use crate::engine::{Activation, Backend, Batch, Pooling};
use crate::model::config::{BertConfig, BertFamily, HeadLayout};

struct Layer<B: Backend> {
    /// `attention.self.{query,key,value}` stacked: `[3H, H]`, bias `[1, 3H]`
    qkv_w: B::Tensor,
    qkv_b: B::Tensor,
    /// `attention.output.dense`: `[H, H]`, `[1, H]`
    attn_out_w: B::Tensor,
    attn_out_b: B::Tensor,
    /// `attention.output.LayerNorm`: `[1, H]` each
    attn_norm_w: B::Tensor,
    attn_norm_b: B::Tensor,
    /// `intermediate.dense`: `[I, H]`, `[1, I]`
    up_w: B::Tensor,
    up_b: B::Tensor,
    /// `output.dense`: `[H, I]`, `[1, H]`
    down_w: B::Tensor,
    down_b: B::Tensor,
    /// `output.LayerNorm`: `[1, H]` each
    out_norm_w: B::Tensor,
    out_norm_b: B::Tensor,
}

/// `pooler.dense` (dense + tanh on `[CLS]`): `[H, H]`, `[1, H]`. `BertModel` checkpoints carry
/// it too; its output is what the classifier reads, and what `mira distill` fits a head on.
struct Pooler<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
}

/// The classification head: `[L, H]`, `[1, L]` after what it reads.
struct Classifier<B: Backend> {
    reads: HeadInput<B>,
    w: B::Tensor,
    b: B::Tensor,
    labels: usize,
}

/// What a classifier's last linear layer reads.
enum HeadInput<B: Backend> {
    /// BERT's pooler output.
    Pooler,
    /// RoBERTa's `classifier.dense` (`[H, H]`, `[1, H]`, then tanh) on the first token.
    FirstTokenDense(B::Tensor, B::Tensor),
    /// The first token's final hidden state (a `PyTorchModelHubMixin` classifier's `fc`).
    FirstToken,
}

pub struct Bert<B: Backend> {
    be: B,
    cfg: BertConfig,
    act: Activation,
    embeddings: EmbeddingTables<B::Tensor>,
    layers: Vec<Layer<B>>,
    pooler: Option<Pooler<B>>,
    head: Option<Classifier<B>>,
    /// Names this model's forward passes (see `Backend::run_forward`).
    id: u64,
}

impl<B: Backend> Bert<B> {
    /// Build the model from checkpoint weights. `with_head`: load pooler + classifier too.
    // Long: every BERT tensor loaded in turn, named as in the checkpoint.
    pub fn load(
        be: B,
        cfg: &BertConfig,
        weights: &Weights,
        with_head: bool,
        layout: HeadLayout,
    ) -> Result<Bert<B>> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let p = weights.prefix().to_string();
        let ld = Loader {
            be: &be,
            w: weights,
        };
        let eps = cfg.layer_norm_eps as f32;
        let e = format!("{p}embeddings");
        let positions = format!("{e}.position_embeddings.weight");
        let table = weights.f32(&positions, &[cfg.max_position_embeddings, h])?;
        let embeddings = EmbeddingTables {
            word: ld.matrix(&format!("{e}.word_embeddings.weight"), cfg.vocab_size, h)?,
            // Position i is row `position_offset + i` (RoBERTa: after the padding index).
            position: Some(
                be.weight(
                    table[cfg.position_offset() * h..].to_vec(),
                    cfg.max_positions(),
                    h,
                )
                .with_context(|| format!("cannot place tensor {positions} on {}", be.name()))?,
            ),
            token_type: Some(ld.row(
                &format!("{e}.token_type_embeddings.weight"),
                cfg.type_vocab_size,
                h,
                0,
            )?),
            norm_weight: ld.vector(&format!("{e}.LayerNorm.weight"), h)?,
            norm_bias: Some(ld.vector(&format!("{e}.LayerNorm.bias"), h)?),
            eps,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = format!("{p}encoder.layer.{l}");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(weights.f32(&format!("{n}.attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(weights.f32(&format!("{n}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv_w: be.linear_weight(qkv_w, 3 * h, h, AttentionInput)?,
                qkv_b: be.weight(qkv_b, 1, 3 * h)?,
                attn_out_w: ld.linear(
                    &format!("{n}.attention.output.dense.weight"),
                    h,
                    h,
                    AttentionOutput,
                )?,
                attn_out_b: ld.vector(&format!("{n}.attention.output.dense.bias"), h)?,
                attn_norm_w: ld.vector(&format!("{n}.attention.output.LayerNorm.weight"), h)?,
                attn_norm_b: ld.vector(&format!("{n}.attention.output.LayerNorm.bias"), h)?,
                up_w: ld.linear(
                    &format!("{n}.intermediate.dense.weight"),
                    i,
                    h,
                    FeedForwardUp,
                )?,
                up_b: ld.vector(&format!("{n}.intermediate.dense.bias"), i)?,
                down_w: ld.linear(&format!("{n}.output.dense.weight"), h, i, FeedForwardDown)?,
                down_b: ld.vector(&format!("{n}.output.dense.bias"), h)?,
                out_norm_w: ld.vector(&format!("{n}.output.LayerNorm.weight"), h)?,
                out_norm_b: ld.vector(&format!("{n}.output.LayerNorm.bias"), h)?,
            });
        }
        let reads = match (with_head, layout, cfg.family) {
            (false, ..) | (true, HeadLayout::Native, BertFamily::Bert) => HeadInput::Pooler,
            (true, HeadLayout::MixinFc, _) => HeadInput::FirstToken,
            (true, HeadLayout::Native, BertFamily::Roberta) => HeadInput::FirstTokenDense(
                ld.matrix("classifier.dense.weight", h, h)?,
                ld.vector("classifier.dense.bias", h)?,
            ),
        };
        let pooler_name = format!("{p}pooler.dense.weight");
        let needs_pooler = with_head && matches!(reads, HeadInput::Pooler);
        let pooler = if needs_pooler || weights.contains(&pooler_name) {
            Some(Pooler {
                w: ld.matrix(&pooler_name, h, h)?,
                b: ld.vector(&format!("{p}pooler.dense.bias"), h)?,
            })
        } else {
            None
        };
        let head = if with_head {
            let (w, b) = match &reads {
                HeadInput::FirstToken => ("fc.weight", "fc.bias"),
                HeadInput::FirstTokenDense(..) => {
                    ("classifier.out_proj.weight", "classifier.out_proj.bias")
                }
                HeadInput::Pooler => ("classifier.weight", "classifier.bias"),
            };
            let labels = out_features(weights, w)?;
            Some(Classifier {
                w: ld.matrix(w, labels, h)?,
                b: ld.vector(b, labels)?,
                reads,
                labels,
            })
        } else {
            None
        };
        let act = Activation::from_hf(&cfg.hidden_act)?;
        Ok(Bert {
            be,
            cfg: cfg.clone(),
            act,
            embeddings,
            layers,
            pooler,
            head,
            id: super::model_id(),
        })
    }

    /// Number of classifier outputs (0 without a head).
    pub fn num_labels(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.labels)
    }

    fn encode(&self, batch: &B::Batch) -> Result<B::Tensor> {
        let be = &self.be;
        let eps = self.cfg.layer_norm_eps as f32;
        let mut x = be.embed(batch, &self.embeddings)?; // [T, H]
        for l in &self.layers {
            let qkv = be.linear(&x, &l.qkv_w, Some(&l.qkv_b), Activation::None)?; // [T, 3H]
            let ctx = be.attention(&qkv, batch, self.cfg.num_attention_heads, None)?; // [T, H]
            let attn = be.linear(&ctx, &l.attn_out_w, Some(&l.attn_out_b), Activation::None)?;
            x = be.add_layernorm(attn, &x, &l.attn_norm_w, Some(&l.attn_norm_b), eps)?;
            let up = be.linear(&x, &l.up_w, Some(&l.up_b), self.act)?; // [T, I]
            let down = be.linear(&up, &l.down_w, Some(&l.down_b), Activation::None)?; // [T, H]
            x = be.add_layernorm(down, &x, &l.out_norm_w, Some(&l.out_norm_b), eps)?;
        }
        Ok(x)
    }

    /// One forward pass over `batch` computing `what` (see `Backend::run_forward`).
    fn run(
        &self,
        batch: &Batch,
        what: &str,
        forward: &dyn Fn(&B::Batch) -> Result<B::Tensor>,
    ) -> Result<Vec<f32>> {
        let limits = (self.cfg.vocab_size, self.cfg.max_positions());
        let kind = format!("bert{}/{what}", self.id);
        self.be.run_forward(batch, limits, &kind, forward)
    }
}

impl<B: Backend> super::Encoder for Bert<B> {
    fn device_name(&self) -> String {
        self.be.name()
    }

    fn concurrency(&self) -> usize {
        self.be.concurrency()
    }

    fn graph_stats(&self) -> Option<crate::engine::GraphStats> {
        self.be.graph_stats()
    }

    fn set_calibrating(&self, on: bool) -> bool {
        self.be.set_calibrating(on)
    }

    fn flops(&self, n: usize) -> f64 {
        let c = &self.cfg;
        let (n, h, i) = (n as f64, c.hidden_size as f64, c.intermediate_size as f64);
        // Q, K, V, output (4h²) and the two MLP matrices (2hI); Q·Kᵀ and P·V (2 · n · h each).
        let per_layer = 2.0 * n * (4.0 * h * h + 2.0 * h * i) + 4.0 * n * n * h;
        c.num_hidden_layers as f64 * per_layer
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn num_outputs(&self) -> usize {
        self.num_labels()
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_positions()
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_batch_tokens(&self) -> Option<usize> {
        // Widest activations: the fused QKV projection and the intermediate layer.
        let c = &self.cfg;
        self.be
            .max_batch_tokens((3 * c.hidden_size).max(c.intermediate_size))
    }

    fn pooled(&self, batch: &Batch, pooling: Pooling) -> Result<Vec<f32>> {
        self.run(batch, &format!("pooled-{pooling:?}"), &|b| {
            let x = self.encode(b)?;
            self.be.pool(&x, b, pooling) // [n_seqs, H]
        })
    }

    fn features(&self, batch: &Batch) -> Result<Vec<f32>> {
        self.run(batch, "features", &|b| self.head_input(b)) // [n_seqs, H]
    }

    fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let head = self
            .head
            .as_ref()
            .context("this checkpoint has no classification head")?;
        self.run(batch, "logits", &|b| {
            let read = self.head_input(b)?; // [n_seqs, H]
            self.be
                .linear(&read, &head.w, Some(&head.b), Activation::None) // [n_seqs, L]
        })
    }
}

/// Rows of a head's output matrix: its number of labels.
fn out_features(weights: &Weights, name: &str) -> Result<usize> {
    Ok(weights
        .get(name)
        .with_context(|| format!("a sequence classifier needs its head ({name})"))?
        .shape
        .first()
        .copied()
        .unwrap_or(0))
}

impl<B: Backend> Bert<B> {
    /// What the classifier's last linear layer reads, `[n_seqs, H]`: RoBERTa's
    /// tanh(classifier.dense(h_<s>)) when it has that head, else the pooler output.
    fn head_input(&self, b: &B::Batch) -> Result<B::Tensor> {
        match self.head.as_ref().map(|h| &h.reads) {
            None | Some(HeadInput::Pooler) => self.pooler_output(b),
            Some(HeadInput::FirstTokenDense(w, bias)) => {
                let x = self.encode(b)?;
                let first = self.be.pool(&x, b, Pooling::Cls)?; // [n_seqs, H]
                self.be.linear(&first, w, Some(bias), Activation::Tanh)
            }
            Some(HeadInput::FirstToken) => {
                let x = self.encode(b)?;
                self.be.pool(&x, b, Pooling::Cls) // [n_seqs, H]
            }
        }
    }

    /// tanh(pooler.dense([CLS])): `[n_seqs, H]`.
    fn pooler_output(&self, b: &B::Batch) -> Result<B::Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .context("this checkpoint has no pooler (pooler.dense)")?;
        let x = self.encode(b)?;
        let cls = self.be.pool(&x, b, Pooling::Cls)?; // [n_seqs, H]
        self.be
            .linear(&cls, &pooler.w, Some(&pooler.b), Activation::Tanh)
    }
}

//! ModernBERT (`ModernBertModel`, `ModernBertForSequenceClassification`) as a sequence of backend
//! ops.
//!
//! Pre-norm layers without biases (where the config says so): fused `Wqkv`, rotary embeddings with
//! a global and a local theta, attention that alternates between global and a sliding window
//! (`|i - j| <= local_attention / 2`, so local layers cost O(window) per token), and a GeGLU MLP.
//! Layer 0's attention norm is the identity (the checkpoint has no tensor for it). The struct tree
//! mirrors the checkpoint keys (`model.layers.{i}.attn.Wqkv`), with or without the `model.` prefix.

use anyhow::{Context, Result};

use super::weights::Weights;
use super::Loader;
use crate::engine::backend::{EmbeddingTables, Rotary};
use crate::engine::LinearKind::{AttentionInput, AttentionOutput, FeedForwardDown, FeedForwardUp};
use crate::engine::{Activation, Backend, Batch, Pooling};
use crate::model::config::ModernBertConfig;

/// A LayerNorm's weight and optional bias, `[1, H]` each.
struct Norm<B: Backend> {
    weight: B::Tensor,
    bias: Option<B::Tensor>,
}

struct Layer<B: Backend> {
    /// `attn_norm`; `None` (identity) in layer 0.
    attn_norm: Option<Norm<B>>,
    /// `attn.Wqkv`: `[3H, H]`, bias `[1, 3H]` if `attention_bias`
    wqkv: B::Tensor,
    wqkv_b: Option<B::Tensor>,
    /// `attn.Wo`: `[H, H]`
    wo: B::Tensor,
    wo_b: Option<B::Tensor>,
    /// `mlp_norm`
    mlp_norm: Norm<B>,
    /// `mlp.Wi`: `[2I, H]` (input half, then gate half)
    wi: B::Tensor,
    wi_b: Option<B::Tensor>,
    /// `mlp.Wo`: `[H, I]`
    wo_mlp: B::Tensor,
    wo_mlp_b: Option<B::Tensor>,
    global: bool,
}

/// `ModernBertForSequenceClassification`'s head: pool, dense + activation + norm, classifier.
struct Head<B: Backend> {
    /// `head.dense`: `[H, H]`, bias if `classifier_bias`
    dense: B::Tensor,
    dense_b: Option<B::Tensor>,
    /// `head.norm`
    norm: Norm<B>,
    /// `classifier`: `[L, H]`, `[1, L]`
    classifier: B::Tensor,
    classifier_b: B::Tensor,
    labels: usize,
}

pub struct ModernBert<B: Backend> {
    be: B,
    cfg: ModernBertConfig,
    act: Activation,
    head_act: Activation,
    embeddings: EmbeddingTables<B::Tensor>,
    layers: Vec<Layer<B>>,
    final_norm: Norm<B>,
    head: Option<Head<B>>,
    /// Names this model's forward passes (see `Backend::run_forward`).
    id: u64,
}

/// Load a LayerNorm (`{name}.weight`, and `{name}.bias` when `bias`).
fn load_norm<B: Backend>(ld: &Loader<B>, name: &str, n: usize, bias: bool) -> Result<Norm<B>> {
    Ok(Norm {
        weight: ld.vector(&format!("{name}.weight"), n)?,
        bias: ld.bias(bias, &format!("{name}.bias"), n)?,
    })
}

impl<B: Backend> ModernBert<B> {
    pub fn load(
        be: B,
        cfg: &ModernBertConfig,
        weights: &Weights,
        with_head: bool,
    ) -> Result<ModernBert<B>> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let p = weights.prefix().to_string();
        let ld = Loader {
            be: &be,
            w: weights,
        };
        let embed_norm = load_norm(&ld, &format!("{p}embeddings.norm"), h, cfg.norm_bias)?;
        let embeddings = EmbeddingTables {
            word: ld.matrix(
                &format!("{p}embeddings.tok_embeddings.weight"),
                cfg.vocab_size,
                h,
            )?,
            position: None,
            token_type: None,
            norm_weight: embed_norm.weight,
            norm_bias: embed_norm.bias,
            eps: cfg.norm_eps as f32,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = format!("{p}layers.{l}");
            layers.push(Layer {
                attn_norm: if l == 0 {
                    None
                } else {
                    Some(load_norm(&ld, &format!("{n}.attn_norm"), h, cfg.norm_bias)?)
                },
                wqkv: ld.linear(&format!("{n}.attn.Wqkv.weight"), 3 * h, h, AttentionInput)?,
                wqkv_b: ld.bias(cfg.attention_bias, &format!("{n}.attn.Wqkv.bias"), 3 * h)?,
                wo: ld.linear(&format!("{n}.attn.Wo.weight"), h, h, AttentionOutput)?,
                wo_b: ld.bias(cfg.attention_bias, &format!("{n}.attn.Wo.bias"), h)?,
                mlp_norm: load_norm(&ld, &format!("{n}.mlp_norm"), h, cfg.norm_bias)?,
                wi: ld.linear(&format!("{n}.mlp.Wi.weight"), 2 * i, h, FeedForwardUp)?,
                wi_b: ld.bias(cfg.mlp_bias, &format!("{n}.mlp.Wi.bias"), 2 * i)?,
                wo_mlp: ld.linear(&format!("{n}.mlp.Wo.weight"), h, i, FeedForwardDown)?,
                wo_mlp_b: ld.bias(cfg.mlp_bias, &format!("{n}.mlp.Wo.bias"), h)?,
                global: cfg.global_layers[l],
            });
        }
        let final_norm = load_norm(&ld, &format!("{p}final_norm"), h, cfg.norm_bias)?;
        let head = if with_head {
            let labels = weights
                .get("classifier.weight")
                .context("ModernBertForSequenceClassification needs a classifier")?
                .shape
                .first()
                .copied()
                .unwrap_or(0);
            Some(Head {
                dense: ld.matrix("head.dense.weight", h, h)?,
                dense_b: ld.bias(cfg.classifier_bias, "head.dense.bias", h)?,
                norm: load_norm(&ld, "head.norm", h, cfg.norm_bias)?,
                classifier: ld.matrix("classifier.weight", labels, h)?,
                classifier_b: ld.vector("classifier.bias", labels)?,
                labels,
            })
        } else {
            None
        };
        Ok(ModernBert {
            act: Activation::from_hf(&cfg.hidden_activation)?,
            head_act: Activation::from_hf(&cfg.classifier_activation)?,
            be,
            cfg: cfg.clone(),
            embeddings,
            layers,
            final_norm,
            head,
            id: super::model_id(),
        })
    }

    /// Final hidden states (after `final_norm`), `[T, H]`.
    fn encode(&self, batch: &B::Batch) -> Result<B::Tensor> {
        let be = &self.be;
        let eps = self.cfg.norm_eps as f32;
        let heads = self.cfg.num_attention_heads;
        let mut x = be.embed(batch, &self.embeddings)?; // residual stream [T, H]
        let mut normed: Option<B::Tensor> = None; // attn_norm(x) of the current layer
        for (l, layer) in self.layers.iter().enumerate() {
            let attn_in = match (&layer.attn_norm, &normed) {
                (None, _) => &x, // layer 0: identity
                (Some(_), Some(n)) => n,
                (Some(_), None) => unreachable!("attn_norm is computed by the previous layer"),
            };
            let qkv = be.linear(
                attn_in,
                &layer.wqkv,
                layer.wqkv_b.as_ref(),
                Activation::None,
            )?;
            let (theta, window) = if layer.global {
                (self.cfg.global_rope_theta, None)
            } else {
                (self.cfg.local_rope_theta, Some(self.cfg.local_attention))
            };
            let qkv = be.rope(qkv, batch, heads, Rotary::plain(theta as f32))?;
            let ctx = be.attention(&qkv, batch, heads, window)?; // [T, H]
            let attn = be.linear(&ctx, &layer.wo, layer.wo_b.as_ref(), Activation::None)?;
            let mlp_in = be.add_norm(
                &mut x,
                &attn,
                &layer.mlp_norm.weight,
                layer.mlp_norm.bias.as_ref(),
                eps,
            )?;
            let up = be.linear(&mlp_in, &layer.wi, layer.wi_b.as_ref(), Activation::None)?; // [T, 2I]
            let gated = be.geglu(&up, self.act)?; // [T, I]
            let down = be.linear(
                &gated,
                &layer.wo_mlp,
                layer.wo_mlp_b.as_ref(),
                Activation::None,
            )?;
            // Fuse the residual add with the next norm: the next layer's attn_norm, or final_norm.
            let next = self
                .layers
                .get(l + 1)
                .and_then(|n| n.attn_norm.as_ref())
                .unwrap_or(&self.final_norm);
            normed = Some(be.add_norm(&mut x, &down, &next.weight, next.bias.as_ref(), eps)?);
        }
        match normed {
            Some(n) => Ok(n),
            None => be.layernorm(
                &x,
                &self.final_norm.weight,
                self.final_norm.bias.as_ref(),
                eps,
            ),
        }
    }

    /// One forward pass over `batch` computing `what` (see `Backend::run_forward`).
    fn run(
        &self,
        batch: &Batch,
        what: &str,
        forward: &dyn Fn(&B::Batch) -> Result<B::Tensor>,
    ) -> Result<Vec<f32>> {
        let limits = (self.cfg.vocab_size, self.cfg.max_position_embeddings);
        let kind = format!("modernbert{}/{what}", self.id);
        self.be.run_forward(batch, limits, &kind, forward)
    }
}

impl<B: Backend> super::Encoder for ModernBert<B> {
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
        let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
        // Wqkv and Wo (4h²), Wi (h × 2I) and the MLP output (I × h): 4h² + 3hI per token.
        let dense = 2.0 * n as f64 * (4.0 * h * h + 3.0 * h * i);
        c.global_layers
            .iter()
            .map(|&global| {
                // A local layer's token sees at most window + 1 keys (fewer near the ends:
                // counted as if all did).
                let keys = if global {
                    n
                } else {
                    n.min(c.local_attention + 1)
                };
                dense + 4.0 * n as f64 * keys as f64 * h
            })
            .sum()
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn num_outputs(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.labels)
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_batch_tokens(&self) -> Option<usize> {
        // Widest activations: the fused Wqkv projection and the GeGLU input (2I).
        let c = &self.cfg;
        self.be
            .max_batch_tokens((3 * c.hidden_size).max(2 * c.intermediate_size))
    }

    fn pooled(&self, batch: &Batch, pooling: Pooling) -> Result<Vec<f32>> {
        self.run(batch, &format!("pooled-{pooling:?}"), &|b| {
            let x = self.encode(b)?;
            self.be.pool(&x, b, pooling)
        })
    }

    fn features(&self, _batch: &Batch) -> Result<Vec<f32>> {
        anyhow::bail!(
            "head features (for distillation) need a BERT encoder with a pooler; \
             ModernBERT heads are not fitted by mira yet"
        )
    }

    fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let head = self
            .head
            .as_ref()
            .context("this checkpoint has no classification head")?;
        self.run(batch, "logits", &|b| {
            let x = self.encode(b)?;
            let pooled = self.be.pool(&x, b, self.cfg.classifier_pooling)?; // [n_seqs, H]
            let dense =
                self.be
                    .linear(&pooled, &head.dense, head.dense_b.as_ref(), self.head_act)?;
            let normed = self.be.layernorm(
                &dense,
                &head.norm.weight,
                head.norm.bias.as_ref(),
                self.cfg.norm_eps as f32,
            )?;
            self.be.linear(
                &normed,
                &head.classifier,
                Some(&head.classifier_b),
                Activation::None,
            ) // [n_seqs, L]
        })
    }
}

//! DeBERTa-v2/v3 (`DebertaV2Model`, `DebertaV2ForSequenceClassification`, `model_type:
//! "deberta-v2"`) as a sequence of backend ops, and its config.
//!
//! Like BERT (post-norm layers, GELU MLP) except for the attention: disentangled, each score
//! joined by content-to-position and position-to-content terms over relative positions
//! (log-bucketed beyond `position_buckets / 2`), from one shared table of relative embeddings
//! (`encoder.rel_embeddings`, LayerNorm'd when `norm_rel_ebd` says so) projected by each layer's
//! query and key projections (`share_att_key`, as in v3) or by its own `pos_key_proj` /
//! `pos_query_proj`. The projected tables are computed once per layer at load, by the backend's
//! `linear`: they do not depend on the input. The classifier reads `ContextPooler`: dense + activation on the first
//! token. Q, K and V are fused into one `[3H, H]` projection at load, as for BERT.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::config::HeadLayout;
use super::weights::Weights;
use super::Loader;
use crate::engine::backend::{Disentangled, EmbeddingTables};
use crate::engine::LinearKind::{AttentionInput, AttentionOutput, FeedForwardDown, FeedForwardUp};
use crate::engine::{Activation, Backend, Batch, Pooling};

/// Hyper-parameters of DeBERTa-v2/v3, as `config.json` gives them.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "minus_one")]
    pub position_buckets: i64,
    /// `["p2c", "c2p"]`, or the older `"p2c|c2p"` string.
    #[serde(default)]
    pub pos_att_type: Option<serde_json::Value>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default = "none")]
    pub norm_rel_ebd: String,
    #[serde(default = "yes")]
    pub position_biased_input: bool,
    #[serde(default = "gelu")]
    pub pooler_hidden_act: String,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub conv_kernel_size: usize,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
}

fn gelu() -> String {
    "gelu".into()
}
fn none() -> String {
    "none".into()
}
fn default_positions() -> usize {
    512
}
fn default_eps() -> f64 {
    1e-7
}
fn minus_one() -> i64 {
    -1
}
fn yes() -> bool {
    true
}

impl DebertaConfig {
    /// Parse and check: sizes bounded, and every variant this forward pass does not compute
    /// (DeBERTa-v2-xlarge's convolution, a separate embedding size) named as unsupported.
    pub fn from_value(value: serde_json::Value) -> Result<DebertaConfig> {
        let c: DebertaConfig = serde_json::from_value(value)?;
        super::config::EncoderSizes {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            positions: c.max_position_embeddings,
        }
        .check(&[])?;
        // DeBERTa-v3 has no token types: 0 is allowed.
        crate::checked::count(
            "type_vocab_size",
            c.type_vocab_size,
            0,
            super::config::MAX_TYPE_VOCAB,
        )?;
        for (name, v) in [
            ("max_relative_positions", c.max_relative_positions),
            ("position_buckets", c.position_buckets),
        ] {
            if v > super::config::MAX_POSITIONS as i64 {
                bail!(
                    "{name} {v} is too large (at most {})",
                    super::config::MAX_POSITIONS
                );
            }
        }
        let unsupported = |what: &str| bail!("DeBERTa-v2 with {what} is not supported");
        if c.conv_kernel_size > 0 {
            return unsupported(
                "a convolution layer (conv_kernel_size > 0, as in deberta-v2-xlarge)",
            );
        }
        if c.embedding_size.is_some_and(|e| e != c.hidden_size) {
            return unsupported("embedding_size different from hidden_size");
        }
        if c.attention_head_size
            .is_some_and(|a| a != c.hidden_size / c.num_attention_heads)
        {
            return unsupported("attention_head_size other than hidden_size / num_attention_heads");
        }
        if c.pooler_hidden_size.is_some_and(|p| p != c.hidden_size) {
            return unsupported("pooler_hidden_size different from hidden_size");
        }
        if c.relative_attention && c.span() == 0 {
            bail!("relative attention needs max_relative_positions or max_position_embeddings of at least 1");
        }
        c.pos_att()?;
        Activation::from_hf(&c.hidden_act)?;
        Activation::from_hf(&c.pooler_hidden_act)?;
        Ok(c)
    }

    /// Which relative terms the attention has: (content-to-position, position-to-content).
    pub fn pos_att(&self) -> Result<(bool, bool)> {
        let kinds: Vec<String> = match &self.pos_att_type {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => s
                .to_lowercase()
                .split('|')
                .map(|x| x.trim().to_string())
                .collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_lowercase)
                        .context("pos_att_type entries must be strings")
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("pos_att_type {other} is neither a list nor a string"),
        };
        for k in &kinds {
            if !matches!(k.as_str(), "c2p" | "p2c" | "") {
                bail!("pos_att_type '{k}' is not supported (c2p and p2c are)");
            }
        }
        Ok((
            kinds.iter().any(|k| k == "c2p"),
            kinds.iter().any(|k| k == "p2c"),
        ))
    }

    /// `max_relative_positions`, or `max_position_embeddings` when it is below 1.
    pub fn max_relative(&self) -> usize {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings
        } else {
            self.max_relative_positions as usize
        }
    }

    /// Relative embeddings per side: `position_buckets` when positive, else `max_relative()`.
    pub fn span(&self) -> usize {
        if self.position_buckets > 0 {
            self.position_buckets as usize
        } else {
            self.max_relative()
        }
    }

    fn buckets(&self) -> usize {
        self.position_buckets.max(0) as usize
    }
}

struct Layer<B: Backend> {
    /// `attention.self.{query,key,value}_proj` stacked: `[3H, H]`, bias `[1, 3H]`.
    qkv_w: B::Tensor,
    qkv_b: B::Tensor,
    /// This layer's relative tables, `[2·span, H]`: through the key projection (c2p) and the
    /// query projection (p2c), each present when its term is.
    pos_key: Option<B::Tensor>,
    pos_query: Option<B::Tensor>,
    attn_out_w: B::Tensor,
    attn_out_b: B::Tensor,
    attn_norm_w: B::Tensor,
    attn_norm_b: B::Tensor,
    up_w: B::Tensor,
    up_b: B::Tensor,
    down_w: B::Tensor,
    down_b: B::Tensor,
    out_norm_w: B::Tensor,
    out_norm_b: B::Tensor,
}

/// The classification head.
struct Head<B: Backend> {
    /// `ContextPooler.dense` with its activation; `None` for a mixin's `fc` on the first token.
    pooler: Option<(B::Tensor, B::Tensor, Activation)>,
    w: B::Tensor,
    b: B::Tensor,
    labels: usize,
}

pub struct Deberta<B: Backend> {
    be: B,
    cfg: DebertaConfig,
    act: Activation,
    embeddings: EmbeddingTables<B::Tensor>,
    layers: Vec<Layer<B>>,
    head: Option<Head<B>>,
    /// The relative terms `pos_att_type` names: (c2p, p2c).
    terms: (bool, bool),
    id: u64,
}

/// LayerNorm of each row on the host (the relative embeddings when `norm_rel_ebd` has it).
fn host_layernorm(x: &mut [f32], w: &[f32], b: &[f32], eps: f64) {
    for row in x.chunks_mut(w.len()) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), c) in row.iter_mut().zip(w).zip(b) {
            *v = ((*v as f64 - mean) * inv) as f32 * g + c;
        }
    }
}

impl<B: Backend> Deberta<B> {
    // Long: every DeBERTa tensor loaded in turn, named as in the checkpoint.
    pub fn load(
        be: B,
        cfg: &DebertaConfig,
        weights: &Weights,
        with_head: bool,
        layout: HeadLayout,
    ) -> Result<Deberta<B>> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let p = weights.prefix().to_string();
        let ld = Loader {
            be: &be,
            w: weights,
        };
        let e = format!("{p}embeddings");
        let embeddings = EmbeddingTables {
            word: ld.matrix(&format!("{e}.word_embeddings.weight"), cfg.vocab_size, h)?,
            position: if cfg.position_biased_input {
                Some(ld.matrix(
                    &format!("{e}.position_embeddings.weight"),
                    cfg.max_position_embeddings,
                    h,
                )?)
            } else {
                None
            },
            token_type: if cfg.type_vocab_size > 0 {
                Some(ld.row(
                    &format!("{e}.token_type_embeddings.weight"),
                    cfg.type_vocab_size,
                    h,
                    0,
                )?)
            } else {
                None
            },
            norm_weight: ld.vector(&format!("{e}.LayerNorm.weight"), h)?,
            norm_bias: Some(ld.vector(&format!("{e}.LayerNorm.bias"), h)?),
            eps: cfg.layer_norm_eps as f32,
        };
        // The relative embeddings, normalised once: every layer projects the same table.
        let (c2p, p2c) = cfg.pos_att()?;
        let span = cfg.span();
        let rel = if cfg.relative_attention && (c2p || p2c) {
            let name = format!("{p}encoder.rel_embeddings.weight");
            let mut table = weights.f32(&name, &[2 * span, h])?;
            if cfg
                .norm_rel_ebd
                .to_lowercase()
                .split('|')
                .any(|x| x.trim() == "layer_norm")
            {
                let w = weights.f32(&format!("{p}encoder.LayerNorm.weight"), &[h])?;
                let b = weights.f32(&format!("{p}encoder.LayerNorm.bias"), &[h])?;
                host_layernorm(&mut table, &w, &b, cfg.layer_norm_eps);
            }
            Some(be.weight(table, 2 * span, h)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = format!("{p}encoder.layer.{l}");
            let a = format!("{n}.attention.self");
            let part = |x: &str| -> Result<(Vec<f32>, Vec<f32>)> {
                Ok((
                    weights.f32(&format!("{a}.{x}.weight"), &[h, h])?,
                    weights.f32(&format!("{a}.{x}.bias"), &[h])?,
                ))
            };
            let (q, k, v) = (part("query_proj")?, part("key_proj")?, part("value_proj")?);
            // The relative tables through this layer's projections, by the backend's GEMM.
            let table = |shared: &(Vec<f32>, Vec<f32>), own: &str| -> Result<Option<B::Tensor>> {
                let Some(t) = &rel else { return Ok(None) };
                let proj = if cfg.share_att_key {
                    shared.clone()
                } else {
                    part(own)?
                };
                let (w, b) = (be.weight(proj.0, h, h)?, be.weight(proj.1, 1, h)?);
                Ok(Some(be.linear(t, &w, Some(&b), Activation::None)?))
            };
            let pos_key = if c2p {
                table(&k, "pos_key_proj")?
            } else {
                None
            };
            let pos_query = if p2c {
                table(&q, "pos_query_proj")?
            } else {
                None
            };
            let qkv_w: Vec<f32> = [&q.0, &k.0, &v.0].into_iter().flatten().copied().collect();
            let qkv_b: Vec<f32> = [&q.1, &k.1, &v.1].into_iter().flatten().copied().collect();
            layers.push(Layer {
                qkv_w: be.linear_weight(qkv_w, 3 * h, h, AttentionInput)?,
                qkv_b: be.weight(qkv_b, 1, 3 * h)?,
                pos_key,
                pos_query,
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
        let head = if with_head {
            let (w, b, pooler) = match layout {
                HeadLayout::MixinFc => ("fc.weight", "fc.bias", None),
                HeadLayout::Native => (
                    "classifier.weight",
                    "classifier.bias",
                    Some((
                        ld.matrix("pooler.dense.weight", h, h)?,
                        ld.vector("pooler.dense.bias", h)?,
                        Activation::from_hf(&cfg.pooler_hidden_act)?,
                    )),
                ),
            };
            let labels = weights
                .get(w)
                .with_context(|| format!("a sequence classifier needs its head ({w})"))?
                .shape
                .first()
                .copied()
                .unwrap_or(0);
            Some(Head {
                pooler,
                w: ld.matrix(w, labels, h)?,
                b: ld.vector(b, labels)?,
                labels,
            })
        } else {
            None
        };
        Ok(Deberta {
            act: Activation::from_hf(&cfg.hidden_act)?,
            be,
            cfg: cfg.clone(),
            embeddings,
            layers,
            head,
            terms: (c2p, p2c),
            id: super::model_id(),
        })
    }

    fn encode(&self, batch: &B::Batch) -> Result<B::Tensor> {
        let be = &self.be;
        let c = &self.cfg;
        let eps = c.layer_norm_eps as f32;
        let mut x = be.embed(batch, &self.embeddings)?; // [T, H]
        for l in &self.layers {
            let qkv = be.linear(&x, &l.qkv_w, Some(&l.qkv_b), Activation::None)?; // [T, 3H]
            let rel = Disentangled {
                pos_key: l.pos_key.as_ref(),
                pos_query: l.pos_query.as_ref(),
                span: c.span(),
                buckets: c.buckets(),
                max_relative: c.max_relative(),
                scale_factor: 1 + self.terms.0 as usize + self.terms.1 as usize,
            };
            let ctx = be.attention_disentangled(&qkv, batch, c.num_attention_heads, &rel)?;
            let attn = be.linear(&ctx, &l.attn_out_w, Some(&l.attn_out_b), Activation::None)?;
            x = be.add_layernorm(attn, &x, &l.attn_norm_w, Some(&l.attn_norm_b), eps)?;
            let up = be.linear(&x, &l.up_w, Some(&l.up_b), self.act)?; // [T, I]
            let down = be.linear(&up, &l.down_w, Some(&l.down_b), Activation::None)?;
            x = be.add_layernorm(down, &x, &l.out_norm_w, Some(&l.out_norm_b), eps)?;
        }
        Ok(x)
    }

    /// What the classifier's last linear layer reads: the context pooler's output, or (mixin)
    /// the first token's hidden state. `[n_seqs, H]`.
    fn head_input(&self, b: &B::Batch) -> Result<B::Tensor> {
        let x = self.encode(b)?;
        let first = self.be.pool(&x, b, Pooling::Cls)?;
        match self.head.as_ref().and_then(|h| h.pooler.as_ref()) {
            Some((w, bias, act)) => self.be.linear(&first, w, Some(bias), *act),
            None => Ok(first),
        }
    }

    fn run(
        &self,
        batch: &Batch,
        what: &str,
        forward: &dyn Fn(&B::Batch) -> Result<B::Tensor>,
    ) -> Result<Vec<f32>> {
        let limits = (self.cfg.vocab_size, self.cfg.max_position_embeddings);
        let kind = format!("deberta{}/{what}", self.id);
        self.be.run_forward(batch, limits, &kind, forward)
    }
}

impl<B: Backend> super::Encoder for Deberta<B> {
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
        let terms = c
            .pos_att()
            .map_or(0.0, |(a, b)| a as u8 as f64 + b as u8 as f64);
        let rel = if c.relative_attention {
            2.0 * c.span() as f64
        } else {
            0.0
        };
        // Dense layers, Q·Kᵀ and P·V, and each relative term's products with the table.
        let per_layer =
            2.0 * n * (4.0 * h * h + 2.0 * h * i) + 4.0 * n * n * h + terms * 2.0 * n * rel * h;
        c.num_hidden_layers as f64 * per_layer
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
        let c = &self.cfg;
        self.be
            .max_batch_tokens((3 * c.hidden_size).max(c.intermediate_size))
    }

    fn pooled(&self, batch: &Batch, pooling: Pooling) -> Result<Vec<f32>> {
        self.run(batch, &format!("pooled-{pooling:?}"), &|b| {
            let x = self.encode(b)?;
            self.be.pool(&x, b, pooling)
        })
    }

    fn features(&self, batch: &Batch) -> Result<Vec<f32>> {
        if self.head.is_none() {
            bail!("this DeBERTa checkpoint has no classification head to read features for");
        }
        self.run(batch, "features", &|b| self.head_input(b))
    }

    fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let head = self
            .head
            .as_ref()
            .context("this checkpoint has no classification head")?;
        self.run(batch, "logits", &|b| {
            let read = self.head_input(b)?;
            self.be
                .linear(&read, &head.w, Some(&head.b), Activation::None)
        })
    }
}

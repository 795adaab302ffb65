//! GTE (`model_type: "new"`: `NewModel`, `NewForSequenceClassification`, Alibaba-NLP's
//! gte-base-en-v1.5 and the WebOrganizer topic and format classifiers built on it) as a sequence
//! of backend ops, following the published modeling code (`Alibaba-NLP/new-impl`).
//!
//! Post-norm layers like BERT's, with three differences: no position table, but rotary
//! embeddings on Q and K (NTK-scaled when `rope_scaling` says `ntk`, fixed or mixed); one packed
//! `qkv_proj`; and a gated MLP, `down(act(gate) · up)` with `up_gate_proj` = `[up; gate]` and no
//! bias. The backends' gated op computes `act(first half) · second half`, so the two halves of
//! `up_gate_proj` are swapped at load. The classifier reads the BERT-style pooler
//! (tanh(dense(h_[CLS]))). Tensor names are the checkpoint's (`encoder.layer.{i}.attention.qkv_proj`),
//! with or without the `new.` prefix.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::weights::Weights;
use super::Loader;
use crate::engine::backend::{EmbeddingTables, Ntk, Rotary};
use crate::engine::LinearKind::{AttentionInput, AttentionOutput, FeedForwardDown, FeedForwardUp};
use crate::engine::{Activation, Backend, Batch, Pooling};

/// `config.json` of a GTE checkpoint (defaults as in the published `NewConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct GteConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "rope")]
    pub position_embedding_type: String,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "layer_norm")]
    pub layer_norm_type: String,
    #[serde(default = "yes")]
    pub pack_qkv: bool,
    #[serde(default)]
    pub logn_attention_scale: bool,
}

/// `rope_scaling`: `{"type": "ntk", "factor": 2.0}` (and `mixed_b` for mixed NTK).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: String,
    pub factor: f64,
    #[serde(default)]
    pub mixed_b: Option<f64>,
}

fn gelu() -> String {
    "gelu".into()
}
fn positions() -> usize {
    512
}
fn eps() -> f64 {
    1e-12
}
fn rope() -> String {
    "rope".into()
}
fn theta() -> f64 {
    10_000.0
}
fn layer_norm() -> String {
    "layer_norm".into()
}
fn yes() -> bool {
    true
}

impl GteConfig {
    /// Parse and check: sizes bounded, and every variant mira does not compute refused by name.
    pub fn from_value(value: serde_json::Value) -> Result<GteConfig> {
        let c: GteConfig = serde_json::from_value(value)?;
        super::config::EncoderSizes {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            positions: c.max_position_embeddings,
        }
        .check(&[])?;
        crate::checked::count(
            "type_vocab_size",
            c.type_vocab_size,
            0,
            super::config::MAX_TYPE_VOCAB,
        )?;
        crate::checked::finite("rope_theta", c.rope_theta)?;
        if c.rope_theta <= 1.0 {
            bail!("rope_theta {} must be above 1", c.rope_theta);
        }
        if !(c.hidden_size / c.num_attention_heads).is_multiple_of(2) {
            bail!("GTE's rotary embedding needs an even head size");
        }
        let unsupported = |what: &str| bail!("GTE (model_type 'new') with {what} is not supported");
        if c.position_embedding_type != "rope" {
            return unsupported(&format!(
                "position_embedding_type '{}' (only 'rope')",
                c.position_embedding_type
            ));
        }
        if c.layer_norm_type != "layer_norm" {
            return unsupported(&format!(
                "layer_norm_type '{}' (only 'layer_norm')",
                c.layer_norm_type
            ));
        }
        if !c.pack_qkv {
            return unsupported("pack_qkv false (separate q/k/v projections)");
        }
        if c.logn_attention_scale {
            return unsupported("logn_attention_scale");
        }
        if let Some(s) = &c.rope_scaling {
            if s.kind != "ntk" {
                return unsupported(&format!("rope_scaling type '{}' (only 'ntk')", s.kind));
            }
            crate::checked::finite("rope_scaling factor", s.factor)?;
            if s.factor <= 0.0 {
                bail!("rope_scaling factor {} must be positive", s.factor);
            }
            if let Some(b) = s.mixed_b {
                crate::checked::finite("rope_scaling mixed_b", b)?;
            }
        }
        Activation::from_hf(&c.hidden_act)?;
        Ok(c)
    }

    /// The rotary frequencies the config describes.
    pub fn rotary(&self) -> Rotary {
        Rotary {
            theta: self.rope_theta as f32,
            ntk: self.rope_scaling.as_ref().map(|s| Ntk {
                factor: s.factor as f32,
                mixed_b: s.mixed_b.map(|b| b as f32),
            }),
        }
    }
}

struct Layer<B: Backend> {
    /// `attention.qkv_proj`: `[3H, H]`, `[1, 3H]`
    qkv_w: B::Tensor,
    qkv_b: B::Tensor,
    /// `attention.o_proj`: `[H, H]`, `[1, H]`
    o_w: B::Tensor,
    o_b: B::Tensor,
    /// `attn_ln`
    attn_ln_w: B::Tensor,
    attn_ln_b: B::Tensor,
    /// `mlp.up_gate_proj` with its halves swapped: `[gate; up]`, `[2I, H]`, no bias
    gate_up_w: B::Tensor,
    /// `mlp.down_proj`: `[H, I]`, `[1, H]`
    down_w: B::Tensor,
    down_b: B::Tensor,
    /// `mlp_ln`
    mlp_ln_w: B::Tensor,
    mlp_ln_b: B::Tensor,
}

/// A dense layer's weight and bias (`pooler.dense`: `[H, H]`; `classifier`: `[L, H]`).
struct Dense<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
    outputs: usize,
}

pub struct Gte<B: Backend> {
    be: B,
    cfg: GteConfig,
    act: Activation,
    rotary: Rotary,
    embeddings: EmbeddingTables<B::Tensor>,
    layers: Vec<Layer<B>>,
    pooler: Option<Dense<B>>,
    classifier: Option<Dense<B>>,
    /// Names this model's forward passes (see `Backend::run_forward`).
    id: u64,
}

impl<B: Backend> Gte<B> {
    pub fn load(be: B, cfg: &GteConfig, weights: &Weights, with_head: bool) -> Result<Gte<B>> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let p = weights.prefix().to_string();
        let ld = Loader {
            be: &be,
            w: weights,
        };
        let e = format!("{p}embeddings");
        let embeddings = EmbeddingTables {
            word: ld.matrix(&format!("{e}.word_embeddings.weight"), cfg.vocab_size, h)?,
            position: None,
            // Token type 0 for every token, as the published model uses without token_type_ids.
            token_type: (cfg.type_vocab_size > 0)
                .then(|| {
                    let name = format!("{e}.token_type_embeddings.weight");
                    ld.row(&name, cfg.type_vocab_size, h, 0)
                })
                .transpose()?,
            norm_weight: ld.vector(&format!("{e}.LayerNorm.weight"), h)?,
            norm_bias: Some(ld.vector(&format!("{e}.LayerNorm.bias"), h)?),
            eps: cfg.layer_norm_eps as f32,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = format!("{p}encoder.layer.{l}");
            let a = format!("{n}.attention");
            let up_gate_name = format!("{n}.mlp.up_gate_proj.weight");
            let up_gate = weights.f32(&up_gate_name, &[2 * i, h])?;
            let gate_up: Vec<f32> = [&up_gate[i * h..], &up_gate[..i * h]].concat();
            layers.push(Layer {
                qkv_w: ld.linear(&format!("{a}.qkv_proj.weight"), 3 * h, h, AttentionInput)?,
                qkv_b: ld.vector(&format!("{a}.qkv_proj.bias"), 3 * h)?,
                o_w: ld.linear(&format!("{a}.o_proj.weight"), h, h, AttentionOutput)?,
                o_b: ld.vector(&format!("{a}.o_proj.bias"), h)?,
                attn_ln_w: ld.vector(&format!("{n}.attn_ln.weight"), h)?,
                attn_ln_b: ld.vector(&format!("{n}.attn_ln.bias"), h)?,
                gate_up_w: be
                    .linear_weight(gate_up, 2 * i, h, FeedForwardUp)
                    .with_context(|| format!("cannot place tensor {up_gate_name}"))?,
                down_w: ld.linear(&format!("{n}.mlp.down_proj.weight"), h, i, FeedForwardDown)?,
                down_b: ld.vector(&format!("{n}.mlp.down_proj.bias"), h)?,
                mlp_ln_w: ld.vector(&format!("{n}.mlp_ln.weight"), h)?,
                mlp_ln_b: ld.vector(&format!("{n}.mlp_ln.bias"), h)?,
            });
        }
        let dense = |name: &str, outputs: usize| -> Result<Dense<B>> {
            Ok(Dense {
                w: ld.matrix(&format!("{name}.weight"), outputs, h)?,
                b: ld.vector(&format!("{name}.bias"), outputs)?,
                outputs,
            })
        };
        let pooler_name = format!("{p}pooler.dense");
        let pooler = (with_head || weights.contains(&format!("{pooler_name}.weight")))
            .then(|| dense(&pooler_name, h))
            .transpose()?;
        let classifier = if with_head {
            let labels = weights
                .get("classifier.weight")
                .context("NewForSequenceClassification needs its head (classifier)")?
                .shape
                .first()
                .copied()
                .unwrap_or(0);
            Some(dense("classifier", labels)?)
        } else {
            None
        };
        Ok(Gte {
            act: Activation::from_hf(&cfg.hidden_act)?,
            rotary: cfg.rotary(),
            be,
            cfg: cfg.clone(),
            embeddings,
            layers,
            pooler,
            classifier,
            id: super::model_id(),
        })
    }

    /// Final hidden states, `[T, H]`.
    fn encode(&self, batch: &B::Batch) -> Result<B::Tensor> {
        let be = &self.be;
        let eps = self.cfg.layer_norm_eps as f32;
        let heads = self.cfg.num_attention_heads;
        let mut x = be.embed(batch, &self.embeddings)?; // [T, H]
        for l in &self.layers {
            let qkv = be.linear(&x, &l.qkv_w, Some(&l.qkv_b), Activation::None)?; // [T, 3H]
            let qkv = be.rope(qkv, batch, heads, self.rotary)?;
            let ctx = be.attention(&qkv, batch, heads, None)?; // [T, H]
            let attn = be.linear(&ctx, &l.o_w, Some(&l.o_b), Activation::None)?;
            x = be.add_layernorm(attn, &x, &l.attn_ln_w, Some(&l.attn_ln_b), eps)?;
            let gate_up = be.linear(&x, &l.gate_up_w, None, Activation::None)?; // [T, 2I]
            let gated = be.geglu(&gate_up, self.act)?; // act(gate) · up, [T, I]
            let down = be.linear(&gated, &l.down_w, Some(&l.down_b), Activation::None)?;
            x = be.add_layernorm(down, &x, &l.mlp_ln_w, Some(&l.mlp_ln_b), eps)?;
        }
        Ok(x)
    }

    /// tanh(pooler.dense(h_[CLS])): `[n_seqs, H]`.
    fn pooler_output(&self, b: &B::Batch) -> Result<B::Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .context("this checkpoint has no pooler (pooler.dense)")?;
        let x = self.encode(b)?;
        let cls = self.be.pool(&x, b, Pooling::Cls)?;
        self.be
            .linear(&cls, &pooler.w, Some(&pooler.b), Activation::Tanh)
    }

    /// One forward pass over `batch` computing `what` (see `Backend::run_forward`).
    fn run(
        &self,
        batch: &Batch,
        what: &str,
        forward: &dyn Fn(&B::Batch) -> Result<B::Tensor>,
    ) -> Result<Vec<f32>> {
        let limits = (self.cfg.vocab_size, self.cfg.max_position_embeddings);
        let kind = format!("gte{}/{what}", self.id);
        self.be.run_forward(batch, limits, &kind, forward)
    }
}

impl<B: Backend> super::Encoder for Gte<B> {
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
        // qkv and o (4h²), up_gate (2hI) and down (hI); Q·Kᵀ and P·V (2 · n · h each).
        let per_layer = 2.0 * n * (4.0 * h * h + 3.0 * h * i) + 4.0 * n * n * h;
        c.num_hidden_layers as f64 * per_layer
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn num_outputs(&self) -> usize {
        self.classifier.as_ref().map_or(0, |c| c.outputs)
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_batch_tokens(&self) -> Option<usize> {
        // Widest activations: the packed QKV projection and the gated MLP's input (2I).
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

    fn features(&self, batch: &Batch) -> Result<Vec<f32>> {
        self.run(batch, "features", &|b| self.pooler_output(b))
    }

    fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let head = self
            .classifier
            .as_ref()
            .context("this checkpoint has no classification head")?;
        self.run(batch, "logits", &|b| {
            let pooled = self.pooler_output(b)?;
            self.be
                .linear(&pooled, &head.w, Some(&head.b), Activation::None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::GteConfig;

    fn parse(extra: &str) -> anyhow::Result<GteConfig> {
        let json = format!(
            r#"{{"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,
                "intermediate_size":12{extra}}}"#
        );
        GteConfig::from_value(serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn published_defaults_and_ntk_scaling_are_read() {
        let c =
            parse(r#","rope_theta":500000,"rope_scaling":{"type":"ntk","factor":2.0}"#).unwrap();
        assert_eq!((c.max_position_embeddings, c.type_vocab_size), (512, 0));
        let r = c.rotary();
        assert_eq!(r.theta, 500_000.0);
        assert_eq!(r.ntk.unwrap().factor, 2.0);
        assert!(r.ntk.unwrap().mixed_b.is_none());
    }

    #[test]
    fn variants_mira_does_not_compute_are_refused_by_name() {
        for (extra, says) in [
            (r#","layer_norm_type":"rms_norm""#, "rms_norm"),
            (r#","logn_attention_scale":true"#, "logn_attention_scale"),
            (r#","pack_qkv":false"#, "pack_qkv"),
            (r#","position_embedding_type":"absolute""#, "absolute"),
            (
                r#","rope_scaling":{"type":"linear","factor":2.0}"#,
                "linear",
            ),
            (r#","rope_scaling":{"type":"ntk","factor":-1.0}"#, "factor"),
            (r#","rope_theta":0.5"#, "rope_theta"),
            (r#","hidden_act":"swiglu""#, "swiglu"),
        ] {
            let e = format!("{:#}", parse(extra).unwrap_err());
            assert!(e.contains(says), "{extra}: {e}");
        }
    }
}

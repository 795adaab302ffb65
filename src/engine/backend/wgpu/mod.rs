//! The wgpu backend: the encoder ops as WGSL compute shaders (`shaders/`, one file per op) on
//! any Vulkan, Metal, DX12 or GL adapter.
//!
//! Weights are uploaded once (f16 where the adapter has `SHADER_F16` and the precision allows,
//! f32 otherwise); activations come from a buffer pool; every op of a forward pass is recorded
//! into one command encoder and submitted when the result is downloaded (`context.rs`).

mod adapter;
mod attention;
mod context;
pub mod shaders;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};

pub use crate::engine::Precision;
pub use adapter::{adapters, describe, unusable_reason};
use attention::RelativeTerms;
pub use context::Counters;
use context::{Context, Pool};
use shaders::Op;

use super::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, HostF32, Pooling};

/// Queries per attention workgroup (`BQ` in attention.wgsl).
const QUERY_BLOCK: usize = 64;
/// Columns a row-reduction workgroup holds in registers (ROW_THREADS × ROW_SLOTS).
const MAX_ROW: usize = 4096;

/// A row-major matrix on the device. Activations return their buffer to the pool on drop.
pub struct WgpuTensor {
    buffer: Option<wgpu::Buffer>,
    rows: usize,
    cols: usize,
    pool: Option<Arc<Pool>>,
}

impl WgpuTensor {
    fn buf(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("tensor buffer is present until drop")
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl Drop for WgpuTensor {
    fn drop(&mut self) {
        if let (Some(buffer), Some(pool)) = (self.buffer.take(), &self.pool) {
            pool.give(buffer);
        }
    }
}

/// A batch's index data on the device.
/// Its buffers come from the pool (and go back on drop), so batches of similar sizes meet the
/// same buffers and the bind groups built over them.
pub struct WgpuBatch {
    ids: WgpuTensor,
    positions: WgpuTensor,
    cu_seqlens: WgpuTensor,
    /// (sequence, first query) per attention workgroup; blocks never cross sequences.
    blocks: WgpuTensor,
    n_tokens: usize,
    n_seqs: usize,
    n_blocks: usize,
    max_position: usize,
    /// The longest sequence (what DeBERTa's relative index table must cover).
    max_len: usize,
}

/// The wgpu backend on one adapter. Clones share the device, pipelines and pools.
#[derive(Clone)]
pub struct WgpuBackend {
    ctx: Arc<Context>,
    /// cos/sin tables per (theta, head size / 2): the buffer and the positions it covers.
    rope_tables: Arc<Mutex<HashMap<(super::RotaryKey, usize), HostTable>>>,
    /// DeBERTa's relative index tables per (span, buckets, max_relative): the buffer and the
    /// sequence length it covers.
    relative_tables: Arc<Mutex<HashMap<super::RelativeKey, HostTable>>>,
}

/// A table computed on the host, on the device, and the sequence length it covers.
type HostTable = (Arc<wgpu::Buffer>, usize);

/// A LayerNorm's parameters.
struct Norm<'a> {
    weight: &'a WgpuTensor,
    bias: Option<&'a WgpuTensor>,
    eps: f32,
}

/// Little-endian bytes of a `Params` struct given as 32-bit words.
fn params(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| anyhow::anyhow!("{what} ({n}) does not fit the shaders' 32-bit indices"))
}

impl WgpuBackend {
    /// Open adapter `ordinal` (see `mira devices`), or the best usable one.
    pub fn new(ordinal: Option<usize>, precision: Precision) -> Result<WgpuBackend> {
        Ok(WgpuBackend {
            ctx: Arc::new(Context::new(ordinal, precision)?),
            rope_tables: Arc::default(),
            relative_tables: Arc::default(),
        })
    }

    /// Whether weights and activations are stored as f16.
    pub fn is_f16(&self) -> bool {
        self.ctx.f16
    }

    pub fn counters(&self) -> Counters {
        self.ctx.counters()
    }

    /// For tests: outputs are fresh buffers filled with NaN (instead of pooled ones), so a value an
    /// op forgets to write cannot pass as a stale right answer.
    pub fn set_poison(&self, on: bool) {
        self.ctx
            .poison
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn encode(&self, data: &[f32]) -> Vec<u8> {
        if self.ctx.f16 {
            data.iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect()
        } else {
            data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    }

    /// A fresh activation `[rows, cols]` from the pool.
    fn output(&self, rows: usize, cols: usize, what: &str) -> Result<WgpuTensor> {
        let bytes = (rows * cols) as u64 * self.ctx.elem_bytes();
        let buffer = self.ctx.alloc(bytes, what)?;
        Ok(WgpuTensor {
            buffer: Some(buffer),
            rows,
            cols,
            pool: Some(self.ctx.pool.clone()),
        })
    }

    fn rope_table(
        &self,
        rotary: super::Rotary,
        half: usize,
        positions: usize,
    ) -> Result<Arc<wgpu::Buffer>> {
        let key = (rotary.key(), half);
        let mut tables = self.rope_tables.lock().unwrap();
        if let Some((buf, covered)) = tables.get(&key) {
            if *covered >= positions {
                return Ok(buf.clone());
            }
        }
        // Grown to a power of two so a longer batch rarely rebuilds it.
        let covered = positions.next_power_of_two();
        let table: Vec<u8> = super::rotary_table(rotary, half, covered)
            .iter()
            .flat_map(|cs| cs.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let buf = Arc::new(self.ctx.upload(&table, "rotary table")?);
        tables.insert(key, (buf.clone(), covered));
        Ok(buf)
    }

    /// layernorm.wgsl in `mode` (0 post-norm in place, 1 pre-norm step, 2 plain).
    fn layernorm_op(
        &self,
        mode: u32,
        x: &WgpuTensor,
        residual: Option<&WgpuTensor>,
        norm: Norm<'_>,
        out: Option<&WgpuTensor>,
    ) -> Result<()> {
        let Norm { weight, bias, eps } = norm;
        let (rows, cols) = (x.rows, x.cols);
        super::norm_shape(
            (rows, cols),
            weight.rows * weight.cols,
            bias.map(|b| b.rows * b.cols),
            residual.map(|r| (r.rows, r.cols)),
            MAX_ROW,
        )?;
        if rows == 0 {
            return Ok(());
        }
        let ctx = &self.ctx;
        let p = params(&[
            u32_of(rows, "rows")?,
            cols as u32,
            mode,
            bias.is_some() as u32,
            eps.to_bits(),
        ]);
        let (gx, gy) = ctx.grid(u32_of(rows, "rows")?);
        ctx.dispatch(
            Op::LayerNorm,
            0,
            &[
                x.buf(),
                residual.map_or(&ctx.dummy, |r| r.buf()),
                weight.buf(),
                bias.map_or(&ctx.dummy, |b| b.buf()),
                out.map_or(&ctx.dummy_rw, |o| o.buf()),
            ],
            &p,
            (gx, gy, 1),
        )
    }
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;
    type Batch = WgpuBatch;

    fn name(&self) -> String {
        format!(
            "wgpu ({}, {:?}, {} storage)",
            self.ctx.info.name,
            self.ctx.info.backend,
            if self.ctx.f16 { "f16" } else { "f32" }
        )
    }

    fn weight(&self, data: impl Into<HostF32>, rows: usize, cols: usize) -> Result<WgpuTensor> {
        let data = data.into();
        ensure!(
            data.len() == rows * cols,
            "weight has {} values, expected {rows}x{cols}",
            data.len()
        );
        let buffer = self
            .ctx
            .upload(&self.encode(&data), &format!("weight [{rows}, {cols}]"))?;
        Ok(WgpuTensor {
            buffer: Some(buffer),
            rows,
            cols,
            pool: None,
        })
    }

    fn upload_batch(&self, batch: &Batch, vocab: usize, max_positions: usize) -> Result<WgpuBatch> {
        // The shaders index with these values: a malformed batch must be an error, not a read
        // out of bounds.
        batch.validate(vocab, max_positions)?;
        u32_of(batch.ids.len() * 3 * MAX_ROW, "batch tokens × row width")?;
        let cu: Vec<u32> = batch.cu_seqlens.clone();
        let blocks = super::query_blocks(&cu, QUERY_BLOCK);
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let ctx = &self.ctx;
        // Queue writes land before the next submission's commands: submit what is recorded
        // first, so no recorded op can see the new contents of a reused buffer.
        ctx.flush();
        let indices = |v: &[u32], what: &str| -> Result<WgpuTensor> {
            Ok(WgpuTensor {
                buffer: Some(ctx.write_pooled(&bytes(v), what)?),
                rows: v.len(),
                cols: 1,
                pool: Some(ctx.pool.clone()),
            })
        };
        Ok(WgpuBatch {
            ids: indices(&batch.ids, "token ids")?,
            positions: indices(&batch.positions, "positions")?,
            cu_seqlens: indices(&cu, "cu_seqlens")?,
            blocks: indices(&blocks, "attention blocks")?,
            n_tokens: batch.ids.len(),
            n_seqs: cu.len().saturating_sub(1),
            n_blocks: blocks.len() / 2,
            max_position: batch.positions.iter().max().map_or(0, |&p| p as usize + 1),
            max_len: batch.longest_sequence(),
        })
    }

    fn embed(&self, batch: &WgpuBatch, t: &EmbeddingTables<WgpuTensor>) -> Result<WgpuTensor> {
        let h = t.word.cols;
        ensure!(
            h <= MAX_ROW,
            "embed: hidden size {h} exceeds the shader's {MAX_ROW}"
        );
        let out = self.output(batch.n_tokens, h, "embeddings")?;
        if batch.n_tokens == 0 {
            return Ok(out);
        }
        let ctx = &self.ctx;
        let p = params(&[
            batch.n_tokens as u32,
            h as u32,
            t.position.is_some() as u32,
            t.token_type.is_some() as u32,
            t.norm_bias.is_some() as u32,
            t.eps.to_bits(),
        ]);
        let (gx, gy) = ctx.grid(batch.n_tokens as u32);
        ctx.dispatch(
            Op::Embed,
            0,
            &[
                batch.ids.buf(),
                batch.positions.buf(),
                t.word.buf(),
                t.position.as_ref().map_or(&ctx.dummy, |x| x.buf()),
                t.token_type.as_ref().map_or(&ctx.dummy, |x| x.buf()),
                t.norm_weight.buf(),
                t.norm_bias.as_ref().map_or(&ctx.dummy, |x| x.buf()),
                out.buf(),
            ],
            &p,
            (gx, gy, 1),
        )?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        b: Option<&WgpuTensor>,
        act: Activation,
    ) -> Result<WgpuTensor> {
        let (m, k, n) = super::linear_shape(
            (x.rows, x.cols),
            (w.rows, w.cols),
            b.map(|b| b.rows * b.cols),
        )?;
        let out = self.output(m, n, "linear output")?;
        if m == 0 || n == 0 {
            return Ok(out);
        }
        let p = params(&[
            m as u32,
            n as u32,
            k as u32,
            u32::from(act.code()),
            b.is_some() as u32,
        ]);
        self.ctx.dispatch(
            Op::Matmul,
            0,
            &[
                x.buf(),
                w.buf(),
                b.map_or(&self.ctx.dummy, |b| b.buf()),
                out.buf(),
            ],
            &p,
            (
                n.div_ceil(64) as u32,
                u32_of(m.div_ceil(64), "row tiles")?,
                1,
            ),
        )?;
        Ok(out)
    }

    fn add_layernorm(
        &self,
        x: WgpuTensor,
        residual: &WgpuTensor,
        weight: &WgpuTensor,
        bias: Option<&WgpuTensor>,
        eps: f32,
    ) -> Result<WgpuTensor> {
        self.layernorm_op(0, &x, Some(residual), Norm { weight, bias, eps }, None)?;
        Ok(x)
    }

    fn add_norm(
        &self,
        x: &mut WgpuTensor,
        delta: &WgpuTensor,
        weight: &WgpuTensor,
        bias: Option<&WgpuTensor>,
        eps: f32,
    ) -> Result<WgpuTensor> {
        let out = self.output(x.rows, x.cols, "normalised residual")?;
        self.layernorm_op(1, x, Some(delta), Norm { weight, bias, eps }, Some(&out))?;
        Ok(out)
    }

    fn layernorm(
        &self,
        x: &WgpuTensor,
        weight: &WgpuTensor,
        bias: Option<&WgpuTensor>,
        eps: f32,
    ) -> Result<WgpuTensor> {
        let out = self.output(x.rows, x.cols, "layernorm output")?;
        self.layernorm_op(2, x, None, Norm { weight, bias, eps }, Some(&out))?;
        Ok(out)
    }

    fn rope(
        &self,
        qkv: WgpuTensor,
        batch: &WgpuBatch,
        heads: usize,
        rotary: super::Rotary,
    ) -> Result<WgpuTensor> {
        let (h, d) = super::qkv_shape("rope", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(d.is_multiple_of(2), "rope: head size {d} must be even");
        if qkv.rows == 0 {
            return Ok(qkv);
        }
        let half = d / 2;
        let table = self.rope_table(rotary, half, batch.max_position)?;
        let p = params(&[qkv.rows as u32, h as u32, half as u32]);
        let pairs = u32_of(qkv.rows * h, "rotary pairs")?;
        let (gx, gy) = self.ctx.grid(pairs.div_ceil(256));
        self.ctx.dispatch(
            Op::Rope,
            0,
            &[qkv.buf(), batch.positions.buf(), &table],
            &p,
            (gx, gy, 1),
        )?;
        Ok(qkv)
    }

    fn geglu(&self, x: &WgpuTensor, act: Activation) -> Result<WgpuTensor> {
        let inner = super::geglu_width(x.cols)?;
        let out = self.output(x.rows, inner, "geglu output")?;
        let n = u32_of(x.rows * inner, "geglu outputs")?;
        if n == 0 {
            return Ok(out);
        }
        let p = params(&[x.rows as u32, inner as u32, u32::from(act.code())]);
        let (gx, gy) = self.ctx.grid(n.div_ceil(256));
        self.ctx
            .dispatch(Op::Geglu, 0, &[x.buf(), out.buf()], &p, (gx, gy, 1))?;
        Ok(out)
    }

    fn attention(
        &self,
        qkv: &WgpuTensor,
        batch: &WgpuBatch,
        heads: usize,
        window: Option<usize>,
    ) -> Result<WgpuTensor> {
        let (h, d) = super::qkv_shape("attention", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(
            window != Some(0),
            "attention: a sliding window must be at least 1 token"
        );
        let scale = 1.0 / (d as f32).sqrt();
        self.attention_op(qkv, batch, (heads, h, d), window, scale, None)
    }

    fn attention_disentangled(
        &self,
        qkv: &WgpuTensor,
        batch: &WgpuBatch,
        heads: usize,
        rel: &super::Disentangled<'_, WgpuTensor>,
    ) -> Result<WgpuTensor> {
        let (h, d) =
            super::disentangled_shape((qkv.rows, qkv.cols), batch.n_tokens, heads, rel, |t| {
                (t.rows, t.cols)
            })?;
        let (index, covered) = self.relative_index_table(rel, batch.max_len)?;
        // An absent table is never read (its bit is clear): any bound buffer stands in.
        let relative = RelativeTerms {
            pos_key: rel.pos_key.map_or(qkv.buf(), WgpuTensor::buf),
            pos_query: rel.pos_query.map_or(qkv.buf(), WgpuTensor::buf),
            index: &index,
            center: u32_of(covered.saturating_sub(1), "relative index table")?,
            terms: rel.terms_mask(),
        };
        let scale = 1.0 / ((d * rel.scale_factor.max(1)) as f32).sqrt();
        self.attention_op(qkv, batch, (heads, h, d), None, scale, Some(relative))
    }

    fn pool(&self, x: &WgpuTensor, batch: &WgpuBatch, mode: Pooling) -> Result<WgpuTensor> {
        ensure!(
            x.rows == batch.n_tokens,
            "pool: {} rows for a batch of {} tokens",
            x.rows,
            batch.n_tokens
        );
        let out = self.output(batch.n_seqs, mode.width(x.cols), "pooled")?;
        let n = u32_of(batch.n_seqs * mode.width(x.cols), "pooled values")?;
        if n == 0 {
            return Ok(out);
        }
        let mode = match mode {
            Pooling::Cls => 0,
            Pooling::Mean => 1,
            Pooling::ClsAndMean => 2,
        };
        let p = params(&[batch.n_seqs as u32, x.cols as u32, mode]);
        let (gx, gy) = self.ctx.grid(n.div_ceil(256));
        self.ctx.dispatch(
            Op::Pool,
            0,
            &[x.buf(), batch.cu_seqlens.buf(), out.buf()],
            &p,
            (gx, gy, 1),
        )?;
        Ok(out)
    }

    fn download(&self, x: &WgpuTensor) -> Result<Vec<f32>> {
        let n = x.rows * x.cols;
        let bytes = self.ctx.read(x.buf(), n as u64 * self.ctx.elem_bytes())?;
        Ok(if self.ctx.f16 {
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        } else {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    fn sync(&self) -> Result<()> {
        self.ctx.wait()
    }

    /// So that a `[tokens, widest]` activation fits one binding.
    fn max_batch_tokens(&self, widest: usize) -> Option<usize> {
        Some((self.ctx.max_binding() / (widest.max(1) as u64 * self.ctx.elem_bytes())) as usize)
    }
}

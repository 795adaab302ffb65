//! The wgpu backend's attention dispatch (attention.wgsl, plain or with attention_rel.wgsl's
//! DeBERTa terms) and the relative index tables it uploads for DeBERTa.

use std::sync::Arc;

use anyhow::{ensure, Result};

use super::shaders::{self, Op};
use super::{params, u32_of, WgpuBackend, WgpuBatch, WgpuTensor};

/// DeBERTa's relative terms for attention.wgsl (attention_rel.wgsl's bindings and parameters).
pub(super) struct RelativeTerms<'a> {
    pub(super) pos_key: &'a wgpu::Buffer,
    pub(super) pos_query: &'a wgpu::Buffer,
    pub(super) index: &'a wgpu::Buffer,
    /// `rel_index[i - j + center]`.
    pub(super) center: u32,
    /// Bit 0: content-to-position; bit 1: position-to-content.
    pub(super) terms: u32,
}

impl WgpuBackend {
    /// `relative_index_table` for these terms covering sequences of `len` tokens (cached per
    /// terms, grown to a power of two): the buffer and the length it covers.
    pub(super) fn relative_index_table(
        &self,
        rel: &crate::engine::backend::Disentangled<'_, WgpuTensor>,
        len: usize,
    ) -> Result<(Arc<wgpu::Buffer>, usize)> {
        let key = rel.index_key();
        let mut tables = self.relative_tables.lock().unwrap();
        if let Some((buf, covered)) = tables.get(&key) {
            if *covered >= len {
                return Ok((buf.clone(), *covered));
            }
        }
        let covered = len.max(1).next_power_of_two();
        let (span, buckets, max_relative) = key;
        let table: Vec<u8> =
            crate::engine::backend::relative_index_table(covered, span, buckets, max_relative)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
        let buf = Arc::new(self.ctx.upload(&table, "relative index table")?);
        tables.insert(key, (buf.clone(), covered));
        Ok((buf, covered))
    }

    /// attention.wgsl over the batch's query blocks, plain or with DeBERTa's relative terms.
    pub(super) fn attention_op(
        &self,
        qkv: &WgpuTensor,
        batch: &WgpuBatch,
        (heads, h, d): (usize, usize, usize),
        window: Option<usize>,
        scale: f32,
        relative: Option<RelativeTerms<'_>>,
    ) -> Result<WgpuTensor> {
        ensure!(
            d as u32 <= shaders::MAX_HEAD_DIM,
            "attention: head size {d} exceeds the shader's {}",
            shaders::MAX_HEAD_DIM
        );
        let out = self.output(qkv.rows, h, "attention output")?;
        if batch.n_blocks == 0 {
            return Ok(out);
        }
        let (center, terms) = relative.as_ref().map_or((0, 0), |r| (r.center, r.terms));
        let p = params(&[
            h as u32,
            batch.n_blocks as u32,
            window.map_or(0, |w| (w / 2) as u32),
            window.is_some() as u32,
            scale.to_bits(),
            center,
            terms,
        ]);
        let (gx, gy) = self.ctx.grid(batch.n_blocks as u32);
        let mut buffers = vec![
            qkv.buf(),
            batch.blocks.buf(),
            batch.cu_seqlens.buf(),
            out.buf(),
        ];
        let op = match &relative {
            Some(r) => {
                buffers.extend([r.pos_key, r.pos_query, r.index]);
                Op::AttentionDisentangled
            }
            None => Op::Attention,
        };
        self.ctx.dispatch(
            op,
            d as u32,
            &buffers,
            &p,
            (gx, gy, u32_of(heads, "heads")?),
        )?;
        Ok(out)
    }
}

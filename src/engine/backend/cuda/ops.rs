//! The CUDA backend's ops, written once over [`KernelDevice`]: what they need from a device is
//! memory, kernel launches ([`Launch`]) and GEMMs. The GPU ([`super::gpu::Gpu`]: cudarc, our
//! kernels, cuBLASLt) is one such device; the tests' CPU emulation of `kernels/*.cu` is another,
//! so every line here (shape checks, argument order, grid sizes, kernel choice, batch layout)
//! also runs, and is checked against the CPU backend, on a machine without a GPU.

use anyhow::{anyhow, ensure, Result};

use super::backend::{int, KernelBackend, Tensor};
use super::gemm::Epilogue;
use super::graph::GraphStats;
use super::kernel_device::{DevBatch, DevTensor, Held, KernelDevice};
use super::kernels::ATTENTION_HEAD_DIMS;
use super::launch::{
    attention_blocks, stride_grid, Arg, Entry, Launch, MAX_ROW, QUERY_BLOCK, ROW_THREADS,
    STRIDE_THREADS,
};
use crate::engine::backend::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, HostF32, Pooling};

impl<D: KernelDevice> Backend for KernelBackend<D> {
    type Tensor = DevTensor<D::Mem>;
    type Batch = DevBatch<D::BatchMem>;

    fn name(&self) -> String {
        self.dev().describe()
    }

    fn weight(&self, data: impl Into<HostF32>, rows: usize, cols: usize) -> Result<Tensor<D>> {
        let data = data.into();
        ensure!(
            data.len() == rows * cols,
            "weight has {} values, expected {rows}x{cols}",
            data.len()
        );
        let mut bytes = self.storage().encode(&data);
        bytes.resize(bytes.len().max(16), 0);
        let (mem, ptr) = self
            .dev()
            .upload(&bytes, "weight")
            .map_err(|e| anyhow!("cannot upload a [{rows}, {cols}] weight: {e:#}"))?;
        Ok(DevTensor {
            mem: Held::Own(mem),
            ptr,
            rows,
            cols,
        })
    }

    fn upload_batch(
        &self,
        batch: &Batch,
        vocab: usize,
        max_positions: usize,
    ) -> Result<DevBatch<D::BatchMem>> {
        // The kernels index with these values: a malformed batch must be an error, not a read
        // out of bounds.
        batch.validate(vocab, max_positions)?;
        let t = batch.ids.len();
        int(t * 3 * MAX_ROW, "batch tokens × row width")?;
        let cu = &batch.cu_seqlens;
        let blocks = attention_blocks(cu);
        // [ids | positions | cu_seqlens | pad to even | blocks]: blocks are read as uint2.
        let blocks_at = (2 * t + cu.len()).next_multiple_of(2);
        let n = blocks_at + blocks.len();
        let (mem, base) = self.dev().upload_batch(n, &mut |dst: &mut [u32]| {
            dst[..t].copy_from_slice(&batch.ids);
            dst[t..2 * t].copy_from_slice(&batch.positions);
            dst[2 * t..2 * t + cu.len()].copy_from_slice(cu);
            dst[2 * t + cu.len()..blocks_at].fill(0);
            dst[blocks_at..n].copy_from_slice(&blocks);
        })?;
        let at = |i: usize| base + 4 * i as u64;
        Ok(DevBatch {
            mem: Some(mem),
            base,
            words: n,
            ids: at(0),
            positions: at(t),
            cu_seqlens: at(2 * t),
            blocks: at(blocks_at),
            n_tokens: t,
            n_seqs: cu.len().saturating_sub(1),
            n_blocks: blocks.len() / 2,
            max_position: batch.positions.iter().max().map_or(0, |&p| p as usize + 1),
            max_len: batch.longest_sequence(),
        })
    }

    fn embed(
        &self,
        batch: &DevBatch<D::BatchMem>,
        t: &EmbeddingTables<Tensor<D>>,
    ) -> Result<Tensor<D>> {
        let h = t.word.cols;
        ensure!(
            h <= MAX_ROW,
            "embed: hidden size {h} exceeds the kernel's {MAX_ROW}"
        );
        let widths = [
            Some(&t.norm_weight),
            t.norm_bias.as_ref(),
            t.token_type.as_ref(),
        ];
        for w in widths.into_iter().flatten() {
            ensure!(
                w.cols == h && w.rows == 1,
                "embed: a LayerNorm or token-type row is [{}, {}], expected [1, {h}]",
                w.rows,
                w.cols
            );
        }
        if let Some(p) = &t.position {
            ensure!(
                p.cols == h,
                "embed: position table has {} columns, expected {h}",
                p.cols
            );
        }
        let out = self.output(batch.n_tokens, h, "embeddings")?;
        if batch.n_tokens == 0 {
            return Ok(out);
        }
        let ptr = |x: Option<&Tensor<D>>| Arg::Ptr(x.map_or(0, |x| x.ptr));
        let (entry, grid) = self.row_kernel(
            Entry::EmbedLayerNormWarp,
            Entry::EmbedLayerNorm,
            batch.n_tokens,
            h,
        );
        let launch = Launch {
            entry,
            grid,
            block: ROW_THREADS,
            args: vec![
                Arg::Ptr(batch.ids),
                Arg::Ptr(batch.positions),
                Arg::Ptr(t.word.ptr),
                ptr(t.position.as_ref()),
                ptr(t.token_type.as_ref()),
                Arg::Ptr(t.norm_weight.ptr),
                ptr(t.norm_bias.as_ref()),
                Arg::Ptr(out.ptr),
                Arg::I32(int(batch.n_tokens, "tokens")?),
                Arg::I32(h as i32),
                Arg::F32(t.eps),
            ],
        };
        // (ids and positions were validated against the tables' sizes at upload.)
        self.launch(launch, "embed")?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &Tensor<D>,
        w: &Tensor<D>,
        b: Option<&Tensor<D>>,
        act: Activation,
    ) -> Result<Tensor<D>> {
        let (m, k, n) = super::super::linear_shape(
            (x.rows, x.cols),
            (w.rows, w.cols),
            b.map(|b| b.rows * b.cols),
        )?;
        let out = self.output(m, n, "linear output")?;
        if m == 0 || n == 0 {
            return Ok(out);
        }
        if k == 0 {
            // An empty product is the bias alone; cuBLASLt refuses k = 0.
            self.memset(&out, 0, m * n * self.elem_bytes())?;
            self.bias_act(&out, b.map(|b| b.ptr), act)?;
            return Ok(out);
        }
        let (epilogue, leftover) = Epilogue::plan(act, b.is_some());
        // x is [m, k], w is [n, k], bias has n values, out is [m, n] (checked above).
        self.gemm(
            (x.ptr, w.ptr, b.map(|b| b.ptr), out.ptr),
            (m, n, k),
            epilogue,
        )?;
        if let Some(act) = leftover {
            self.bias_act(&out, None, act)?;
        }
        Ok(out)
    }

    fn add_layernorm(
        &self,
        x: Tensor<D>,
        residual: &Tensor<D>,
        weight: &Tensor<D>,
        bias: Option<&Tensor<D>>,
        eps: f32,
    ) -> Result<Tensor<D>> {
        self.layernorm_op(0, &x, Some(residual), (weight, bias, eps), None)?;
        Ok(x)
    }

    fn add_norm(
        &self,
        x: &mut Tensor<D>,
        delta: &Tensor<D>,
        weight: &Tensor<D>,
        bias: Option<&Tensor<D>>,
        eps: f32,
    ) -> Result<Tensor<D>> {
        let out = self.output(x.rows, x.cols, "normalised residual")?;
        self.layernorm_op(1, x, Some(delta), (weight, bias, eps), Some(&out))?;
        Ok(out)
    }

    fn layernorm(
        &self,
        x: &Tensor<D>,
        weight: &Tensor<D>,
        bias: Option<&Tensor<D>>,
        eps: f32,
    ) -> Result<Tensor<D>> {
        let out = self.output(x.rows, x.cols, "layernorm output")?;
        self.layernorm_op(2, x, None, (weight, bias, eps), Some(&out))?;
        Ok(out)
    }

    fn rope(
        &self,
        qkv: Tensor<D>,
        batch: &DevBatch<D::BatchMem>,
        heads: usize,
        rotary: super::super::Rotary,
    ) -> Result<Tensor<D>> {
        let (h, d) = super::super::qkv_shape("rope", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(d.is_multiple_of(2), "rope: head size {d} must be even");
        if qkv.rows == 0 {
            return Ok(qkv);
        }
        let half = d / 2;
        // The table covers every position of the batch; it lives in the rope tables.
        let (table, table_ptr) = self.rope_table(rotary, half, batch.max_position)?;
        // A graph recorded now reads this table for as long as it lives.
        self.with_recording(|r| r.keep.push(table));
        let launch = Launch {
            entry: Entry::Rope,
            grid: stride_grid(qkv.rows * h, self.dev().multiprocessors()),
            block: STRIDE_THREADS,
            args: vec![
                Arg::Ptr(qkv.ptr),
                Arg::Ptr(batch.positions),
                Arg::Ptr(table_ptr),
                Arg::I32(int(qkv.rows, "tokens")?),
                Arg::I32(int(h, "hidden")?),
                Arg::I32(half as i32),
            ],
        };
        self.launch(launch, "rope")?;
        Ok(qkv)
    }

    fn geglu(&self, x: &Tensor<D>, act: Activation) -> Result<Tensor<D>> {
        let inner = super::super::geglu_width(x.cols)?;
        let out = self.output(x.rows, inner, "geglu output")?;
        // The kernel moves 16 bytes at a time where the width allows (allocations are aligned).
        ensure!(
            x.ptr.is_multiple_of(16) && out.ptr.is_multiple_of(16),
            "geglu: the tensors are not 16-byte aligned"
        );
        if x.rows * inner == 0 {
            return Ok(out);
        }
        let launch = Launch {
            entry: Entry::Geglu,
            grid: stride_grid(x.rows * inner, self.dev().multiprocessors()),
            block: STRIDE_THREADS,
            args: vec![
                Arg::Ptr(x.ptr),
                Arg::Ptr(out.ptr),
                Arg::I32(int(x.rows, "rows")?),
                Arg::I32(int(inner, "width")?),
                Arg::I32(i32::from(act.code())),
            ],
        };
        self.launch(launch, "geglu")?;
        Ok(out)
    }

    fn attention(
        &self,
        qkv: &Tensor<D>,
        batch: &DevBatch<D::BatchMem>,
        heads: usize,
        window: Option<usize>,
    ) -> Result<Tensor<D>> {
        let (h, d) =
            super::super::qkv_shape("attention", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(
            window != Some(0),
            "attention: a sliding window must be at least 1 token"
        );
        let (entry, threads) = self.attention_entry(d)?;
        ensure!(
            qkv.ptr.is_multiple_of(16),
            "attention: the qkv tensor is not 16-byte aligned (the kernels copy 16 bytes at a time)"
        );
        let out = self.output(qkv.rows, h, "attention output")?;
        if batch.n_blocks == 0 {
            return Ok(out);
        }
        let half_window: i32 = match window {
            Some(w) => int(w / 2, "window")?,
            None => -1,
        };
        let launch = Launch {
            entry,
            grid: (batch.n_blocks as u32, heads as u32, 1),
            block: threads,
            args: [
                attention_args(qkv, batch, &out, h)?,
                vec![Arg::I32(half_window), Arg::F32(1.0 / (d as f32).sqrt())],
            ]
            .concat(),
        };
        // (blocks lie within their sequences, which lie within qkv's rows.)
        self.launch(launch, "attention")?;
        Ok(out)
    }

    fn attention_disentangled(
        &self,
        qkv: &Tensor<D>,
        batch: &DevBatch<D::BatchMem>,
        heads: usize,
        rel: &super::super::Disentangled<'_, Tensor<D>>,
    ) -> Result<Tensor<D>> {
        let (h, d) = super::super::disentangled_shape(
            (qkv.rows, qkv.cols),
            batch.n_tokens,
            heads,
            rel,
            |t| (t.rows, t.cols),
        )?;
        ensure!(
            ATTENTION_HEAD_DIMS.contains(&d),
            "attention_disentangled: head size {d} has no CUDA kernel (supported: {ATTENTION_HEAD_DIMS:?})"
        );
        let out = self.output(qkv.rows, h, "attention output")?;
        if batch.n_blocks == 0 {
            return Ok(out);
        }
        let (table, index_ptr, covered) = self.relative_table(rel.index_key(), batch.max_len)?;
        // A graph recorded now reads this table for as long as it lives.
        self.with_recording(|r| r.keep.push(table));
        let launch = Launch {
            entry: Entry::AttentionRel(d),
            grid: (batch.n_blocks as u32, heads as u32, 1),
            block: QUERY_BLOCK as u32,
            args: [
                attention_args(qkv, batch, &out, h)?,
                vec![
                    Arg::F32(1.0 / ((d * rel.scale_factor.max(1)) as f32).sqrt()),
                    // An absent table is never read (its bit of `terms` is clear).
                    Arg::Ptr(rel.pos_key.map_or(0, |t| t.ptr)),
                    Arg::Ptr(rel.pos_query.map_or(0, |t| t.ptr)),
                    Arg::Ptr(index_ptr),
                    Arg::I32(int(covered - 1, "relative index table")?),
                    Arg::I32(rel.terms_mask() as i32),
                ],
            ]
            .concat(),
        };
        self.launch(launch, "attention_disentangled")?;
        Ok(out)
    }

    fn pool(
        &self,
        x: &Tensor<D>,
        batch: &DevBatch<D::BatchMem>,
        mode: Pooling,
    ) -> Result<Tensor<D>> {
        ensure!(
            x.rows == batch.n_tokens,
            "pool: {} rows for a batch of {} tokens",
            x.rows,
            batch.n_tokens
        );
        let out = self.output(batch.n_seqs, mode.width(x.cols), "pooled")?;
        if batch.n_seqs * x.cols == 0 {
            return Ok(out);
        }
        let mode: i32 = match mode {
            Pooling::Cls => 0,
            Pooling::Mean => 1,
            Pooling::ClsAndMean => 2,
        };
        let launch = Launch {
            entry: Entry::Pool,
            grid: (batch.n_seqs as u32, 1, 1),
            block: ROW_THREADS,
            args: vec![
                Arg::Ptr(x.ptr),
                Arg::Ptr(batch.cu_seqlens),
                Arg::Ptr(out.ptr),
                Arg::I32(int(batch.n_seqs, "sequences")?),
                Arg::I32(int(x.cols, "width")?),
                Arg::I32(mode),
            ],
        };
        // (one block per sequence; cu_seqlens bounds every row read.)
        self.launch(launch, "pool")?;
        Ok(out)
    }

    fn download(&self, x: &Tensor<D>) -> Result<Vec<f32>> {
        let n = x.rows * x.cols * self.elem_bytes();
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the tensor holds at least n bytes.
        let bytes = unsafe { self.dev().download(x.ptr, n)? };
        Ok(self.storage().decode(&bytes))
    }

    fn concurrency(&self) -> usize {
        self.dev().concurrency()
    }

    fn graph_stats(&self) -> Option<GraphStats> {
        Some(KernelBackend::graph_stats(self))
    }

    /// Batches of at most `graph_tokens` tokens (see [`KernelBackend::set_graph_tokens`]) run
    /// as CUDA graphs once their shape repeats; others run op by op.
    fn run_forward(
        &self,
        batch: &Batch,
        limits: (usize, usize),
        kind: &str,
        forward: &dyn Fn(&Self::Batch) -> Result<Self::Tensor>,
    ) -> Result<Vec<f32>> {
        let b = self.upload_batch(batch, limits.0, limits.1)?;
        self.run_graphed(&b, kind, forward)
    }

    fn sync(&self) -> Result<()> {
        self.dev().sync()
    }
}

/// The arguments every attention.cu kernel starts with: qkv, the query blocks, `cu_seqlens`, the
/// output, the hidden size and the block count.
fn attention_args<M: Send + Sync, B>(
    qkv: &DevTensor<M>,
    batch: &DevBatch<B>,
    out: &DevTensor<M>,
    hidden: usize,
) -> Result<Vec<Arg>> {
    Ok(vec![
        Arg::Ptr(qkv.ptr),
        Arg::Ptr(batch.blocks),
        Arg::Ptr(batch.cu_seqlens),
        Arg::Ptr(out.ptr),
        Arg::I32(int(hidden, "hidden")?),
        Arg::I32(int(batch.n_blocks, "attention blocks")?),
    ])
}

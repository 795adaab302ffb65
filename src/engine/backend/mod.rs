//! The backend interface: a narrow set of fused encoder ops, not a tensor library.
//!
//! A model (`model/bert.rs`) is written once as a sequence of these ops and runs unchanged on
//! every backend. Tensors are 2-D and row-major (`[rows, cols]`); a backend chooses how it stores
//! them (f32 on CPU, bf16/f16 on GPUs). Backends never parse configs and models never reach into a
//! backend's internals.

pub mod cpu;
pub mod cuda;
pub mod wgpu;

use anyhow::Result;

use super::{Activation, Batch, HostF32, Pooling};

/// Which linear map of an encoder layer a weight belongs to ([`Backend::linear_weight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// Attention's query/key/value projections.
    AttentionInput,
    /// Attention's output projection, back to the hidden size.
    AttentionOutput,
    /// The feed-forward block's input projection (with its gate, where the model has one).
    FeedForwardUp,
    /// The feed-forward block's output projection, back to the hidden size.
    FeedForwardDown,
}

/// The embedding tables of an encoder, as device tensors.
pub struct EmbeddingTables<T> {
    /// `[vocab, H]`
    pub word: T,
    /// `[max_positions, H]`, or `None` for models without absolute positions.
    pub position: Option<T>,
    /// Row 0 of the token-type table, `[1, H]` (single-segment inputs), if the model has one.
    pub token_type: Option<T>,
    /// LayerNorm over the summed embeddings: weight and optional bias, `[1, H]`.
    pub norm_weight: T,
    pub norm_bias: Option<T>,
    pub eps: f32,
}

/// DeBERTa's relative-position terms of one attention layer ([`Backend::attention_disentangled`]).
pub struct Disentangled<'a, T> {
    /// Content-to-position: the relative embeddings through the key projection, `[2·span, H]`.
    pub pos_key: Option<&'a T>,
    /// Position-to-content: the relative embeddings through the query projection, `[2·span, H]`.
    pub pos_query: Option<&'a T>,
    /// Relative embeddings per side (`position_buckets`, else `max_relative_positions`).
    pub span: usize,
    /// `position_buckets` (0: relative distances are not bucketed).
    pub buckets: usize,
    /// `max_relative_positions`.
    pub max_relative: usize,
    /// Scores are divided by `sqrt(d · scale_factor)`: one for content and one per position
    /// term the config names (`pos_att_type`), even where relative attention is off.
    pub scale_factor: usize,
}

/// The row of the relative tables that query `i` and key `j` use in DeBERTa's disentangled
/// attention: `clamp(bucket(i - j) + span, 0, 2·span - 1)`, with transformers'
/// `make_log_bucket_position` (distances beyond `buckets / 2` on a log scale up to
/// `max_relative`, computed in f32 as torch does) when `buckets > 0`. Both the content-to-position
/// and the position-to-content terms use it (the bucket of `j - i` is minus that of `i - j`).
pub fn relative_index(
    i: usize,
    j: usize,
    span: usize,
    buckets: usize,
    max_relative: usize,
) -> usize {
    let rel = i as i64 - j as i64;
    let bucket = if buckets > 0 && max_relative > 0 {
        let mid = (buckets / 2) as i64;
        let abs = if rel < mid && rel > -mid {
            mid - 1
        } else {
            rel.abs()
        };
        if abs <= mid {
            rel
        } else {
            let ratio =
                (abs as f32 / mid as f32).ln() / ((max_relative - 1) as f32 / mid as f32).ln();
            let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
            log_pos as i64 * rel.signum()
        }
    } else {
        rel
    };
    (bucket + span as i64).clamp(0, 2 * span as i64 - 1) as usize
}

/// What a [`relative_index_table`] depends on: (span, buckets, max_relative).
pub type RelativeKey = (usize, usize, usize);

impl<T> Disentangled<'_, T> {
    /// The key under which a backend caches [`relative_index_table`]s for these terms.
    pub fn index_key(&self) -> RelativeKey {
        (self.span, self.buckets, self.max_relative)
    }

    /// The terms the GPU kernels add, as their bit mask: 1 content-to-position, 2
    /// position-to-content.
    pub fn terms_mask(&self) -> u32 {
        self.pos_key.is_some() as u32 | (self.pos_query.is_some() as u32) << 1
    }
}

/// [`relative_index`] for every distance between two tokens of a sequence of up to `len`
/// tokens, at `i - j + len - 1` (`2·len - 1` entries): the GPU backends upload it once per
/// (terms, length) so their kernels look rows up instead of taking logarithms, which could round
/// a bucket differently from the CPU.
pub fn relative_index_table(
    len: usize,
    span: usize,
    buckets: usize,
    max_relative: usize,
) -> Vec<u32> {
    (0..(2 * len).saturating_sub(1))
        .map(|k| relative_index(k, len - 1, span, buckets, max_relative) as u32)
        .collect()
}

/// Shape checks shared by every backend's `attention_disentangled`: the relative tables are
/// `[2·span, H]`. Returns `(H, head size)`.
pub fn disentangled_shape<T>(
    qkv: (usize, usize),
    tokens: usize,
    heads: usize,
    rel: &Disentangled<'_, T>,
    shape: impl Fn(&T) -> (usize, usize),
) -> Result<(usize, usize)> {
    let (h, d) = qkv_shape("attention_disentangled", qkv.0, qkv.1, tokens, heads)?;
    anyhow::ensure!(
        rel.span > 0,
        "attention_disentangled: span must be at least 1"
    );
    for (name, t) in [("pos_key", rel.pos_key), ("pos_query", rel.pos_query)] {
        if let Some(t) = t {
            let (rows, cols) = shape(t);
            anyhow::ensure!(
                (rows, cols) == (2 * rel.span, h),
                "attention_disentangled: {name} is [{rows}, {cols}], expected [{}, {h}]",
                2 * rel.span
            );
        }
    }
    Ok((h, d))
}

/// Shape checks shared by every backend's `linear`: x `[m, k]`, w `[n, k]`, bias of `n` values.
/// Returns `(m, k, n)`.
pub fn linear_shape(
    x: (usize, usize),
    w: (usize, usize),
    bias_len: Option<usize>,
) -> Result<(usize, usize, usize)> {
    let ((m, k), (n, wk)) = (x, w);
    anyhow::ensure!(
        wk == k,
        "linear: input has {k} columns but weight is [{n}, {wk}]"
    );
    if let Some(len) = bias_len {
        anyhow::ensure!(len == n, "linear: bias has {len} values, expected {n}");
    }
    Ok((m, k, n))
}

/// Shape checks shared by every backend's `rope` and `attention`: `qkv` is `[rows, 3H]` for a
/// batch of `tokens` tokens and `heads` heads divide `H`. Returns `(H, head size)`.
pub fn qkv_shape(
    op: &str,
    rows: usize,
    cols: usize,
    tokens: usize,
    heads: usize,
) -> Result<(usize, usize)> {
    anyhow::ensure!(
        cols.is_multiple_of(3) && heads > 0,
        "{op}: qkv has {cols} columns (expected 3 × hidden)"
    );
    let h = cols / 3;
    anyhow::ensure!(
        h.is_multiple_of(heads),
        "{op}: hidden {h} not divisible by {heads} heads"
    );
    anyhow::ensure!(
        rows == tokens,
        "{op}: qkv has {rows} rows for a batch of {tokens} tokens"
    );
    Ok((h, h / heads))
}

/// `geglu`'s shape check shared by every backend: the input holds the input half and the gate
/// half side by side. Returns the output width.
pub fn geglu_width(cols: usize) -> Result<usize> {
    anyhow::ensure!(
        cols.is_multiple_of(2),
        "geglu: input has an odd number of columns ({cols})"
    );
    Ok(cols / 2)
}

/// Shape checks shared by the GPU backends' LayerNorm kernels: rows of `cols` values (at most
/// `max_row`, what one workgroup holds), weight and bias of `cols` values, a residual of the same
/// shape as x.
pub fn norm_shape(
    (rows, cols): (usize, usize),
    weight_len: usize,
    bias_len: Option<usize>,
    residual: Option<(usize, usize)>,
    max_row: usize,
) -> Result<()> {
    anyhow::ensure!(
        cols <= max_row,
        "layernorm: rows of {cols} values exceed the kernel's {max_row}"
    );
    anyhow::ensure!(weight_len == cols, "layernorm: weight is not [1, {cols}]");
    if let Some(len) = bias_len {
        anyhow::ensure!(len == cols, "layernorm: bias is not [1, {cols}]");
    }
    if let Some((r_rows, r_cols)) = residual {
        anyhow::ensure!(
            (r_rows, r_cols) == (rows, cols),
            "layernorm: residual is [{r_rows}, {r_cols}], expected [{rows}, {cols}]"
        );
    }
    Ok(())
}

/// The query blocks of a ragged batch for the GPU attention kernels: `(sequence, first query)`
/// pairs, flattened, for every run of up to `block` queries within one sequence (a block never
/// crosses a sequence boundary).
pub fn query_blocks(cu_seqlens: &[u32], block: usize) -> Vec<u32> {
    let mut blocks = Vec::new();
    for s in 0..cu_seqlens.len().saturating_sub(1) {
        let mut q0 = cu_seqlens[s];
        while q0 < cu_seqlens[s + 1] {
            blocks.extend_from_slice(&[s as u32, q0]);
            q0 += block as u32;
        }
    }
    blocks
}

/// A rotary embedding's frequencies: `theta^(-2i/d)` for `i < d/2`, optionally NTK-scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotary {
    pub theta: f32,
    pub ntk: Option<Ntk>,
}

/// [`Rotary::key`]: theta, NTK factor and `mixed_b` as bits.
pub type RotaryKey = (u32, u32, u32);

/// NTK-aware scaling of rotary frequencies (GTE's `rope_scaling: {type: ntk}`,
/// <https://kexue.fm/archives/9706>): fixed (`mixed_b` absent) or mixed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ntk {
    pub factor: f32,
    pub mixed_b: Option<f32>,
}

impl Rotary {
    pub fn plain(theta: f32) -> Rotary {
        Rotary { theta, ntk: None }
    }

    /// What tells two tables apart (bit patterns, so it can key a map).
    pub fn key(&self) -> RotaryKey {
        let ntk = self.ntk.map_or((0, 0), |n| {
            (n.factor.to_bits(), n.mixed_b.map_or(u32::MAX, f32::to_bits))
        });
        (self.theta.to_bits(), ntk.0, ntk.1)
    }

    /// The `half` frequencies, in f32 as the reference implementations compute them. With NTK
    /// scaling (a factor above 1, as GTE's published code, which applies it whenever its cache
    /// covers more than `max_position_embeddings`, i.e. always):
    /// fixed: `(theta·factor)^(-2i/d) / factor^(2/d)`; mixed:
    /// `theta^(-2i/d) / exp(a·(i+1)^b)` with `a = ln(factor) / (d/2)^b`.
    pub fn inv_freq(&self, half: usize) -> Vec<f32> {
        let d = 2 * half;
        let ntk = self.ntk.filter(|n| n.factor > 1.0);
        let base = match ntk {
            Some(Ntk {
                factor,
                mixed_b: None,
            }) => self.theta * factor,
            _ => self.theta,
        };
        let plain = (0..half).map(move |i| 1.0 / base.powf((2 * i) as f32 / d as f32));
        match ntk {
            None => plain.collect(),
            Some(Ntk {
                factor,
                mixed_b: None,
            }) => plain.map(|f| f / factor.powf(2.0 / d as f32)).collect(),
            Some(Ntk {
                factor,
                mixed_b: Some(b),
            }) => {
                let a = factor.ln() / (half as f32).powf(b);
                plain
                    .enumerate()
                    .map(|(i, f)| f / (a * ((i + 1) as f32).powf(b)).exp())
                    .collect()
            }
        }
    }
}

/// The rotary table every backend uses: `(cos, sin)` of position `p` and frequency `i` at
/// `[p · half + i]`, for positions `0..positions`. Frequencies and angles in f32 exactly as
/// transformers computes them (its rotary embedding runs in float32 even for a float64 model),
/// cos/sin then taken in f64; so long positions do not depend on a GPU's `sin`.
pub fn rotary_table(rotary: Rotary, half: usize, positions: usize) -> Vec<[f32; 2]> {
    let inv_freq = rotary.inv_freq(half);
    let mut table = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            table.push([angle.cos() as f32, angle.sin() as f32]);
        }
    }
    table
}

/// One device's implementation of the encoder ops.
pub trait Backend: Send + Sync + 'static {
    /// A 2-D row-major tensor living on the device.
    type Tensor: Send + Sync;
    /// A batch's index data on the device: token ids, positions, `cu_seqlens`.
    type Batch: Send + Sync;

    /// Human-readable description (`cpu (2 threads, avx2+fma)`).
    fn name(&self) -> String;

    /// Upload a weight given in f32, `[rows, cols]` (owned, or read in place from a mapped
    /// checkpoint: a backend that keeps host values, as the CPU does, keeps mapped ones mapped).
    fn weight(&self, data: impl Into<HostF32>, rows: usize, cols: usize) -> Result<Self::Tensor>;

    /// Upload the weight of an encoder layer's linear map (`[out, in]`, only ever passed as `w`
    /// to [`Backend::linear`]): a backend may store it in a form only `linear` reads, as the CPU's
    /// int8 and bf16 paths do, and may choose that form by the layer's `kind` (no backend does
    /// today: the CPU's int8 kept the feed-forward output projection f32 until its weights got
    /// 64-wide scale groups; an 8-bit activation path would treat that projection's
    /// non-negative GELU inputs differently). Heads and embedding tables go through
    /// [`Backend::weight`].
    fn linear_weight(
        &self,
        data: impl Into<HostF32>,
        rows: usize,
        cols: usize,
        kind: LinearKind,
    ) -> Result<Self::Tensor> {
        let _ = kind;
        self.weight(data, rows, cols)
    }

    /// Upload a batch's ids, positions and sequence boundaries after [`Batch::validate`] (`vocab`
    /// and `max_positions` bound the ids and positions): a malformed batch is an error, never an
    /// out-of-bounds read.
    fn upload_batch(
        &self,
        batch: &Batch,
        vocab: usize,
        max_positions: usize,
    ) -> Result<Self::Batch>;

    /// Gather word (+ position + token-type) embeddings and apply LayerNorm. Out: `[T, H]`.
    fn embed(
        &self,
        batch: &Self::Batch,
        tables: &EmbeddingTables<Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// `act(x · wᵀ + b)`: x `[T, K]`, w `[N, K]`, b `[1, N]`. Out: `[T, N]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// `LayerNorm(x + residual)`, computed in place of `x`. Both `[T, H]`; weight/bias `[1, H]`.
    fn add_layernorm(
        &self,
        x: Self::Tensor,
        residual: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Pre-norm residual step: `x += delta` in place, and return `LayerNorm(x)` as a new tensor
    /// (the residual stream keeps the un-normalised sum). `[T, H]`; weight/bias `[1, H]`.
    fn add_norm(
        &self,
        x: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `LayerNorm(x)` as a new tensor. `[T, H]`; weight/bias `[1, H]`.
    fn layernorm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Rotary position embedding on the Q and K blocks of `qkv` (`[T, 3H]`), in place, at each
    /// token's position within its sequence: the rotate-half convention of Hugging Face
    /// (`x·cos + rotate_half(x)·sin`, frequencies [`Rotary::inv_freq`]).
    fn rope(
        &self,
        qkv: Self::Tensor,
        batch: &Self::Batch,
        heads: usize,
        rotary: Rotary,
    ) -> Result<Self::Tensor>;

    /// Gated linear unit: `x` is `[T, 2I]` (input half, then gate half); out `[T, I]` =
    /// `act(input) · gate` (GeGLU with a GELU activation).
    fn geglu(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// Per-sequence multi-head attention `softmax(Q·Kᵀ·scale)·V` over the ragged batch.
    /// `qkv` is `[T, 3H]` with Q, K and V side by side; heads are contiguous `H/heads` column
    /// blocks of each. `window`: only keys with `|i - j| <= window/2` are attended (sliding-window
    /// layers); `None` for global attention. Out: `[T, H]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        batch: &Self::Batch,
        heads: usize,
        window: Option<usize>,
    ) -> Result<Self::Tensor>;

    /// DeBERTa's disentangled attention: [`Backend::attention`] (global) with each score
    /// `q_i·k_j` joined by `q_i·pos_key[r]` (content-to-position) and `k_j·pos_query[r]`
    /// (position-to-content), `r = relative_index(i, j, ..)`, all divided by
    /// `sqrt(d · rel.scale_factor)`. Out: `[T, H]`.
    fn attention_disentangled(
        &self,
        qkv: &Self::Tensor,
        batch: &Self::Batch,
        heads: usize,
        rel: &Disentangled<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// One vector per sequence: `[T, H]` -> `[n_seqs, H]`.
    fn pool(&self, x: &Self::Tensor, batch: &Self::Batch, mode: Pooling) -> Result<Self::Tensor>;

    /// Copy a tensor to the host as f32, row-major.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// One forward pass: upload `batch` (`limits`: vocab size and max positions, as for
    /// [`Backend::upload_batch`]), let `forward` enqueue its ops, and download the tensor it
    /// returns. `kind` names what `forward` computes: it must enqueue the same ops for every
    /// batch of the same shape under one `kind`, which lets a backend replay a recording of an
    /// earlier pass instead of calling `forward` (the CUDA backend's graphs for small batches).
    fn run_forward(
        &self,
        batch: &Batch,
        limits: (usize, usize),
        kind: &str,
        forward: &dyn Fn(&Self::Batch) -> Result<Self::Tensor>,
    ) -> Result<Vec<f32>> {
        let _ = kind;
        let b = self.upload_batch(batch, limits.0, limits.1)?;
        self.download(&forward(&b)?)
    }

    /// Wait for all queued work.
    fn sync(&self) -> Result<()>;

    /// The most tokens one batch may hold when its widest activation has `widest_cols` columns,
    /// if the device bounds it (a GPU's largest buffer binding); `None` when unbounded.
    fn max_batch_tokens(&self, widest_cols: usize) -> Option<usize> {
        let _ = widest_cols;
        None
    }

    /// How often forward passes were recorded as graphs, replayed from one, or run op by op,
    /// on a backend that has graphs (CUDA).
    fn graph_stats(&self) -> Option<GraphStats> {
        None
    }

    /// Start (`true`) or end calibration, returning whether this backend calibrates at all (the
    /// CPU's int8 layers: while on, they run in f32 and record their inputs' ranges, which the
    /// quantization on first use afterwards smooths with). `Scorer` runs fixed texts through
    /// every model it loads in between; a backend without calibration ignores it.
    fn set_calibrating(&self, on: bool) -> bool {
        let _ = on;
        false
    }

    /// How many threads may run forward passes on this backend at once to keep it busy: a GPU
    /// whose ops are asynchronous takes the next batch while the last one's result comes back.
    fn concurrency(&self) -> usize {
        1
    }
}

/// How often forward passes were recorded as device graphs, replayed from one, or run op by op:
/// a backend-neutral report (CUDA graphs today) that reaches `mira bench` without naming a
/// backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    /// Graphs recorded (captured and instantiated).
    pub recorded: u64,
    /// Forward passes run by launching a graph.
    pub replayed: u64,
    /// Forward passes of graph-sized batches run op by op.
    pub direct: u64,
    /// Graphs dropped to stay within the backend's graph budget.
    pub evicted: u64,
}

impl std::ops::Add for GraphStats {
    type Output = GraphStats;
    fn add(self, o: GraphStats) -> GraphStats {
        GraphStats {
            recorded: self.recorded + o.recorded,
            replayed: self.replayed + o.replayed,
            direct: self.direct + o.direct,
            evicted: self.evicted + o.evicted,
        }
    }
}

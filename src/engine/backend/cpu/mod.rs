//! The CPU backend: the readable reference, and fast enough to be useful.
//!
//! f32 arithmetic, except the encoder's linear layers under `--precision int8` (`int8.rs`: 8-bit
//! integer GEMM, exact i32 sums per group of 64 inputs, bias and activation fused) and
//! `--precision bf16` where the CPU has AVX512_BF16 (`bf16.rs`), both on the panels of `panels.rs`.
//! f32 GEMMs go through the `gemm` crate (packed, runtime-dispatched AVX2/AVX-512/NEON kernels,
//! rayon-parallel), then one vectorised bias and activation pass; attention runs one task per
//! (sequence, head) over the ragged batch (`attention.rs`); element-wise math is in `math.rs`.

mod attention;
pub mod bf16;
pub mod int8;
mod int8_linear;
pub mod math;
mod panels;
mod precision;
mod tensor;

pub use precision::{cpu_features, simd_level, CpuPrecision};
pub use tensor::CpuTensor;
use tensor::PackedLinear;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, HostF32, LinearKind, Pooling};

/// A batch's index data (host memory is the device here).
pub struct CpuBatch {
    ids: Vec<u32>,
    positions: Vec<u32>,
    cu_seqlens: Vec<usize>,
}

impl CpuBatch {
    fn seq(&self, s: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[s]..self.cu_seqlens[s + 1]
    }
    fn n_seqs(&self) -> usize {
        self.cu_seqlens.len() - 1
    }
}

/// The CPU backend. Work is spread over rayon's global pool.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    precision: CpuPrecision,
    /// While set, int8 layers run in f32 and record their inputs' ranges (`int8_linear.rs`).
    calibrating: Arc<AtomicBool>,
}

fn par() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A raw pointer that may be shared across rayon tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user writes only to a region no other task touches (documented at each use).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so closures capture the whole `Send + Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Output storage that the op overwrites completely: skipping the zero-fill saves a full memory
/// pass per op (it was ~5% of a MiniLM forward).
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit<f32> needs no initialisation and the capacity is n.
    unsafe { v.set_len(n) };
    v
}

/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout-compatible element type, all elements initialised (caller).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

/// Rows of `out` per rayon task in element-wise passes: big enough to amortise scheduling.
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let target = 16 * 1024 / cols.max(1);
    target.clamp(1, rows.max(1))
}

/// `x · wᵀ` for `x` `[m, k]` and `w` `[n, k]`, row-major: the f32 linear layer's GEMM.
fn gemm_f32(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    // The unsafe call below reads these extents: a tensor without its values (a packed weight
    // used where an f32 one belongs) must be an error here, not a read out of bounds.
    ensure!(
        x.len() == m * k && w.len() == n * k,
        "linear: {} input values for [{m}, {k}] and {} weight values for [{n}, {k}]",
        x.len(),
        w.len()
    );
    let mut out = uninit(m * n);
    if m > 0 {
        // SAFETY: out is [m, n] (row stride n), x is [m, k] (row stride k), and wᵀ is read as a
        // [k, n] matrix from w's [n, k] storage: element (p, j) at w[j*k + p], so the column
        // stride is k and the row stride 1. All pointers are valid for those extents (checked).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr() as *mut f32,
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par(),
            );
        }
    }
    // SAFETY: with read_dst = false the GEMM wrote every element of the [m, n] output.
    Ok(unsafe { assume_init(out) })
}

/// An f32 linear layer's epilogue: bias and activation in one vectorised pass per block of rows
/// (measured faster than accumulating the GEMM onto prefilled bias rows).
fn bias_act(
    mut out: Vec<f32>,
    m: usize,
    n: usize,
    b: Option<&CpuTensor>,
    act: Activation,
) -> CpuTensor {
    let kind = act.code();
    let bias = b.map(|b| &b.data[..]).unwrap_or(&[]);
    if kind != 0 || !bias.is_empty() {
        let chunk = rows_per_task(m, n);
        out.par_chunks_mut(chunk * n)
            .for_each(|rows| math::bias_act_rows(rows, bias, n, kind));
    }
    CpuTensor::new(out, m, n)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Batch = CpuBatch;

    fn name(&self) -> String {
        let precision = match self.precision {
            CpuPrecision::F32 => String::new(),
            CpuPrecision::Bf16 if bf16::Kernel::vector().is_some() => {
                format!(", bf16 {}", bf16::Kernel::best().name())
            }
            CpuPrecision::Bf16 => ", bf16 weights emulated".into(),
            CpuPrecision::F16 => ", f16 weights emulated".into(),
            CpuPrecision::Int8 => format!(", int8 {}", int8::Kernel::best().name()),
        };
        format!(
            "cpu ({} threads, {}{precision})",
            rayon::current_num_threads(),
            simd_level()
        )
    }

    fn weight(&self, data: impl Into<HostF32>, rows: usize, cols: usize) -> Result<CpuTensor> {
        let mut data = data.into();
        ensure!(
            data.len() == rows * cols,
            "weight has {} values, expected {rows}x{cols}",
            data.len()
        );
        match self.precision {
            CpuPrecision::Bf16 => data
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            CpuPrecision::F16 => data
                .iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            CpuPrecision::F32 | CpuPrecision::Int8 => {}
        }
        Ok(CpuTensor::new(data, rows, cols))
    }

    fn linear_weight(
        &self,
        data: impl Into<HostF32>,
        rows: usize,
        cols: usize,
        _kind: LinearKind,
    ) -> Result<CpuTensor> {
        let data = data.into();
        let bf16 = self.precision == CpuPrecision::Bf16 && bf16::Kernel::vector().is_some();
        if self.precision != CpuPrecision::Int8 && !bf16 {
            return self.weight(data, rows, cols);
        }
        ensure!(
            data.len() == rows * cols,
            "weight has {} values, expected {rows}x{cols}",
            data.len()
        );
        let packed = if bf16 {
            PackedLinear::Bf16(bf16::PackedWeight::pack(&data, rows, cols))
        } else {
            PackedLinear::Int8(int8_linear::Int8Linear::new(data, rows, cols))
        };
        Ok(CpuTensor::packed_linear(packed, rows, cols))
    }

    fn set_calibrating(&self, on: bool) -> bool {
        let int8 = self.precision == CpuPrecision::Int8;
        self.calibrating.store(on && int8, Ordering::Relaxed);
        int8
    }

    fn upload_batch(&self, batch: &Batch, vocab: usize, max_positions: usize) -> Result<CpuBatch> {
        // The kernels index with these values: a malformed batch must be an error, not UB.
        batch.validate(vocab, max_positions)?;
        Ok(CpuBatch {
            ids: batch.ids.clone(),
            positions: batch.positions.clone(),
            cu_seqlens: batch.cu_seqlens.iter().map(|&c| c as usize).collect(),
        })
    }

    fn embed(&self, batch: &CpuBatch, t: &EmbeddingTables<CpuTensor>) -> Result<CpuTensor> {
        let h = t.word.cols;
        let n = batch.ids.len();
        let mut out = vec![0f32; n * h];
        let bias = t.norm_bias.as_ref().map(|b| &b.data[..]).unwrap_or(&[]);
        let chunk = rows_per_task(n, h);
        out.par_chunks_mut(chunk * h)
            .enumerate()
            .for_each(|(c, rows)| {
                for (r, row) in rows.chunks_exact_mut(h).enumerate() {
                    let tok = c * chunk + r;
                    let id = batch.ids[tok] as usize;
                    row.copy_from_slice(&t.word.data[id * h..(id + 1) * h]);
                    if let Some(pos) = &t.position {
                        let p = batch.positions[tok] as usize;
                        row.iter_mut()
                            .zip(&pos.data[p * h..(p + 1) * h])
                            .for_each(|(v, e)| *v += e);
                    }
                    if let Some(tt) = &t.token_type {
                        row.iter_mut()
                            .zip(tt.data.iter())
                            .for_each(|(v, e)| *v += e);
                    }
                }
                math::add_layernorm_rows(rows, &[], &t.norm_weight.data, bias, t.eps);
            });
        Ok(CpuTensor::new(out, n, h))
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        let (m, k, n) =
            super::linear_shape((x.rows, x.cols), (w.rows, w.cols), b.map(|b| b.data.len()))?;
        let calibrating = self.calibrating.load(Ordering::Relaxed);
        if let (Some(PackedLinear::Int8(layer)), true) = (w.packed.as_deref(), calibrating) {
            // Record the input's range and compute in f32 while the layer holds it.
            layer.observe(&x.data);
            if let Some(out) = layer.with_f32(|w| gemm_f32(&x.data, w, m, k, n)) {
                return Ok(bias_act(out?, m, n, b, act));
            }
        }
        if let Some(packed) = &w.packed {
            let mut out = uninit(m * n);
            // SAFETY: MaybeUninit<f32> and f32 have the same layout; both GEMMs write every
            // element of the [m, n] output (each row block walks every panel's columns).
            let out_f32 =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
            // Whether the GEMM applied bias and activation itself (int8 does, per task).
            let fused = match &**packed {
                PackedLinear::Int8(layer) => {
                    let w = layer.packed();
                    let x = int8::QuantRows::quantize_for(&x.data, m, w);
                    let bias = b.map(|b| &b.data[..]).unwrap_or(&[]);
                    let epilogue = int8::Epilogue {
                        bias,
                        act: act.code(),
                    };
                    int8::gemm(&x, w, out_f32, epilogue);
                    true
                }
                PackedLinear::Bf16(w) => {
                    bf16::gemm(&bf16::Bf16Rows::round(&x.data, m, k), w, out_f32);
                    false
                }
            };
            // SAFETY: written above.
            let out = unsafe { assume_init(out) };
            return Ok(if fused {
                CpuTensor::new(out, m, n)
            } else {
                bias_act(out, m, n, b, act)
            });
        }
        Ok(bias_act(gemm_f32(&x.data, &w.data, m, k, n)?, m, n, b, act))
    }

    fn add_layernorm(
        &self,
        mut x: CpuTensor,
        residual: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        eps: f32,
    ) -> Result<CpuTensor> {
        ensure!(
            x.rows == residual.rows && x.cols == residual.cols && weight.data.len() == x.cols,
            "add_layernorm: shapes [{}, {}] + [{}, {}] with norm of {}",
            x.rows,
            x.cols,
            residual.rows,
            residual.cols,
            weight.data.len()
        );
        let cols = x.cols;
        let bias = bias.map(|b| &b.data[..]).unwrap_or(&[]);
        let chunk = rows_per_task(x.rows, cols);
        x.data
            .par_chunks_mut(chunk * cols)
            .zip(residual.data.par_chunks(chunk * cols))
            .for_each(|(rows, res)| math::add_layernorm_rows(rows, res, &weight.data, bias, eps));
        Ok(x)
    }

    fn add_norm(
        &self,
        x: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        eps: f32,
    ) -> Result<CpuTensor> {
        ensure!(
            x.rows == delta.rows && x.cols == delta.cols && weight.data.len() == x.cols,
            "add_norm: shapes [{}, {}] + [{}, {}] with norm of {}",
            x.rows,
            x.cols,
            delta.rows,
            delta.cols,
            weight.data.len()
        );
        let cols = x.cols;
        let bias = bias.map(|b| &b.data[..]).unwrap_or(&[]);
        let mut out = uninit(x.data.len());
        let chunk = rows_per_task(x.rows, cols) * cols;
        {
            // SAFETY: MaybeUninit<f32> and f32 have the same layout; every element is written by
            // `add_norm_rows` (it copies each row before normalising it) before `assume_init`.
            let out_f32 =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
            x.data
                .par_chunks_mut(chunk)
                .zip(delta.data.par_chunks(chunk))
                .zip(out_f32.par_chunks_mut(chunk))
                .for_each(|((xr, dr), or)| {
                    math::add_norm_rows(xr, dr, or, &weight.data, bias, eps)
                });
        }
        // SAFETY: see above.
        let out = unsafe { assume_init(out) };
        Ok(CpuTensor::new(out, x.rows, cols))
    }

    fn layernorm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        eps: f32,
    ) -> Result<CpuTensor> {
        ensure!(
            weight.data.len() == x.cols,
            "layernorm: {} columns, norm of {}",
            x.cols,
            weight.data.len()
        );
        let mut out = x.clone();
        let bias = bias.map(|b| &b.data[..]).unwrap_or(&[]);
        let chunk = rows_per_task(x.rows, x.cols) * x.cols;
        out.data
            .par_chunks_mut(chunk)
            .for_each(|rows| math::add_layernorm_rows(rows, &[], &weight.data, bias, eps));
        Ok(out)
    }

    fn rope(
        &self,
        mut qkv: CpuTensor,
        batch: &CpuBatch,
        heads: usize,
        rotary: super::Rotary,
    ) -> Result<CpuTensor> {
        let (h, d) = super::qkv_shape("rope", qkv.rows, qkv.cols, batch.ids.len(), heads)?;
        ensure!(d.is_multiple_of(2), "rope: head size {d} must be even");
        let half = d / 2;
        let max_pos = batch
            .positions
            .iter()
            .copied()
            .max()
            .map_or(0, |p| p as usize + 1);
        let table = super::rotary_table(rotary, half, max_pos);
        let cos: Vec<f32> = table.iter().map(|cs| cs[0]).collect();
        let sin: Vec<f32> = table.iter().map(|cs| cs[1]).collect();
        let cols = qkv.cols;
        let positions = &batch.positions;
        qkv.data
            .par_chunks_mut(cols)
            .zip(positions.par_iter())
            .for_each(|(row, &p)| {
                let (c, s) = (
                    &cos[p as usize * half..][..half],
                    &sin[p as usize * half..][..half],
                );
                // Q and K blocks, every head: (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin).
                for head in row[..2 * h].chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * c[i] - b * s[i];
                        x2[i] = b * c[i] + a * s[i];
                    }
                }
            });
        Ok(qkv)
    }

    fn geglu(&self, x: &CpuTensor, act: Activation) -> Result<CpuTensor> {
        let inter = super::geglu_width(x.cols)?;
        let mut out = vec![0f32; x.rows * inter];
        let rows = rows_per_task(x.rows, x.cols);
        out.par_chunks_mut(rows * inter)
            .zip(x.data.par_chunks(rows * x.cols))
            .for_each(|(o, xr)| math::geglu_rows(xr, o, inter, act.code()));
        Ok(CpuTensor::new(out, x.rows, inter))
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        batch: &CpuBatch,
        heads: usize,
        window: Option<usize>,
    ) -> Result<CpuTensor> {
        ensure!(
            window != Some(0),
            "attention: a sliding window must be at least 1 token"
        );
        attention_op(qkv, batch, heads, window, None)
    }

    fn attention_disentangled(
        &self,
        qkv: &CpuTensor,
        batch: &CpuBatch,
        heads: usize,
        rel: &super::Disentangled<'_, CpuTensor>,
    ) -> Result<CpuTensor> {
        super::disentangled_shape((qkv.rows, qkv.cols), batch.ids.len(), heads, rel, |t| {
            (t.rows, t.cols)
        })?;
        attention_op(qkv, batch, heads, None, Some(rel))
    }

    fn pool(&self, x: &CpuTensor, batch: &CpuBatch, mode: Pooling) -> Result<CpuTensor> {
        let h = x.cols;
        let n = batch.n_seqs();
        let w = mode.width(h);
        let mut out = vec![0f32; n * w];
        out.par_chunks_mut(w).enumerate().for_each(|(s, row)| {
            let seq = batch.seq(s);
            let (cls, mean) = match mode {
                Pooling::Cls => (Some(&mut row[..]), None),
                Pooling::Mean => (None, Some(&mut row[..])),
                Pooling::ClsAndMean => {
                    let (c, m) = row.split_at_mut(h);
                    (Some(c), Some(m))
                }
            };
            if let Some(cls) = cls {
                cls.copy_from_slice(&x.data[seq.start * h..(seq.start + 1) * h]);
            }
            if let Some(mean) = mean {
                for t in seq.clone() {
                    mean.iter_mut()
                        .zip(&x.data[t * h..(t + 1) * h])
                        .for_each(|(a, v)| *a += v);
                }
                let inv = 1.0 / seq.len() as f32;
                mean.iter_mut().for_each(|a| *a *= inv);
            }
        });
        Ok(CpuTensor::new(out, n, w))
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.values().into_owned())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// Multi-head attention over every (sequence, head), optionally windowed or disentangled.
fn attention_op(
    qkv: &CpuTensor,
    batch: &CpuBatch,
    heads: usize,
    window: Option<usize>,
    rel: Option<&super::Disentangled<'_, CpuTensor>>,
) -> Result<CpuTensor> {
    let (h, d) = super::qkv_shape("attention", qkv.rows, qkv.cols, batch.ids.len(), heads)?;
    let factor = rel.map_or(1, |r| r.scale_factor.max(1));
    let mut out = uninit(qkv.rows * h);
    let out_ptr = SharedMut(out.as_mut_ptr() as *mut f32);
    let tasks: Vec<(usize, usize)> = (0..batch.n_seqs())
        .flat_map(|s| (0..heads).map(move |hd| (s, hd)))
        .collect();
    tasks
        .into_par_iter()
        .for_each_init(attention::Scratch::default, |scratch, (s, hd)| {
            let seq = batch.seq(s);
            let view = attention::HeadView {
                qkv: &qkv.data[seq.start * 3 * h..seq.end * 3 * h],
                stride: 3 * h,
                col: hd * d,
                h,
                d,
                len: seq.len(),
                scale: 1.0 / ((d * factor) as f32).sqrt(),
                window,
                rel: rel.map(|r| attention::RelView {
                    pos_key: r.pos_key.map(|t| &t.data[..]),
                    pos_query: r.pos_query.map(|t| &t.data[..]),
                    span: r.span,
                    buckets: r.buckets,
                    max_relative: r.max_relative,
                }),
            };
            attention::attend(&view, scratch, |row, values| {
                let offset = (seq.start + row) * h + hd * d;
                // SAFETY: row `row`, head `hd`'s columns: this task's alone, inside `out` [T, H].
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(offset), d) };
                attention::copy_head(dst, values);
            });
        });
    // SAFETY: the tasks cover every (sequence, head) and `attend` hands back every row of its
    // sequence, so each of the T×H outputs was written once.
    let out = unsafe { assume_init(out) };
    Ok(CpuTensor::new(out, qkv.rows, h))
}

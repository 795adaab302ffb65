//! The CPU backend: the readable reference, and fast enough to be useful.
//!
//! f32 throughout. GEMMs go through the `gemm` crate (packed, runtime-dispatched AVX2/AVX-512/NEON
//! micro-kernels, rayon-parallel); the bias and activation epilogue runs over the output rows while
//! they are still in cache; attention runs one task per (sequence, head) over the ragged batch, with
//! query rows in blocks so the score matrix stays small and sliding windows only touch the keys
//! they need. Element-wise math is in `math.rs`.

pub mod math;

use anyhow::{bail, ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, Pooling};

/// Rows of queries processed together in attention: bounds the score buffer to `QBLOCK × keys`.
const QBLOCK: usize = 256;

/// A row-major f32 matrix in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(data.len(), rows * cols, "tensor data does not match its shape");
        CpuTensor { data, rows, cols }
    }
}

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
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Which vector extensions the element-wise kernels use on this machine.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
        "sse2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    "baseline"
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

/// Rows of `out` per rayon task in element-wise passes: big enough to amortise scheduling.
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let target = 16 * 1024 / cols.max(1);
    target.clamp(1, rows.max(1))
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Batch = CpuBatch;

    fn name(&self) -> String {
        format!("cpu ({} threads, {})", rayon::current_num_threads(), simd_level())
    }

    fn weight(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CpuTensor> {
        ensure!(data.len() == rows * cols, "weight has {} values, expected {rows}x{cols}", data.len());
        Ok(CpuTensor { data, rows, cols })
    }

    fn upload_batch(&self, batch: &Batch, vocab: usize, max_positions: usize) -> Result<CpuBatch> {
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is out of range for the model's vocabulary of {vocab}");
        }
        if batch.max_seqlen > max_positions {
            bail!(
                "a sequence of {} tokens exceeds the model's {max_positions} positions",
                batch.max_seqlen
            );
        }
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
        out.par_chunks_mut(chunk * h).enumerate().for_each(|(c, rows)| {
            for (r, row) in rows.chunks_exact_mut(h).enumerate() {
                let tok = c * chunk + r;
                let id = batch.ids[tok] as usize;
                row.copy_from_slice(&t.word.data[id * h..(id + 1) * h]);
                if let Some(pos) = &t.position {
                    let p = batch.positions[tok] as usize;
                    row.iter_mut().zip(&pos.data[p * h..(p + 1) * h]).for_each(|(v, e)| *v += e);
                }
                if let Some(tt) = &t.token_type {
                    row.iter_mut().zip(&tt.data).for_each(|(v, e)| *v += e);
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
        let (m, k, n) = (x.rows, x.cols, w.rows);
        ensure!(w.cols == k, "linear: input has {k} columns but weight is [{n}, {}]", w.cols);
        if let Some(b) = b {
            ensure!(b.data.len() == n, "linear: bias has {} values, expected {n}", b.data.len());
        }
        let mut out = vec![0f32; m * n];
        if m > 0 {
            // SAFETY: out is [m, n] (row stride n), x is [m, k] (row stride k), and wᵀ is read as a
            // [k, n] matrix from w's [n, k] storage: element (p, j) at w[j*k + p], so the column
            // stride is k and the row stride 1. All pointers are valid for those extents.
            unsafe {
                gemm::gemm(
                    m, n, k,
                    out.as_mut_ptr(), 1, n as isize,
                    false,
                    x.data.as_ptr(), 1, k as isize,
                    w.data.as_ptr(), k as isize, 1,
                    0.0, 1.0,
                    false, false, false,
                    par(),
                );
            }
        }
        let kind = match act {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
            Activation::Silu => 4,
            Activation::Tanh => 5,
        };
        let bias = b.map(|b| &b.data[..]).unwrap_or(&[]);
        if kind != 0 || !bias.is_empty() {
            let chunk = rows_per_task(m, n);
            out.par_chunks_mut(chunk * n).for_each(|rows| math::bias_act_rows(rows, bias, n, kind));
        }
        Ok(CpuTensor::new(out, m, n))
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
            x.rows, x.cols, residual.rows, residual.cols, weight.data.len()
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

    fn attention(
        &self,
        qkv: &CpuTensor,
        batch: &CpuBatch,
        heads: usize,
        window: Option<usize>,
    ) -> Result<CpuTensor> {
        ensure!(qkv.cols % 3 == 0 && heads > 0, "attention: qkv has {} columns", qkv.cols);
        let h = qkv.cols / 3;
        ensure!(h % heads == 0, "attention: hidden {h} not divisible by {heads} heads");
        ensure!(qkv.rows == batch.ids.len(), "attention: qkv rows do not match the batch");
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; qkv.rows * h];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let tasks: Vec<(usize, usize)> =
            (0..batch.n_seqs()).flat_map(|s| (0..heads).map(move |hd| (s, hd))).collect();
        let stride = 3 * h;
        tasks.into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, (s, hd)| {
            let seq = batch.seq(s);
            let len = seq.len();
            let base = seq.start * stride + hd * d;
            let q = qkv.data[base..].as_ptr();
            let k = qkv.data[base + h..].as_ptr();
            let v = qkv.data[base + 2 * h..].as_ptr();
            for q0 in (0..len).step_by(QBLOCK) {
                let rows = QBLOCK.min(len - q0);
                // Keys this block of queries may see.
                let (k0, k1) = match window {
                    Some(w) => (q0.saturating_sub(w / 2), (q0 + rows + w / 2).min(len)),
                    None => (0, len),
                };
                let keys = k1 - k0;
                scores.resize(rows * keys, 0.0);
                // SAFETY: q/k/v point into qkv for this sequence and head; rows q0..q0+rows and
                // keys k0..k1 lie inside the sequence (row stride 3H, d contiguous columns).
                // scores is [rows, keys]. The output block (rows of this sequence, columns of this
                // head) is written by this task alone.
                unsafe {
                    let out = out_ptr;
                    // scores = scale · Q[q0..] · K[k0..k1]ᵀ
                    gemm::gemm(
                        rows, keys, d,
                        scores.as_mut_ptr(), 1, keys as isize,
                        false,
                        q.add(q0 * stride), 1, stride as isize,
                        k.add(k0 * stride), stride as isize, 1,
                        0.0, scale,
                        false, false, false,
                        Parallelism::None,
                    );
                    if let Some(w) = window {
                        for r in 0..rows {
                            let i = q0 + r;
                            for j in k0..k1 {
                                if i.abs_diff(j) > w / 2 {
                                    scores[r * keys + (j - k0)] = f32::NEG_INFINITY;
                                }
                            }
                        }
                    }
                    math::softmax_rows(scores, keys);
                    // out[q0..q0+rows, head] = P · V[k0..k1]
                    gemm::gemm(
                        rows, d, keys,
                        out.0.add((seq.start + q0) * h + hd * d), 1, h as isize,
                        false,
                        scores.as_ptr(), 1, keys as isize,
                        v.add(k0 * stride), 1, stride as isize,
                        0.0, 1.0,
                        false, false, false,
                        Parallelism::None,
                    );
                }
            }
        });
        Ok(CpuTensor::new(out, qkv.rows, h))
    }

    fn pool(&self, x: &CpuTensor, batch: &CpuBatch, mode: Pooling) -> Result<CpuTensor> {
        let h = x.cols;
        let n = batch.n_seqs();
        let mut out = vec![0f32; n * h];
        out.par_chunks_mut(h).enumerate().for_each(|(s, row)| {
            let seq = batch.seq(s);
            match mode {
                Pooling::Cls => row.copy_from_slice(&x.data[seq.start * h..(seq.start + 1) * h]),
                Pooling::Mean => {
                    for t in seq.clone() {
                        row.iter_mut().zip(&x.data[t * h..(t + 1) * h]).for_each(|(a, v)| *a += v);
                    }
                    let inv = 1.0 / seq.len() as f32;
                    row.iter_mut().for_each(|a| *a *= inv);
                }
            }
        });
        Ok(CpuTensor::new(out, n, h))
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

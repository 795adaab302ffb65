//! The CUDA backend's state on one device ([`KernelBackend`]: the device, rotary tables, graph
//! cache, test switches) and the helpers every op shares: allocation (from a graph recording's
//! arena while one is in progress), launches and GEMMs that a recording logs, LayerNorm and
//! epilogue kernels, kernel choice. The ops themselves are in `ops.rs`, graph recording and
//! replay in `graph/record.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use anyhow::{anyhow, bail, ensure, Result};

use super::gemm::Epilogue;
use super::graph::record::Recorded;
use super::graph::{GraphCache, Op, Recording};
use super::kernel_device::{DevTensor, Held, KernelDevice};
use super::kernels::{Storage, ATTENTION_HEAD_DIMS, ATTENTION_TC_HEAD_DIMS};
use super::launch::{
    stride_grid, warp_rows, Arg, Entry, Launch, MAX_ROW, QUERY_BLOCK, ROW_THREADS, STRIDE_THREADS,
    TC_THREADS, WARP_ROWS,
};
use crate::engine::Activation;

/// cos/sin tables per (theta bits, head size / 2): the memory, its address and the positions it
/// covers.
type RopeTables<M> = HashMap<(super::super::RotaryKey, usize), (Arc<M>, u64, usize)>;
/// DeBERTa's relative index tables per (span, buckets, max_relative): the memory, its address
/// and the sequence length it covers.
type RelativeTables<M> = HashMap<super::super::RelativeKey, (Arc<M>, u64, usize)>;
pub(super) struct Shared<D: KernelDevice> {
    pub(super) rope_tables: Mutex<RopeTables<D::Mem>>,
    pub(super) relative_tables: Mutex<RelativeTables<D::Mem>>,
    pub(super) poison: AtomicBool,
    pub(super) scalar_attention: AtomicBool,
    /// Batches of at most this many tokens run as CUDA graphs (0: never).
    pub(super) graph_tokens: AtomicUsize,
    /// Recordings in progress, by thread (`recorders` counts them, so the ops of a process
    /// that records nothing never take the lock).
    pub(super) recorders: AtomicUsize,
    pub(super) recordings: Mutex<HashMap<ThreadId, Recording<D::Mem>>>,
    pub(super) graphs: Mutex<GraphCache<Recorded<D>>>,
    pub(super) dev: D,
}

impl<D: KernelDevice> Drop for Shared<D> {
    fn drop(&mut self) {
        // The rope tables go before the device: nothing may still be running that reads them.
        let _ = self.dev.sync();
    }
}

/// The CUDA backend's ops on a device. Clones share the device.
pub struct KernelBackend<D: KernelDevice> {
    pub(super) shared: Arc<Shared<D>>,
}

impl<D: KernelDevice> Clone for KernelBackend<D> {
    fn clone(&self) -> Self {
        KernelBackend {
            shared: self.shared.clone(),
        }
    }
}

pub(super) type Tensor<D> = DevTensor<<D as KernelDevice>::Mem>;

/// `n` as the kernels' 32-bit int.
pub(super) fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| anyhow!("{what} ({n}) does not fit the kernels' 32-bit indices"))
}

impl<D: KernelDevice> KernelBackend<D> {
    /// The ops on `dev`. `MIRA_CUDA_ATTENTION=scalar` selects attention.cu even where
    /// attention_tc.cu has a kernel (to compare the two).
    pub fn on(dev: D) -> KernelBackend<D> {
        let scalar = std::env::var("MIRA_CUDA_ATTENTION").is_ok_and(|v| v == "scalar");
        KernelBackend {
            shared: Arc::new(Shared {
                rope_tables: Mutex::default(),
                relative_tables: Mutex::default(),
                poison: AtomicBool::new(false),
                scalar_attention: AtomicBool::new(scalar),
                graph_tokens: AtomicUsize::new(0),
                recorders: AtomicUsize::new(0),
                recordings: Mutex::default(),
                graphs: Mutex::new(GraphCache::default()),
                dev,
            }),
        }
    }

    pub fn device(&self) -> &D {
        &self.shared.dev
    }

    pub fn storage(&self) -> Storage {
        self.shared.dev.storage()
    }

    /// For tests: outputs are filled with NaN (all-ones bytes) before an op writes them, so a
    /// value an op forgets to write cannot pass as a stale right answer.
    pub fn set_poison(&self, on: bool) {
        self.shared.poison.store(on, Ordering::Relaxed);
    }

    /// Use attention.cu for every head size, also where attention_tc.cu has a kernel.
    pub fn set_scalar_attention(&self, on: bool) {
        self.shared.scalar_attention.store(on, Ordering::Relaxed);
    }

    pub(super) fn dev(&self) -> &D {
        &self.shared.dev
    }

    /// `f` on this thread's recording, if one is in progress.
    pub(super) fn with_recording<T>(
        &self,
        f: impl FnOnce(&mut Recording<D::Mem>) -> T,
    ) -> Option<T> {
        if self.shared.recorders.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut recordings = self.shared.recordings.lock().unwrap();
        recordings.get_mut(&std::thread::current().id()).map(f)
    }

    pub(super) fn gemm(
        &self,
        (x, w, bias, out): (u64, u64, Option<u64>, u64),
        mnk: (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()> {
        // SAFETY: callers pass tensors of the shapes `mnk` gives (checked by `linear`).
        unsafe { self.dev().gemm(x, w, bias, out, mnk, epilogue)? };
        self.with_recording(|r| {
            r.ops.push(Op::Gemm {
                x,
                w,
                bias,
                out,
                mnk,
                epilogue,
            })
        });
        Ok(())
    }

    /// Set `bytes` bytes of a tensor to `byte`.
    pub(super) fn memset(&self, t: &Tensor<D>, byte: u8, bytes: usize) -> Result<()> {
        ensure!(
            bytes <= (t.rows * t.cols * self.elem_bytes()).max(16),
            "memset beyond a tensor"
        );
        // SAFETY: within the tensor's allocation (checked above).
        unsafe { self.dev().memset(t.ptr, byte, bytes)? };
        self.with_recording(|r| {
            r.ops.push(Op::Memset {
                ptr: t.ptr,
                byte,
                bytes,
            })
        });
        Ok(())
    }

    pub(super) fn elem_bytes(&self) -> usize {
        self.storage().bytes()
    }

    pub(super) fn launch(&self, launch: Launch, what: &str) -> Result<()> {
        // SAFETY: each caller builds `launch` from tensors and batches of checked shapes.
        unsafe { self.dev().launch(&launch) }.map_err(|e| anyhow!("{what}: {e:#}"))?;
        self.with_recording(|r| r.ops.push(Op::Launch(launch)));
        Ok(())
    }

    /// A new `[rows, cols]` tensor (NaN bytes in poison mode).
    pub(super) fn output(&self, rows: usize, cols: usize, what: &str) -> Result<Tensor<D>> {
        // At least 16 bytes: a zero-size tensor still has a distinct, aligned address.
        let bytes = (rows * cols * self.elem_bytes()).max(16);
        let alloc = |bytes| {
            self.dev()
                .alloc(bytes, what)
                .map_err(|e| anyhow!("cannot allocate {what} ([{rows}, {cols}]): {e:#}"))
        };
        let (mem, ptr) = match self.with_recording(|r| r.arena.clone()) {
            Some(arena) => {
                let (lease, ptr) = arena.take(bytes, alloc)?;
                (Held::Arena(lease), ptr)
            }
            None => {
                let (mem, ptr) = alloc(bytes)?;
                (Held::Own(mem), ptr)
            }
        };
        let t = DevTensor {
            mem,
            ptr,
            rows,
            cols,
        };
        if self.shared.poison.load(Ordering::Relaxed) {
            self.memset(&t, 0xff, bytes)?;
        }
        Ok(t)
    }

    pub(super) fn rope_table(
        &self,
        rotary: super::super::Rotary,
        half: usize,
        positions: usize,
    ) -> Result<(Arc<D::Mem>, u64)> {
        let key = (rotary.key(), half);
        let mut tables = self.shared.rope_tables.lock().unwrap();
        if let Some((mem, ptr, covered)) = tables.get(&key) {
            if *covered >= positions {
                return Ok((mem.clone(), *ptr));
            }
        }
        // Grown to a power of two so a longer batch rarely rebuilds it.
        let covered = positions.next_power_of_two();
        let table: Vec<u8> = super::super::rotary_table(rotary, half, covered)
            .into_iter()
            .flatten()
            .flat_map(f32::to_le_bytes)
            .collect();
        let (mem, ptr) = self.dev().upload(&table, "rotary table")?;
        let mem = Arc::new(mem);
        tables.insert(key, (mem.clone(), ptr, covered));
        Ok((mem, ptr))
    }

    /// `relative_index_table` for (span, buckets, max_relative) covering sequences of `len`
    /// tokens (grown to a power of two): the memory, its address and the length it covers.
    pub(super) fn relative_table(
        &self,
        key: super::super::RelativeKey,
        len: usize,
    ) -> Result<(Arc<D::Mem>, u64, usize)> {
        let mut tables = self.shared.relative_tables.lock().unwrap();
        if let Some((mem, ptr, covered)) = tables.get(&key) {
            if *covered >= len {
                return Ok((mem.clone(), *ptr, *covered));
            }
        }
        let covered = len.max(1).next_power_of_two();
        let (span, buckets, max_relative) = key;
        let table: Vec<u8> =
            super::super::relative_index_table(covered, span, buckets, max_relative)
                .into_iter()
                .flat_map(u32::to_le_bytes)
                .collect();
        let (mem, ptr) = self.dev().upload(&table, "relative index table")?;
        let mem = Arc::new(mem);
        tables.insert(key, (mem.clone(), ptr, covered));
        Ok((mem, ptr, covered))
    }

    /// layernorm.cu's `layernorm` in `mode` (0 post-norm in place, 1 pre-norm step, 2 plain).
    pub(super) fn layernorm_op(
        &self,
        mode: i32,
        x: &Tensor<D>,
        residual: Option<&Tensor<D>>,
        norm: (&Tensor<D>, Option<&Tensor<D>>, f32),
        out: Option<&Tensor<D>>,
    ) -> Result<()> {
        let (weight, bias, eps) = norm;
        let (rows, cols) = (x.rows, x.cols);
        super::super::norm_shape(
            (rows, cols),
            weight.rows * weight.cols,
            bias.map(|b| b.rows * b.cols),
            residual.map(|r| (r.rows, r.cols)),
            MAX_ROW,
        )?;
        if rows == 0 {
            return Ok(());
        }
        let ptr = |t: Option<&Tensor<D>>| Arg::Ptr(t.map_or(0, |t| t.ptr));
        let (entry, grid) = self.row_kernel(Entry::LayerNormWarp, Entry::LayerNorm, rows, cols);
        let launch = Launch {
            entry,
            grid,
            block: ROW_THREADS,
            args: vec![
                Arg::Ptr(x.ptr),
                ptr(residual),
                Arg::Ptr(weight.ptr),
                ptr(bias),
                ptr(out),
                Arg::I32(int(rows, "rows")?),
                Arg::I32(cols as i32),
                Arg::F32(eps),
                Arg::I32(mode),
            ],
        };
        self.launch(launch, "layernorm")
    }

    /// A LayerNorm kernel for `rows` rows of `cols` values and its grid: one warp per row where
    /// the row fits (`warp`), else one block per row (`block`). Both take 256-thread blocks.
    pub(super) fn row_kernel(
        &self,
        warp: Entry,
        block: Entry,
        rows: usize,
        cols: usize,
    ) -> (Entry, (u32, u32, u32)) {
        if warp_rows(cols, self.storage()) {
            (warp, (rows.div_ceil(WARP_ROWS) as u32, 1, 1))
        } else {
            (block, (rows as u32, 1, 1))
        }
    }

    /// `x = act(x + bias)` in place (our exact epilogue after a cuBLASLt product).
    pub(super) fn bias_act(&self, x: &Tensor<D>, bias: Option<u64>, act: Activation) -> Result<()> {
        // The kernel moves 16 bytes at a time (every allocation is aligned so).
        ensure!(
            x.ptr.is_multiple_of(16),
            "bias_act: the tensor is not 16-byte aligned"
        );
        let launch = Launch {
            entry: Entry::BiasAct,
            grid: stride_grid(x.rows * x.cols, self.dev().multiprocessors()),
            block: STRIDE_THREADS,
            args: vec![
                Arg::Ptr(x.ptr),
                Arg::Ptr(bias.unwrap_or(0)),
                Arg::I32(int(x.rows, "rows")?),
                Arg::I32(int(x.cols, "columns")?),
                Arg::I32(i32::from(act.code())),
            ],
        };
        self.launch(launch, "bias_act")
    }

    /// The attention kernel for head size `d`: tensor cores where attention_tc.cu has one
    /// (bf16/f16 storage, sm_80 and newer), unless scalar attention was asked for.
    pub(super) fn attention_entry(&self, d: usize) -> Result<(Entry, u32)> {
        let tc = self.storage() != Storage::F32
            && ATTENTION_TC_HEAD_DIMS.contains(&d)
            && self.dev().tensor_core_attention()
            && !self.shared.scalar_attention.load(Ordering::Relaxed);
        if tc {
            Ok((Entry::AttentionTc(d), TC_THREADS))
        } else if ATTENTION_HEAD_DIMS.contains(&d) {
            Ok((Entry::Attention(d), QUERY_BLOCK as u32))
        } else {
            bail!(
                "attention: head size {d} has no CUDA kernel (supported: {ATTENTION_HEAD_DIMS:?})"
            )
        }
    }
}

//! The CUDA backend's ops, written once over [`KernelDevice`]: what they need from a device is
//! memory, kernel launches ([`Launch`]) and GEMMs. The GPU ([`super::Gpu`]: cudarc, our kernels,
//! cuBLASLt) is one such device; the tests' CPU emulation of `kernels/*.cu` is another, so every
//! line here (shape checks, argument order, grid sizes, kernel choice, batch layout) also runs,
//! and is checked against the CPU backend, on a machine without a GPU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use anyhow::{anyhow, bail, ensure, Result};

use super::gemm::Epilogue;
use super::graph::{Arena, ArenaLease, GraphCache, GraphStats, Op, Plan, Recording, Shape};
use super::kernels::{Storage, ATTENTION_HEAD_DIMS, ATTENTION_TC_HEAD_DIMS};
use super::launch::{
    attention_blocks, stride_grid, warp_rows, Arg, Entry, Launch, MAX_ROW, QUERY_BLOCK,
    ROW_THREADS, STRIDE_THREADS, TC_THREADS, WARP_ROWS,
};
use crate::engine::backend::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, Pooling};

/// What the ops need from a device. Addresses are the device's (`u64`); a `Mem` owns the
/// allocation an address points into, and frees it when dropped (ordered after the work that
/// reads it).
pub trait KernelDevice: Send + Sync + 'static {
    /// Owns one allocation.
    type Mem: Send + Sync;
    /// Owns a batch's uploaded index data until the batch is dropped.
    type BatchMem: Send + Sync;
    /// A replayable graph of recorded ops (see `graph.rs`); one thread uses it at a time.
    type Graph: Send;

    /// Human-readable description (`cuda:0 (NVIDIA H100, sm_90, f16 storage)`).
    fn describe(&self) -> String;
    fn storage(&self) -> Storage;
    /// Streaming multiprocessors (sizes grid-stride launches).
    fn multiprocessors(&self) -> u32;
    /// `bytes` uninitialised bytes (`what` names them in errors).
    fn alloc(&self, bytes: usize, what: &str) -> Result<(Self::Mem, u64)>;
    /// Set `bytes` bytes at `ptr` to `byte`, in order with the ops.
    ///
    /// # Safety
    /// `ptr` addresses at least `bytes` bytes of this device's memory.
    unsafe fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()>;
    /// A copy of `bytes` on the device.
    fn upload(&self, bytes: &[u8], what: &str) -> Result<(Self::Mem, u64)>;
    /// A batch's index data, `n` u32 values that `fill` writes, on the device. Returns the
    /// address of the first value.
    fn upload_batch(
        &self,
        n: usize,
        fill: &mut dyn FnMut(&mut [u32]),
    ) -> Result<(Self::BatchMem, u64)>;
    /// Enqueue a kernel launch.
    ///
    /// # Safety
    /// The arguments address live memory of the sizes the kernel reads and writes.
    unsafe fn launch(&self, launch: &Launch) -> Result<()>;
    /// `out[m, n] = epilogue(x[m, k] · w[n, k]ᵀ (+ bias[n]))`, k ≥ 1.
    ///
    /// # Safety
    /// The pointers address live tensors of those shapes.
    unsafe fn gemm(
        &self,
        x: u64,
        w: u64,
        bias: Option<u64>,
        out: u64,
        mnk: (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()>;
    /// `bytes` bytes at `ptr`, after every op enqueued before.
    ///
    /// # Safety
    /// `ptr` addresses at least `bytes` bytes of this device's memory.
    unsafe fn download(&self, ptr: u64, bytes: usize) -> Result<Vec<u8>>;
    /// Copy `bytes` bytes from `src` to `dst` on the device, in order with the ops.
    ///
    /// # Safety
    /// Both address at least `bytes` bytes of this device's memory.
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// `ops` captured, in order, as a graph to launch later; nothing runs now.
    ///
    /// # Safety
    /// Every address the ops use stays valid as long as the graph may be launched.
    unsafe fn graph(&self, ops: &[Op]) -> Result<Self::Graph>;
    /// Enqueue `graph`, in order with the ops.
    ///
    /// # Safety
    /// The memory the graph's ops address is alive.
    unsafe fn launch_graph(&self, graph: &Self::Graph) -> Result<()>;
    /// Wait for every op enqueued so far.
    fn sync(&self) -> Result<()>;
    /// Threads that may drive this device at once (see `Backend::concurrency`).
    fn concurrency(&self) -> usize;
}

/// A row-major matrix in device memory, freed when dropped.
pub struct DevTensor<M: Send + Sync> {
    /// Owns the allocation `ptr` addresses.
    #[allow(dead_code)]
    mem: Held<M>,
    ptr: u64,
    rows: usize,
    cols: usize,
}

/// A tensor's memory: its own allocation, or a buffer of a graph recording's arena.
enum Held<M: Send + Sync> {
    Own(#[allow(dead_code)] M),
    Arena(#[allow(dead_code)] ArenaLease<M>),
}

impl<M: Send + Sync> DevTensor<M> {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A batch's index data on the device, one array of u32: `[ids | positions | cu_seqlens | pad to
/// even | blocks]`; blocks are (sequence, first query) pairs that never cross a sequence, read
/// as `uint2`.
pub struct DevBatch<B> {
    /// Owns the upload (`None` for a graph's copy, which the graph owns).
    #[allow(dead_code)]
    mem: Option<B>,
    /// The first value and the number of values.
    base: u64,
    words: usize,
    ids: u64,
    positions: u64,
    cu_seqlens: u64,
    blocks: u64,
    n_tokens: usize,
    n_seqs: usize,
    n_blocks: usize,
    max_position: usize,
}

/// cos/sin tables per (theta bits, head size / 2): the memory, its address and the positions it
/// covers.
type RopeTables<M> = HashMap<(u32, usize), (Arc<M>, u64, usize)>;

/// A recorded forward pass: its graph and everything the graph's ops address. Fields drop in
/// order: the graph before the memory it uses.
struct Recorded<D: KernelDevice> {
    graph: D::Graph,
    /// The pass's output, downloaded after each launch.
    output: Tensor<D>,
    /// The graph's own copy of the batch index data (each replay copies its batch here).
    #[allow(dead_code)]
    batch: D::Mem,
    batch_ptr: u64,
    batch_words: usize,
    #[allow(dead_code)]
    keep: Vec<Arc<D::Mem>>,
    arena: Arc<Arena<D::Mem>>,
}

struct Shared<D: KernelDevice> {
    rope_tables: Mutex<RopeTables<D::Mem>>,
    poison: AtomicBool,
    scalar_attention: AtomicBool,
    /// Batches of at most this many tokens run as CUDA graphs (0: never).
    graph_tokens: AtomicUsize,
    /// Recordings in progress, by thread (`recorders` counts them, so the ops of a process
    /// that records nothing never take the lock).
    recorders: AtomicUsize,
    recordings: Mutex<HashMap<ThreadId, Recording<D::Mem>>>,
    graphs: Mutex<GraphCache<Recorded<D>>>,
    dev: D,
}

impl<D: KernelDevice> Drop for Shared<D> {
    fn drop(&mut self) {
        // The rope tables go before the device: nothing may still be running that reads them.
        let _ = self.dev.sync();
    }
}

/// The CUDA backend's ops on a device. Clones share the device.
pub struct KernelBackend<D: KernelDevice> {
    shared: Arc<Shared<D>>,
}

impl<D: KernelDevice> Clone for KernelBackend<D> {
    fn clone(&self) -> Self {
        KernelBackend {
            shared: self.shared.clone(),
        }
    }
}

type Tensor<D> = DevTensor<<D as KernelDevice>::Mem>;
/// A forward pass over an uploaded batch, returning its output tensor.
type Forward<'a, D> = dyn Fn(&DevBatch<<D as KernelDevice>::BatchMem>) -> Result<Tensor<D>> + 'a;

/// Removes this thread's recording when dropped (also if the forward pass panics).
struct RecordingGuard<'a, D: KernelDevice> {
    shared: &'a Shared<D>,
    id: ThreadId,
}

impl<D: KernelDevice> RecordingGuard<'_, D> {
    fn finish(self) -> Option<Recording<D::Mem>> {
        let rec = self.shared.recordings.lock().unwrap().remove(&self.id);
        self.shared.recorders.fetch_sub(1, Ordering::AcqRel);
        std::mem::forget(self);
        rec
    }
}

impl<D: KernelDevice> Drop for RecordingGuard<'_, D> {
    fn drop(&mut self) {
        self.shared.recordings.lock().unwrap().remove(&self.id);
        self.shared.recorders.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `n` as the kernels' 32-bit int.
fn int(n: usize, what: &str) -> Result<i32> {
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

    /// Run batches of at most `tokens` tokens as CUDA graphs (0, the default, turns graphs
    /// off); see `graph.rs`.
    pub fn set_graph_tokens(&self, tokens: usize) {
        self.shared.graph_tokens.store(tokens, Ordering::Relaxed);
    }

    /// How often graphs were recorded and replayed, and batches run op by op.
    pub fn graph_stats(&self) -> GraphStats {
        self.shared.graphs.lock().unwrap().stats
    }

    /// Graphs held now, and the arena buffers and bytes they keep.
    pub fn graph_footprint(&self) -> (usize, usize, usize) {
        let graphs = self.shared.graphs.lock().unwrap();
        let mut held = (graphs.graphs(), 0, 0);
        graphs.for_each(|r| {
            let (bufs, bytes) = r.arena.footprint();
            held.1 += bufs;
            held.2 += bytes;
        });
        held
    }

    fn dev(&self) -> &D {
        &self.shared.dev
    }

    /// `f` on this thread's recording, if one is in progress.
    fn with_recording<T>(&self, f: impl FnOnce(&mut Recording<D::Mem>) -> T) -> Option<T> {
        if self.shared.recorders.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut recordings = self.shared.recordings.lock().unwrap();
        recordings.get_mut(&std::thread::current().id()).map(f)
    }

    fn gemm(
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
    fn memset(&self, t: &Tensor<D>, byte: u8, bytes: usize) -> Result<()> {
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

    /// The forward pass `forward` on the uploaded batch `b`, recorded: its ops run as usual
    /// and are logged, its activations come from an arena the recording keeps, and the log is
    /// captured as a graph. Returns the graph and the pass's output, downloaded. A graph the
    /// device cannot capture turns graphs off for this backend, with a warning, and the pass's
    /// output is returned without one: graphs are a speed-up, never a reason to fail a batch.
    fn record(
        &self,
        b: &DevBatch<D::BatchMem>,
        forward: &Forward<'_, D>,
    ) -> Result<(Option<Recorded<D>>, Vec<f32>)> {
        // The graph reads its own copy of the index data, at a fixed address.
        let bytes = 4 * b.words;
        let (batch, batch_ptr) = self.dev().alloc(bytes.max(16), "graph batch")?;
        // SAFETY: both hold `bytes` bytes.
        unsafe { self.dev().copy(batch_ptr, b.base, bytes)? };
        let at = |p: u64| batch_ptr + (p - b.base);
        let gb = DevBatch {
            mem: None,
            base: batch_ptr,
            words: b.words,
            ids: at(b.ids),
            positions: at(b.positions),
            cu_seqlens: at(b.cu_seqlens),
            blocks: at(b.blocks),
            n_tokens: b.n_tokens,
            n_seqs: b.n_seqs,
            n_blocks: b.n_blocks,
            max_position: b.max_position,
        };
        let arena = Arena::new();
        let id = std::thread::current().id();
        self.shared.recordings.lock().unwrap().insert(
            id,
            Recording {
                ops: Vec::new(),
                arena: arena.clone(),
                keep: Vec::new(),
            },
        );
        self.shared.recorders.fetch_add(1, Ordering::AcqRel);
        let guard = RecordingGuard {
            shared: &self.shared,
            id,
        };
        let output = forward(&gb);
        let rec = guard.finish().expect("this thread's recording");
        let output = output?;
        let values = self.download(&output)?;
        // SAFETY: the graph keeps the arena, the batch copy and the tables its ops address
        // (weights live as long as the model that launches it).
        let graph = match unsafe { self.dev().graph(&rec.ops) } {
            Ok(graph) => graph,
            Err(e) => {
                self.set_graph_tokens(0);
                eprintln!(
                    "mira: CUDA graphs turned off on {}: {e:#}; batches run kernel by kernel",
                    self.dev().describe()
                );
                return Ok((None, values));
            }
        };
        let recorded = Recorded {
            graph,
            output,
            batch,
            batch_ptr,
            batch_words: b.words,
            keep: rec.keep,
            arena,
        };
        Ok((Some(recorded), values))
    }

    /// `r`'s graph on the batch `b` (of the shape it was recorded for): `b`'s index data is
    /// copied into the graph's batch buffer, the graph launched and its output downloaded.
    fn replay(&self, r: &Recorded<D>, b: &DevBatch<D::BatchMem>) -> Result<Vec<f32>> {
        ensure!(
            b.words == r.batch_words,
            "graph replay: the batch has {} index values, the graph {}",
            b.words,
            r.batch_words
        );
        // SAFETY: both buffers hold `words` u32 values; the graph's memory lives in `r`.
        unsafe {
            self.dev().copy(r.batch_ptr, b.base, 4 * b.words)?;
            self.dev().launch_graph(&r.graph)?;
        }
        self.download(&r.output)
    }

    fn elem_bytes(&self) -> usize {
        self.storage().bytes()
    }

    fn launch(&self, launch: Launch, what: &str) -> Result<()> {
        // SAFETY: each caller builds `launch` from tensors and batches of checked shapes.
        unsafe { self.dev().launch(&launch) }.map_err(|e| anyhow!("{what}: {e:#}"))?;
        self.with_recording(|r| r.ops.push(Op::Launch(launch)));
        Ok(())
    }

    /// A new `[rows, cols]` tensor (NaN bytes in poison mode).
    fn output(&self, rows: usize, cols: usize, what: &str) -> Result<Tensor<D>> {
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

    fn rope_table(&self, theta: f32, half: usize, positions: usize) -> Result<(Arc<D::Mem>, u64)> {
        let key = (theta.to_bits(), half);
        let mut tables = self.shared.rope_tables.lock().unwrap();
        if let Some((mem, ptr, covered)) = tables.get(&key) {
            if *covered >= positions {
                return Ok((mem.clone(), *ptr));
            }
        }
        // Grown to a power of two so a longer batch rarely rebuilds it.
        let covered = positions.next_power_of_two();
        let table: Vec<u8> = super::super::rotary_table(theta, half, covered)
            .into_iter()
            .flatten()
            .flat_map(f32::to_le_bytes)
            .collect();
        let (mem, ptr) = self.dev().upload(&table, "rotary table")?;
        let mem = Arc::new(mem);
        tables.insert(key, (mem.clone(), ptr, covered));
        Ok((mem, ptr))
    }

    /// layernorm.cu's `layernorm` in `mode` (0 post-norm in place, 1 pre-norm step, 2 plain).
    fn layernorm_op(
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
    fn row_kernel(
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
    fn bias_act(&self, x: &Tensor<D>, bias: Option<u64>, act: Activation) -> Result<()> {
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
    /// (bf16/f16 storage), unless scalar attention was asked for.
    fn attention_entry(&self, d: usize) -> Result<(Entry, u32)> {
        let tc = self.storage() != Storage::F32
            && ATTENTION_TC_HEAD_DIMS.contains(&d)
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

impl<D: KernelDevice> Backend for KernelBackend<D> {
    type Tensor = DevTensor<D::Mem>;
    type Batch = DevBatch<D::BatchMem>;

    fn name(&self) -> String {
        self.dev().describe()
    }

    fn weight(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor<D>> {
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
        theta: f32,
    ) -> Result<Tensor<D>> {
        let (h, d) = super::super::qkv_shape("rope", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(d.is_multiple_of(2), "rope: head size {d} must be even");
        if qkv.rows == 0 {
            return Ok(qkv);
        }
        let half = d / 2;
        // The table covers every position of the batch; it lives in the rope tables.
        let (table, table_ptr) = self.rope_table(theta, half, batch.max_position)?;
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
            args: vec![
                Arg::Ptr(qkv.ptr),
                Arg::Ptr(batch.blocks),
                Arg::Ptr(batch.cu_seqlens),
                Arg::Ptr(out.ptr),
                Arg::I32(int(h, "hidden")?),
                Arg::I32(int(batch.n_blocks, "attention blocks")?),
                Arg::I32(half_window),
                Arg::F32(1.0 / (d as f32).sqrt()),
            ],
        };
        // (blocks lie within their sequences, which lie within qkv's rows.)
        self.launch(launch, "attention")?;
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
        let out = self.output(batch.n_seqs, x.cols, "pooled")?;
        if batch.n_seqs * x.cols == 0 {
            return Ok(out);
        }
        let mode: i32 = match mode {
            Pooling::Cls => 0,
            Pooling::Mean => 1,
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
        let limit = self.shared.graph_tokens.load(Ordering::Relaxed);
        if b.n_tokens == 0 || b.n_tokens > limit {
            return self.download(&forward(&b)?);
        }
        let shape = Shape {
            kind: kind.to_string(),
            tokens: b.n_tokens,
            seqs: b.n_seqs,
            blocks: b.n_blocks,
            positions: b.max_position.next_power_of_two(),
            poison: self.shared.poison.load(Ordering::Relaxed),
            scalar_attention: self.shared.scalar_attention.load(Ordering::Relaxed),
        };
        let plan = self.shared.graphs.lock().unwrap().plan(&shape);
        match plan {
            Plan::Direct => self.download(&forward(&b)?),
            Plan::Replay { graph, generation } => {
                let values = self.replay(&graph, &b);
                let mut graphs = self.shared.graphs.lock().unwrap();
                graphs.give_back(&shape, generation, graph, None);
                values
            }
            Plan::Record { generation } => match self.record(&b, forward) {
                Ok((None, values)) => {
                    self.shared
                        .graphs
                        .lock()
                        .unwrap()
                        .abandon(&shape, generation);
                    Ok(values)
                }
                Ok((Some(graph), values)) => {
                    let bytes = graph.arena.footprint().1;
                    let mut graphs = self.shared.graphs.lock().unwrap();
                    graphs.give_back(&shape, generation, graph, Some(bytes));
                    Ok(values)
                }
                Err(e) => {
                    self.shared
                        .graphs
                        .lock()
                        .unwrap()
                        .abandon(&shape, generation);
                    Err(e)
                }
            },
        }
    }

    fn sync(&self) -> Result<()> {
        self.dev().sync()
    }
}

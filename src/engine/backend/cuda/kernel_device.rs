//! What the CUDA backend's ops need from a device ([`KernelDevice`]: memory, kernel launches,
//! GEMMs, graph capture) and the tensor and batch types they hold on it. The GPU
//! ([`super::gpu::Gpu`]) is one such device; the tests' CPU emulation of `kernels/*.cu` is another.

use anyhow::Result;

use super::gemm::Epilogue;
use super::graph::{ArenaLease, Op};
use super::kernels::Storage;
use super::launch::Launch;

/// What the ops need from a device. Addresses are the device's (`u64`); a `Mem` owns the
/// allocation an address points into, and frees it when dropped (ordered after the work that
/// reads it).
pub trait KernelDevice: Send + Sync + 'static {
    /// Owns one allocation.
    type Mem: Send + Sync;
    /// Owns a batch's uploaded index data until the batch is dropped.
    type BatchMem: Send + Sync;
    /// A replayable graph of recorded ops (see `graph/mod.rs`); one thread uses it at a time.
    type Graph: Send;

    /// Human-readable description (`cuda:0 (NVIDIA H100, sm_90, f16 storage)`).
    fn describe(&self) -> String;
    fn storage(&self) -> Storage;
    /// Streaming multiprocessors (sizes grid-stride launches).
    fn multiprocessors(&self) -> u32;
    /// Whether attention_tc.cu's kernels are loaded (they need sm_80: `mma.sync.m16n8k16`,
    /// `cp.async`); without them attention runs attention.cu.
    fn tensor_core_attention(&self) -> bool {
        true
    }
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
    pub(super) mem: Held<M>,
    pub(super) ptr: u64,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

/// A tensor's memory: its own allocation, or a buffer of a graph recording's arena.
pub(super) enum Held<M: Send + Sync> {
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
    pub(super) mem: Option<B>,
    /// The first value and the number of values.
    pub(super) base: u64,
    pub(super) words: usize,
    pub(super) ids: u64,
    pub(super) positions: u64,
    pub(super) cu_seqlens: u64,
    pub(super) blocks: u64,
    pub(super) n_tokens: usize,
    pub(super) n_seqs: usize,
    pub(super) n_blocks: usize,
    pub(super) max_position: usize,
    /// The longest sequence (what DeBERTa's relative index table must cover).
    pub(super) max_len: usize,
}

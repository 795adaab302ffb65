//! The CUDA backend: cuBLASLt for the GEMMs (bias and ReLU/tanh-GELU fused as epilogues), our
//! kernels (`kernels/*.cu`, compiled with NVRTC for the device's compute capability, once per
//! process) for everything else. bf16, f16 or f32 storage with f32 arithmetic.
//!
//! Streams: every op is enqueued on one compute stream and nothing waits for the GPU until a
//! result is downloaded, so the host tokenizes, packs and enqueues while the GPU runs. A batch's
//! index data (ids, positions, `cu_seqlens`, attention blocks) goes up on a separate copy stream
//! from pinned host memory; upload slots are leased per batch and recycled, so while one batch
//! computes the next one's upload proceeds (double buffering), ordered by events:
//! the copy into a slot waits for the compute that last read it (`released`), and the compute
//! that reads it waits for the copy (`copied`).
//!
//! Activations come from CUDA's stream-ordered allocator (`cuMemAllocAsync` on the compute
//! stream, with the pool told to keep freed memory), so a repeated batch shape allocates nothing
//! from the driver and frees are ordered after the last kernel that reads them.
//!
//! Built with cudarc's `dynamic-loading`: nothing of CUDA is needed to build, and on a machine
//! without the driver [`device::unavailable_reason`] explains, before any CUDA call.

pub mod device;
pub mod gemm;
pub mod kernels;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::{Backend, EmbeddingTables};
use crate::engine::{Activation, Batch, Pooling, Precision};
pub use device::DeviceInfo;
use gemm::{Epilogue, Gemm};
use kernels::{KernelFile, Storage, ATTENTION_HEAD_DIMS, ATTENTION_TC_HEAD_DIMS};

/// Queries per attention block (`BQ` in attention.cu).
const QUERY_BLOCK: usize = 64;
/// Threads of a row kernel and the widest row it holds in registers (`ROW_THREADS × ROW_SLOTS`).
const ROW_THREADS: u32 = 256;
const MAX_ROW: usize = 4096;

fn driver(what: &str) -> impl Fn(cu::DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("CUDA {what}: {e:?}")
}

/// A row-major matrix in device memory. Freed (stream-ordered) on drop.
pub struct CudaTensor {
    /// Owns the allocation `ptr` addresses.
    #[allow(dead_code)]
    buf: CudaSlice<u8>,
    ptr: u64,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Pinned host staging and device memory for one batch's index data, with the events that
/// order its reuse.
struct Slot {
    host: PinnedHostSlice<u32>,
    device: CudaSlice<u32>,
    dptr: u64,
    /// Recorded on the copy stream after the upload.
    copied: CudaEvent,
    /// Recorded on the compute stream when the batch using the slot is dropped.
    released: CudaEvent,
}

/// A batch's index data on the device (in one upload slot): `[ids | positions | cu_seqlens |
/// blocks]`, u32 each; blocks are (sequence, first query) pairs that never cross a sequence.
pub struct CudaBatch {
    slot: Option<Slot>,
    owner: Arc<Inner>,
    ids: u64,
    positions: u64,
    cu_seqlens: u64,
    blocks: u64,
    n_tokens: usize,
    n_seqs: usize,
    n_blocks: usize,
    max_position: usize,
}

impl Drop for CudaBatch {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // Every op that reads the slot was enqueued before this point.
            if slot.released.record(&self.owner.stream).is_ok() {
                self.owner.free_slots.lock().unwrap().push(slot);
            } else {
                // Without the event, free the slot only once the compute is done with it.
                let _ = self.owner.stream.synchronize();
                let _ = slot.copied.synchronize();
            }
        }
    }
}

/// The compiled kernels of one storage type.
struct Kernels {
    embed_layernorm: CudaFunction,
    layernorm: CudaFunction,
    bias_act: CudaFunction,
    geglu: CudaFunction,
    rope: CudaFunction,
    pool: CudaFunction,
    attention: HashMap<usize, CudaFunction>,
    /// Tensor-core attention by head size (bf16/f16 storage; empty for f32).
    attention_tc: HashMap<usize, CudaFunction>,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, storage: Storage, arch: &'static str) -> Result<Kernels> {
        let mut modules = HashMap::new();
        for file in KernelFile::ALL {
            let ptx = kernels::cached_ptx(file, storage, arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str()))
                .map_err(|e| {
                    anyhow!(
                        "the driver cannot load kernels/{}.cu compiled for {arch} ({e:?}); an \
                         NVRTC newer than the driver makes PTX it cannot load",
                        file.name()
                    )
                })?;
            modules.insert(file, module);
        }
        let f = |file: KernelFile, name: &str| {
            modules[&file]
                .load_function(name)
                .map_err(|e| anyhow!("kernels/{}.cu has no {name}: {e:?}", file.name()))
        };
        Ok(Kernels {
            embed_layernorm: f(KernelFile::LayerNorm, "embed_layernorm")?,
            layernorm: f(KernelFile::LayerNorm, "layernorm")?,
            bias_act: f(KernelFile::Activation, "bias_act")?,
            geglu: f(KernelFile::Activation, "geglu")?,
            rope: f(KernelFile::Rope, "rope")?,
            pool: f(KernelFile::Pool, "pool")?,
            attention: ATTENTION_HEAD_DIMS
                .iter()
                .map(|&d| Ok((d, f(KernelFile::Attention, &format!("attention_d{d}"))?)))
                .collect::<Result<_>>()?,
            attention_tc: KernelFile::AttentionTc
                .entry_points(storage)
                .iter()
                .zip(ATTENTION_TC_HEAD_DIMS)
                .map(|(name, d)| Ok((d, f(KernelFile::AttentionTc, name)?)))
                .collect::<Result<_>>()?,
        })
    }
}

/// cos/sin tables per (theta bits, head size / 2): the buffer and the positions it covers.
type RopeTables = HashMap<(u32, usize), (Arc<CudaSlice<f32>>, usize)>;

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    info: DeviceInfo,
    storage: Storage,
    k: Kernels,
    gemm: Gemm,
    free_slots: Mutex<Vec<Slot>>,
    /// Pinned host buffers for downloads, one per thread downloading at once.
    downloads: Mutex<Vec<PinnedHostSlice<u8>>>,
    rope_tables: Mutex<RopeTables>,
    poison: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Slots, rope tables, modules and the cuBLASLt handle go after this: nothing may still
        // be running that reads them.
        let _ = self.stream.synchronize();
        let _ = self.copy.synchronize();
    }
}

/// The CUDA backend on one device. Clones share the device, kernels and streams.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

/// The storage type for `precision` on a device of compute capability `cc`.
pub fn storage_for(precision: Precision, cc: (i32, i32)) -> Result<Storage> {
    let bf16 = cc.0 >= 8;
    Ok(match precision {
        Precision::Auto if bf16 => Storage::Bf16,
        Precision::Auto | Precision::F16 => Storage::F16,
        Precision::F32 => Storage::F32,
        Precision::Bf16 if bf16 => Storage::Bf16,
        Precision::Bf16 => bail!(
            "bf16 storage needs compute capability 8.0 or newer (this device is {}.{}): use \
             --precision f16",
            cc.0,
            cc.1
        ),
    })
}

/// The attention blocks of a batch: (sequence, first query) for every run of up to
/// `QUERY_BLOCK` queries within one sequence.
fn attention_blocks(cu_seqlens: &[u32]) -> Vec<u32> {
    let mut blocks = Vec::new();
    for s in 0..cu_seqlens.len().saturating_sub(1) {
        let mut q0 = cu_seqlens[s];
        while q0 < cu_seqlens[s + 1] {
            blocks.extend_from_slice(&[s as u32, q0]);
            q0 += QUERY_BLOCK as u32;
        }
    }
    blocks
}

impl CudaBackend {
    /// Open `cuda:ordinal` with weights and activations stored as `precision` says.
    pub fn new(ordinal: usize, precision: Precision) -> Result<CudaBackend> {
        if let Some(why) = device::unavailable_reason(Some(ordinal)) {
            bail!("cuda:{ordinal} is not available: {why}");
        }
        let info = device::devices()?.swap_remove(ordinal);
        let storage = storage_for(precision, info.capability)?;
        let ctx = CudaContext::new(ordinal).map_err(driver("context creation"))?;
        // SAFETY: before any slice exists. We order streams ourselves: one compute stream for
        // every op, and events between it and the copy stream (see the module comment).
        unsafe { ctx.disable_event_tracking() };
        // Keep freed activations in the stream-ordered pool instead of returning them to the
        // driver at each synchronisation (devices without memory pools allocate synchronously).
        if ctx.has_async_alloc() {
            // SAFETY: the device handle is the context's; the attribute takes a u64.
            unsafe {
                let pool = cu::device::get_default_mem_pool(ctx.cu_device())
                    .map_err(driver("memory pool"))?;
                let mut keep = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
                .map_err(driver("memory pool threshold"))?;
            }
        }
        let stream = ctx.new_stream().map_err(driver("stream creation"))?;
        let copy = ctx.new_stream().map_err(driver("stream creation"))?;
        let arch = device::arch_name(info.capability);
        let k = Kernels::load(&ctx, storage, arch)?;
        let gemm = Gemm::new(stream.clone(), storage, info.capability.0 >= 9)?;
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                ctx,
                stream,
                copy,
                info,
                storage,
                k,
                gemm,
                free_slots: Mutex::default(),
                downloads: Mutex::default(),
                rope_tables: Mutex::default(),
                poison: AtomicBool::new(false),
            }),
        })
    }

    pub fn storage(&self) -> Storage {
        self.inner.storage
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// For tests: outputs are filled with NaN (all-ones bytes) before an op writes them, so a
    /// value an op forgets to write cannot pass as a stale right answer.
    pub fn set_poison(&self, on: bool) {
        self.inner.poison.store(on, Ordering::Relaxed);
    }

    fn elem_bytes(&self) -> usize {
        match self.inner.storage {
            Storage::F32 => 4,
            Storage::Bf16 | Storage::F16 => 2,
        }
    }

    fn encode(&self, data: &[f32]) -> Vec<u8> {
        match self.inner.storage {
            Storage::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Storage::F16 => data
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Storage::Bf16 => data
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Vec<f32> {
        match self.inner.storage {
            Storage::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Storage::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Storage::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    /// A fresh `[rows, cols]` activation, stream-ordered on the compute stream.
    fn output(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        let bytes = (rows * cols * self.elem_bytes()).max(16);
        let s = &self.inner.stream;
        // SAFETY: every op writes its whole output before anything reads it (poison mode
        // checks exactly that).
        let buf = unsafe { s.alloc::<u8>(bytes) }
            .map_err(|e| anyhow!("cannot allocate {what} ([{rows}, {cols}]) on the GPU: {e:?}"))?;
        let ptr = buf.device_ptr(s).0;
        if self.inner.poison.load(Ordering::Relaxed) {
            // SAFETY: `ptr` addresses `bytes` bytes allocated above on this stream.
            unsafe { cu::memset_d8_async(ptr, 0xff, bytes, s.cu_stream()) }
                .map_err(driver("memset"))?;
        }
        Ok(CudaTensor {
            buf,
            ptr,
            rows,
            cols,
        })
    }

    /// A launch on the compute stream with the given grid and block sizes.
    fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Blocks for a grid-stride kernel over `n` elements, 256 threads each.
    fn stride_grid(&self, n: usize) -> (u32, u32, u32) {
        let most = (self.inner.info.multiprocessors.max(1) as usize) * 32;
        (n.div_ceil(256).clamp(1, most) as u32, 1, 1)
    }

    fn rope_table(&self, theta: f32, half: usize, positions: usize) -> Result<Arc<CudaSlice<f32>>> {
        let key = (theta.to_bits(), half);
        let mut tables = self.inner.rope_tables.lock().unwrap();
        if let Some((buf, covered)) = tables.get(&key) {
            if *covered >= positions {
                return Ok(buf.clone());
            }
        }
        // Grown to a power of two so a longer batch rarely rebuilds it.
        let covered = positions.next_power_of_two();
        let table: Vec<f32> = super::rotary_table(theta, half, covered)
            .into_iter()
            .flatten()
            .collect();
        let buf = Arc::new(
            self.inner
                .stream
                .clone_htod(&table)
                .map_err(driver("rotary table upload"))?,
        );
        tables.insert(key, (buf.clone(), covered));
        Ok(buf)
    }

    /// A free upload slot with room for `n` u32 values.
    fn slot(&self, n: usize) -> Result<Slot> {
        let reused = self.inner.free_slots.lock().unwrap().pop();
        let ctx = &self.inner.ctx;
        let copy = &self.inner.copy;
        let fits = |s: &Slot| s.host.len() >= n && s.device.len() >= n;
        match reused {
            Some(s) if fits(&s) => Ok(s),
            old => {
                // Grow by half again, so a slowly growing batch size reallocates rarely.
                let cap = n
                    .max(old.as_ref().map_or(0, |s| s.host.len()) * 3 / 2)
                    .max(1024);
                if let Some(old) = &old {
                    // The old device buffer is freed on the copy stream: order that after the
                    // compute that last read it.
                    copy.wait(&old.released).map_err(driver("stream wait"))?;
                    // Its pinned buffer is freed at once: its last upload must be done.
                    old.copied.synchronize().map_err(driver("event wait"))?;
                }
                // SAFETY: both are written (host, then by the copy) before anything reads them.
                let host = unsafe { ctx.alloc_pinned::<u32>(cap) }
                    .map_err(driver("pinned host allocation"))?;
                let device =
                    unsafe { copy.alloc::<u32>(cap) }.map_err(driver("batch allocation"))?;
                let dptr = device.device_ptr(copy).0;
                Ok(Slot {
                    host,
                    device,
                    dptr,
                    copied: ctx.new_event(None).map_err(driver("event"))?,
                    released: ctx.new_event(None).map_err(driver("event"))?,
                })
            }
        }
    }

    /// layernorm.cu's `layernorm` in `mode` (0 post-norm in place, 1 pre-norm step, 2 plain).
    fn layernorm_op(
        &self,
        mode: i32,
        x: &CudaTensor,
        residual: Option<&CudaTensor>,
        norm: (&CudaTensor, Option<&CudaTensor>, f32),
        out: Option<&CudaTensor>,
    ) -> Result<()> {
        let (weight, bias, eps) = norm;
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
        let (xp, rp, wp) = (x.ptr, residual.map_or(0, |r| r.ptr), weight.ptr);
        let (bp, op) = (bias.map_or(0, |b| b.ptr), out.map_or(0, |o| o.ptr));
        let (r, h) = (rows as i32, cols as i32);
        let s = &self.inner.stream;
        let mut l = s.launch_builder(&self.inner.k.layernorm);
        l.arg(&xp).arg(&rp).arg(&wp).arg(&bp).arg(&op);
        l.arg(&r).arg(&h).arg(&eps).arg(&mode);
        // SAFETY: pointers address tensors of the checked shapes; one block per row.
        unsafe { l.launch(Self::cfg((rows as u32, 1, 1), ROW_THREADS)) }
            .map_err(driver("layernorm launch"))?;
        Ok(())
    }

    /// `x = act(x + bias)` in place (our exact epilogue after a cuBLASLt product).
    fn bias_act(&self, x: &CudaTensor, bias: Option<u64>, act: Activation) -> Result<()> {
        let (xp, bp) = (x.ptr, bias.unwrap_or(0));
        let (rows, n, a) = (x.rows as i32, x.cols as i32, i32::from(act.code()));
        let s = &self.inner.stream;
        let mut l = s.launch_builder(&self.inner.k.bias_act);
        l.arg(&xp).arg(&bp).arg(&rows).arg(&n).arg(&a);
        // SAFETY: x is [rows, n]; bias (if any) has n values.
        unsafe { l.launch(Self::cfg(self.stride_grid(x.rows * x.cols), 256)) }
            .map_err(driver("bias_act launch"))?;
        Ok(())
    }
}

/// `MIRA_CUDA_ATTENTION=scalar`: use attention.cu even where attention_tc.cu has a kernel.
fn scalar_attention_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("MIRA_CUDA_ATTENTION").is_ok_and(|v| v == "scalar"))
}

/// `n` as the kernels' 32-bit int.
fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| anyhow!("{what} ({n}) does not fit the kernels' 32-bit indices"))
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Batch = CudaBatch;

    fn name(&self) -> String {
        let i = &self.inner.info;
        format!(
            "cuda:{} ({}, sm_{}{}, {} storage)",
            i.ordinal,
            i.name,
            i.capability.0,
            i.capability.1,
            match self.inner.storage {
                Storage::Bf16 => "bf16",
                Storage::F16 => "f16",
                Storage::F32 => "f32",
            }
        )
    }

    fn weight(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaTensor> {
        ensure!(
            data.len() == rows * cols,
            "weight has {} values, expected {rows}x{cols}",
            data.len()
        );
        let mut bytes = self.encode(&data);
        bytes.resize(bytes.len().max(16), 0);
        let s = &self.inner.stream;
        let buf = s
            .clone_htod(&bytes)
            .map_err(|e| anyhow!("cannot upload a [{rows}, {cols}] weight to the GPU: {e:?}"))?;
        let ptr = buf.device_ptr(s).0;
        Ok(CudaTensor {
            buf,
            ptr,
            rows,
            cols,
        })
    }

    fn upload_batch(&self, batch: &Batch, vocab: usize, max_positions: usize) -> Result<CudaBatch> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
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
        let mut slot = self.slot(n)?;
        // The pinned buffer may still feed this slot's previous upload.
        slot.copied.synchronize().map_err(driver("event wait"))?;
        {
            let host = slot.host.as_mut_slice().map_err(driver("pinned buffer"))?;
            host[..t].copy_from_slice(&batch.ids);
            host[t..2 * t].copy_from_slice(&batch.positions);
            host[2 * t..2 * t + cu.len()].copy_from_slice(cu);
            host[blocks_at..n].copy_from_slice(&blocks);
        }
        let copy = &self.inner.copy;
        // The copy overwrites the slot: after the compute that last read it.
        copy.wait(&slot.released).map_err(driver("stream wait"))?;
        let host = slot.host.as_slice().map_err(driver("pinned buffer"))?;
        // SAFETY: the device buffer holds at least n u32 values; the pinned source stays alive
        // (and untouched: `copied` is waited on before the next write) until the copy is done.
        unsafe { cu::memcpy_htod_async(slot.dptr, &host[..n], copy.cu_stream()) }
            .map_err(driver("batch upload"))?;
        slot.copied.record(copy).map_err(driver("event record"))?;
        self.inner
            .stream
            .wait(&slot.copied)
            .map_err(driver("stream wait"))?;
        let at = |i: usize| slot.dptr + 4 * i as u64;
        Ok(CudaBatch {
            ids: at(0),
            positions: at(t),
            cu_seqlens: at(2 * t),
            blocks: at(blocks_at),
            n_tokens: t,
            n_seqs: cu.len().saturating_sub(1),
            n_blocks: blocks.len() / 2,
            max_position: batch.positions.iter().max().map_or(0, |&p| p as usize + 1),
            slot: Some(slot),
            owner: self.inner.clone(),
        })
    }

    fn embed(&self, batch: &CudaBatch, t: &EmbeddingTables<CudaTensor>) -> Result<CudaTensor> {
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
        let (ids, pos) = (batch.ids, batch.positions);
        let word = t.word.ptr;
        let position = t.position.as_ref().map_or(0, |x| x.ptr);
        let token_type = t.token_type.as_ref().map_or(0, |x| x.ptr);
        let (gamma, beta) = (t.norm_weight.ptr, t.norm_bias.as_ref().map_or(0, |x| x.ptr));
        let (rows, hh, eps) = (int(batch.n_tokens, "tokens")?, h as i32, t.eps);
        let s = &self.inner.stream;
        let mut l = s.launch_builder(&self.inner.k.embed_layernorm);
        l.arg(&ids)
            .arg(&pos)
            .arg(&word)
            .arg(&position)
            .arg(&token_type);
        l.arg(&gamma)
            .arg(&beta)
            .arg(&out.ptr)
            .arg(&rows)
            .arg(&hh)
            .arg(&eps);
        // SAFETY: ids and positions were validated against the tables' sizes at upload.
        unsafe { l.launch(Self::cfg((rows as u32, 1, 1), ROW_THREADS)) }
            .map_err(driver("embed launch"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<CudaTensor> {
        let (m, k, n) = super::linear_shape(
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
            let s = &self.inner.stream;
            // SAFETY: `out` holds m·n elements.
            unsafe { cu::memset_d8_async(out.ptr, 0, m * n * self.elem_bytes(), s.cu_stream()) }
                .map_err(driver("memset"))?;
            self.bias_act(&out, b.map(|b| b.ptr), act)?;
            return Ok(out);
        }
        let (epilogue, leftover) = Epilogue::plan(act, b.is_some());
        // SAFETY: x is [m, k], w is [n, k], bias has n values, out is [m, n] (checked above).
        unsafe {
            self.inner
                .gemm
                .matmul(x.ptr, w.ptr, b.map(|b| b.ptr), out.ptr, (m, n, k), epilogue)?;
        }
        if let Some(act) = leftover {
            self.bias_act(&out, None, act)?;
        }
        Ok(out)
    }

    fn add_layernorm(
        &self,
        x: CudaTensor,
        residual: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.layernorm_op(0, &x, Some(residual), (weight, bias, eps), None)?;
        Ok(x)
    }

    fn add_norm(
        &self,
        x: &mut CudaTensor,
        delta: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        eps: f32,
    ) -> Result<CudaTensor> {
        let out = self.output(x.rows, x.cols, "normalised residual")?;
        self.layernorm_op(1, x, Some(delta), (weight, bias, eps), Some(&out))?;
        Ok(out)
    }

    fn layernorm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        eps: f32,
    ) -> Result<CudaTensor> {
        let out = self.output(x.rows, x.cols, "layernorm output")?;
        self.layernorm_op(2, x, None, (weight, bias, eps), Some(&out))?;
        Ok(out)
    }

    fn rope(
        &self,
        qkv: CudaTensor,
        batch: &CudaBatch,
        heads: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        let (h, d) = super::qkv_shape("rope", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(d.is_multiple_of(2), "rope: head size {d} must be even");
        if qkv.rows == 0 {
            return Ok(qkv);
        }
        let half = d / 2;
        let table = self.rope_table(theta, half, batch.max_position)?;
        let s = &self.inner.stream;
        let tp = table.device_ptr(s).0;
        let (rows, hh, hd) = (int(qkv.rows, "tokens")?, int(h, "hidden")?, half as i32);
        let mut l = s.launch_builder(&self.inner.k.rope);
        l.arg(&qkv.ptr).arg(&batch.positions).arg(&tp);
        l.arg(&rows).arg(&hh).arg(&hd);
        // SAFETY: the table covers every position of the batch; qkv is [rows, 3h].
        unsafe { l.launch(Self::cfg(self.stride_grid(qkv.rows * h), 256)) }
            .map_err(driver("rope launch"))?;
        Ok(qkv)
    }

    fn geglu(&self, x: &CudaTensor, act: Activation) -> Result<CudaTensor> {
        let inner = super::geglu_width(x.cols)?;
        let out = self.output(x.rows, inner, "geglu output")?;
        if x.rows * inner == 0 {
            return Ok(out);
        }
        let (rows, n, a) = (
            int(x.rows, "rows")?,
            int(inner, "width")?,
            i32::from(act.code()),
        );
        let s = &self.inner.stream;
        let mut l = s.launch_builder(&self.inner.k.geglu);
        l.arg(&x.ptr).arg(&out.ptr).arg(&rows).arg(&n).arg(&a);
        // SAFETY: x is [rows, 2·inner], out is [rows, inner].
        unsafe { l.launch(Self::cfg(self.stride_grid(x.rows * inner), 256)) }
            .map_err(driver("geglu launch"))?;
        Ok(out)
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        batch: &CudaBatch,
        heads: usize,
        window: Option<usize>,
    ) -> Result<CudaTensor> {
        let (h, d) = super::qkv_shape("attention", qkv.rows, qkv.cols, batch.n_tokens, heads)?;
        ensure!(
            window != Some(0),
            "attention: a sliding window must be at least 1 token"
        );
        // Tensor cores where there is a kernel for the head size (bf16/f16 storage), unless
        // MIRA_CUDA_ATTENTION=scalar asks for the plain kernel (to compare the two).
        let k = &self.inner.k;
        let (kernel, threads) = match k.attention_tc.get(&d) {
            Some(tc) if !scalar_attention_forced() => (tc, 128u32),
            _ => match k.attention.get(&d) {
                Some(plain) => (plain, QUERY_BLOCK as u32),
                None => bail!(
                    "attention: head size {d} has no CUDA kernel (supported: {ATTENTION_HEAD_DIMS:?})"
                ),
            },
        };
        let out = self.output(qkv.rows, h, "attention output")?;
        if batch.n_blocks == 0 {
            return Ok(out);
        }
        let hh = int(h, "hidden")?;
        let nb = int(batch.n_blocks, "attention blocks")?;
        let half_window: i32 = match window {
            Some(w) => int(w / 2, "window")?,
            None => -1,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let s = &self.inner.stream;
        let mut l = s.launch_builder(kernel);
        l.arg(&qkv.ptr)
            .arg(&batch.blocks)
            .arg(&batch.cu_seqlens)
            .arg(&out.ptr);
        l.arg(&hh).arg(&nb).arg(&half_window).arg(&scale);
        let grid = (batch.n_blocks as u32, heads as u32, 1);
        // SAFETY: blocks lie within their sequences, which lie within qkv's rows.
        unsafe { l.launch(Self::cfg(grid, threads)) }.map_err(driver("attention launch"))?;
        Ok(out)
    }

    fn pool(&self, x: &CudaTensor, batch: &CudaBatch, mode: Pooling) -> Result<CudaTensor> {
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
        let (n, h) = (int(batch.n_seqs, "sequences")?, int(x.cols, "width")?);
        let s = &self.inner.stream;
        let mut l = s.launch_builder(&self.inner.k.pool);
        l.arg(&x.ptr).arg(&batch.cu_seqlens).arg(&out.ptr);
        l.arg(&n).arg(&h).arg(&mode);
        // SAFETY: one block per sequence; cu_seqlens bounds every row read.
        unsafe { l.launch(Self::cfg((n as u32, 1, 1), ROW_THREADS)) }
            .map_err(driver("pool launch"))?;
        Ok(out)
    }

    /// Waits for this tensor only: the copy goes into pinned memory behind the ops that made
    /// it, and an event after the copy is what the thread waits on, so another thread's batch
    /// queued behind it keeps the GPU busy meanwhile.
    fn download(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let n = x.rows * x.cols * self.elem_bytes();
        if n == 0 {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        inner.ctx.bind_to_thread().map_err(driver("context"))?;
        let reused = inner.downloads.lock().unwrap().pop();
        let mut host = match reused {
            Some(h) if h.len() >= n => h,
            _ => {
                // Plain page-locked memory (not write-combined: the host reads it).
                // SAFETY: the copy below writes the first n bytes before they are read.
                unsafe { inner.ctx.alloc_pinned_with_flags::<u8>(n.max(1 << 20), 0) }
                    .map_err(driver("pinned host allocation"))?
            }
        };
        let s = &inner.stream;
        let dst = &mut host.as_mut_slice().map_err(driver("pinned buffer"))?[..n];
        // SAFETY: the tensor holds at least n bytes; `dst` is pinned and not touched until the
        // event after the copy has completed.
        unsafe { cu::memcpy_dtoh_async(dst, x.ptr, s.cu_stream()) }.map_err(driver("download"))?;
        let done = inner.ctx.new_event(None).map_err(driver("event"))?;
        done.record(s).map_err(driver("event record"))?;
        done.synchronize()
            .map_err(driver("execution (a kernel or copy failed)"))?;
        let out = self.decode(&host.as_slice().map_err(driver("pinned buffer"))?[..n]);
        inner.downloads.lock().unwrap().push(host);
        Ok(out)
    }

    /// Two threads per device: while one waits for its batch's result, the other's ops are
    /// already queued, so the GPU never idles between batches.
    fn concurrency(&self) -> usize {
        2
    }

    fn sync(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .context("CUDA execution failed")
            .map_err(|e| anyhow!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_blocks_never_cross_a_sequence() {
        let cu = [0u32, 1, 64, 129, 129, 329];
        let blocks = attention_blocks(&cu);
        let pairs: Vec<(u32, u32)> = blocks.chunks(2).map(|p| (p[0], p[1])).collect();
        assert_eq!(
            pairs,
            vec![
                (0, 0),
                (1, 1),
                (2, 64),
                (2, 128),
                (4, 129),
                (4, 193),
                (4, 257),
                (4, 321)
            ]
        );
        for (s, q0) in pairs {
            let (lo, hi) = (cu[s as usize], cu[s as usize + 1]);
            assert!(q0 >= lo && q0 < hi);
        }
        assert!(attention_blocks(&[0]).is_empty());
    }

    #[test]
    fn storage_follows_precision_and_capability() {
        assert_eq!(storage_for(Precision::Auto, (9, 0)).unwrap(), Storage::Bf16);
        assert_eq!(storage_for(Precision::Auto, (7, 5)).unwrap(), Storage::F16);
        assert_eq!(storage_for(Precision::F32, (9, 0)).unwrap(), Storage::F32);
        assert_eq!(storage_for(Precision::F16, (8, 0)).unwrap(), Storage::F16);
        let err = storage_for(Precision::Bf16, (7, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("8.0") && err.contains("7.0"), "{err}");
    }

    #[test]
    fn opening_a_missing_device_explains_why() {
        if device::unavailable_reason(Some(0)).is_some() {
            let err = CudaBackend::new(0, Precision::Auto)
                .err()
                .unwrap()
                .to_string();
            assert!(err.starts_with("cuda:0 is not available: "), "{err}");
        }
        let err = CudaBackend::new(1 << 20, Precision::Auto)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not available"), "{err}");
    }
}

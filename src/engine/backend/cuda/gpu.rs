//! One NVIDIA GPU as a [`KernelDevice`] through cudarc: the context, the compute, copy and
//! capture streams, pinned upload slots, the NVRTC-compiled kernels, cuBLASLt and CUDA graphs
//! (see the module comment of `cuda/mod.rs` for how streams and memory are ordered).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::device::{self, DeviceInfo};
use super::gemm::{Epilogue, Gemm};
use super::graph::Op;
use super::kernels::{KernelFile, Storage};
use super::launch::{Arg, Entry, Launch};
use super::{CudaBackend, KernelBackend, KernelDevice};
use crate::engine::Precision;

fn driver(what: &str) -> impl Fn(cu::DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("CUDA {what}: {e:?}")
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

/// A batch's upload slot, returned to the free list when the batch is dropped.
pub struct SlotLease {
    slot: Option<Slot>,
    owner: Arc<Inner>,
}

impl Drop for SlotLease {
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

/// The compiled kernels of one storage type, by entry point.
struct Kernels(HashMap<Entry, CudaFunction>);

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, storage: Storage, capability: (i32, i32)) -> Result<Kernels> {
        let arch = device::arch_name(capability);
        let mut functions = HashMap::new();
        for file in KernelFile::ALL {
            if file == KernelFile::AttentionTc && !device::has_tensor_core_attention(capability) {
                continue; // (its PTX would not load before sm_80)
            }
            let ptx = super::kernels::cached_ptx(file, storage, arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str()))
                .map_err(|e| {
                    anyhow!(
                        "the driver cannot load kernels/{}.cu compiled for {arch} ({e:?}); an \
                         NVRTC newer than the driver makes PTX it cannot load",
                        file.name()
                    )
                })?;
            for entry in file_entries(file, storage) {
                let name = entry.name();
                let f = module
                    .load_function(&name)
                    .map_err(|e| anyhow!("kernels/{}.cu has no {name}: {e:?}", file.name()))?;
                functions.insert(entry, f);
            }
        }
        Ok(Kernels(functions))
    }
}

/// The entry points of `file` for `storage`, as [`Entry`] values.
fn file_entries(file: KernelFile, storage: Storage) -> Vec<Entry> {
    use super::kernels::{ATTENTION_HEAD_DIMS, ATTENTION_TC_HEAD_DIMS};
    match file {
        KernelFile::LayerNorm => vec![
            Entry::EmbedLayerNorm,
            Entry::LayerNorm,
            Entry::EmbedLayerNormWarp,
            Entry::LayerNormWarp,
        ],
        KernelFile::Activation => vec![Entry::BiasAct, Entry::Geglu],
        KernelFile::Rope => vec![Entry::Rope],
        KernelFile::Pool => vec![Entry::Pool],
        KernelFile::Attention => ATTENTION_HEAD_DIMS
            .iter()
            .flat_map(|&d| [Entry::Attention(d), Entry::AttentionRel(d)])
            .collect(),
        KernelFile::AttentionTc if storage == Storage::F32 => Vec::new(),
        KernelFile::AttentionTc => ATTENTION_TC_HEAD_DIMS.map(Entry::AttentionTc).to_vec(),
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// Graphs are captured here, one at a time (nothing runs on it), and launched on `stream`.
    capture: Mutex<Arc<CudaStream>>,
    info: DeviceInfo,
    storage: Storage,
    k: Kernels,
    gemm: Gemm,
    free_slots: Mutex<Vec<Slot>>,
    /// Pinned host buffers for downloads, one per thread downloading at once.
    downloads: Mutex<Vec<PinnedHostSlice<u8>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Slots, modules and the cuBLASLt handle go after this: nothing may still be running
        // that reads them.
        let _ = self.stream.synchronize();
        let _ = self.copy.synchronize();
    }
}

/// One GPU as a [`KernelDevice`]. Clones share the context, kernels and streams.
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
}

/// The storage type for `precision` on a device of compute capability `cc`. Auto is f16: with
/// f32 accumulation it runs as fast as bf16 on tensor cores and keeps 3 more significant bits,
/// which whole-model checks need (on the random-weight test checkpoints bf16 storage drifts to
/// cosine 0.9988 and head outputs 1.1-9.4% of the score range off the f32 reference; f16 stays
/// within 0.99998 and 0.7%, measured on the kernel emulator of tests/cuda_emu.rs). bf16 (wider
/// range, sm_80+) is there for checkpoints whose activations overflow f16.
pub fn storage_for(precision: Precision, cc: (i32, i32)) -> Result<Storage> {
    Ok(match precision {
        Precision::Auto | Precision::F16 => Storage::F16,
        Precision::F32 => Storage::F32,
        Precision::Bf16 if cc.0 >= 8 => Storage::Bf16,
        Precision::Bf16 => bail!(
            "bf16 storage needs compute capability 8.0 or newer (this device is {}.{}): use \
             --precision f16",
            cc.0,
            cc.1
        ),
        Precision::Int8 => bail!("int8 runs on the cpu only: use --precision f16 or bf16 on cuda"),
    })
}

impl KernelBackend<Gpu> {
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
        let capture = ctx.new_stream().map_err(driver("stream creation"))?;
        let k = Kernels::load(&ctx, storage, info.capability)?;
        let gemm = Gemm::new(&stream, storage, info.capability.0 >= 9)?;
        Ok(KernelBackend::on(Gpu {
            inner: Arc::new(Inner {
                ctx,
                stream,
                copy,
                capture: Mutex::new(capture),
                info,
                storage,
                k,
                gemm,
                free_slots: Mutex::default(),
                downloads: Mutex::default(),
            }),
        }))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.device().inner.info
    }
}

impl Gpu {
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
}

impl Gpu {
    /// Enqueue `l` on `s`.
    ///
    /// # Safety
    /// As [`KernelDevice::launch`].
    unsafe fn launch_on(&self, s: &Arc<CudaStream>, l: &Launch) -> Result<()> {
        let Some(f) = self.inner.k.0.get(&l.entry) else {
            bail!(
                "kernels/{}.cu has no {} for {} storage",
                l.entry.file().name(),
                l.entry.name(),
                self.inner.storage.name()
            );
        };
        let mut b = s.launch_builder(f);
        for a in &l.args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: l.grid,
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract.
        unsafe { b.launch(cfg) }.map_err(driver("launch"))?;
        Ok(())
    }

    /// Enqueue `bytes` bytes of `byte` at `ptr` on `s`.
    ///
    /// # Safety
    /// As [`KernelDevice::memset`].
    unsafe fn memset_on(&self, s: &CudaStream, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
        // SAFETY: the caller's contract.
        unsafe { cu::memset_d8_async(ptr, byte, bytes, s.cu_stream()) }.map_err(driver("memset"))
    }

    /// Enqueue a recorded op on `s`.
    ///
    /// # Safety
    /// As the op's own call.
    unsafe fn enqueue(&self, s: &Arc<CudaStream>, op: &Op) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            match op {
                Op::Launch(l) => self.launch_on(s, l),
                Op::Gemm {
                    x,
                    w,
                    bias,
                    out,
                    mnk,
                    epilogue,
                } => self
                    .inner
                    .gemm
                    .matmul(s, *x, *w, *bias, *out, *mnk, *epilogue),
                Op::Memset { ptr, byte, bytes } => self.memset_on(s, *ptr, *byte, *bytes),
            }
        }
    }
}

/// A captured CUDA graph and its executable instance, destroyed (the instance first) on drop;
/// an instance still running then is freed once it completes.
pub struct GpuGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// SAFETY: a graph is used by one thread at a time (the graph cache hands it out exclusively);
// CUDA requires only that calls on one graph are not concurrent.
unsafe impl Send for GpuGraph {}

impl Drop for GpuGraph {
    fn drop(&mut self) {
        // SAFETY: both were created by `Gpu::graph` and are destroyed once, here.
        unsafe {
            let _ = cu::graph::exec_destroy(self.exec);
            let _ = cu::graph::destroy(self.graph);
        }
    }
}

impl KernelDevice for Gpu {
    type Mem = CudaSlice<u8>;
    type BatchMem = SlotLease;
    type Graph = GpuGraph;

    fn describe(&self) -> String {
        let i = &self.inner.info;
        format!(
            "cuda:{} ({}, sm_{}{}, {} storage)",
            i.ordinal,
            i.name,
            i.capability.0,
            i.capability.1,
            self.inner.storage.name()
        )
    }

    fn storage(&self) -> Storage {
        self.inner.storage
    }

    fn multiprocessors(&self) -> u32 {
        self.inner.info.multiprocessors.max(1) as u32
    }

    fn tensor_core_attention(&self) -> bool {
        device::has_tensor_core_attention(self.inner.info.capability)
    }

    fn alloc(&self, bytes: usize, _what: &str) -> Result<(CudaSlice<u8>, u64)> {
        let s = &self.inner.stream;
        // SAFETY: every op writes its whole output before anything reads it (poison mode
        // checks exactly that).
        let buf = unsafe { s.alloc::<u8>(bytes) }.map_err(|e| anyhow!("GPU: {e:?}"))?;
        let ptr = buf.device_ptr(s).0;
        Ok((buf, ptr))
    }

    unsafe fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.memset_on(&self.inner.stream, ptr, byte, bytes) }
    }

    fn upload(&self, bytes: &[u8], _what: &str) -> Result<(CudaSlice<u8>, u64)> {
        let s = &self.inner.stream;
        let buf = s.clone_htod(bytes).map_err(|e| anyhow!("GPU: {e:?}"))?;
        let ptr = buf.device_ptr(s).0;
        Ok((buf, ptr))
    }

    fn upload_batch(&self, n: usize, fill: &mut dyn FnMut(&mut [u32])) -> Result<(SlotLease, u64)> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
        let mut slot = self.slot(n)?;
        // The pinned buffer may still feed this slot's previous upload.
        slot.copied.synchronize().map_err(driver("event wait"))?;
        fill(&mut slot.host.as_mut_slice().map_err(driver("pinned buffer"))?[..n]);
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
        let base = slot.dptr;
        Ok((
            SlotLease {
                slot: Some(slot),
                owner: self.inner.clone(),
            },
            base,
        ))
    }

    unsafe fn launch(&self, l: &Launch) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch_on(&self.inner.stream, l) }
    }

    unsafe fn gemm(
        &self,
        x: u64,
        w: u64,
        bias: Option<u64>,
        out: u64,
        mnk: (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()> {
        let s = &self.inner.stream;
        // SAFETY: the caller's contract.
        unsafe { self.inner.gemm.matmul(s, x, w, bias, out, mnk, epilogue) }
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
        let s = &self.inner.stream;
        // SAFETY: the caller's contract.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, s.cu_stream()) }.map_err(driver("copy"))
    }

    /// Captured on the capture stream in thread-local mode (other threads keep enqueueing on
    /// the compute stream meanwhile; this thread allocates nothing while capturing). Every
    /// kernel and GEMM algorithm in `ops` ran during the recording pass, so none is loaded
    /// during the capture.
    unsafe fn graph(&self, ops: &[Op]) -> Result<GpuGraph> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
        let s = self.inner.capture.lock().unwrap();
        let cs = s.cu_stream();
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the capture stream is ours and not capturing (captures hold its lock).
        unsafe { cu::stream::begin_capture(cs, mode) }.map_err(driver("graph capture"))?;
        // SAFETY: the caller's contract.
        let enqueued = ops
            .iter()
            .try_for_each(|op| unsafe { self.enqueue(&s, op) });
        // Capture always ends, also after an error, so the stream (and this thread) leave
        // capture mode: the driver call itself, not cudarc's, which returns early on an error
        // another thread left pending in the context.
        // SAFETY: capture was begun on `cs` above.
        let ended = unsafe { cu::stream::end_capture(cs) };
        let graph = match (enqueued, ended) {
            (Ok(()), Ok(g)) if !g.is_null() => g,
            (enqueued, ended) => {
                if let Ok(g) = ended {
                    if !g.is_null() {
                        // SAFETY: the graph the capture returned, used nowhere else.
                        let _ = unsafe { cu::graph::destroy(g) };
                    }
                }
                enqueued.map_err(|e| anyhow!("recording a CUDA graph: {e:#}"))?;
                bail!("CUDA graph capture was invalidated");
            }
        };
        let flags = sys::CUgraphInstantiate_flags(0);
        // SAFETY: a valid graph; destroyed below if instantiation fails.
        match unsafe { cu::graph::instantiate(graph, flags) } {
            Ok(exec) => Ok(GpuGraph { graph, exec }),
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { cu::graph::destroy(graph) };
                Err(driver("graph instantiation")(e))
            }
        }
    }

    unsafe fn launch_graph(&self, graph: &GpuGraph) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(driver("context"))?;
        let s = &self.inner.stream;
        // SAFETY: the caller's contract; the graph was instantiated in this context.
        unsafe { cu::graph::launch(graph.exec, s.cu_stream()) }.map_err(driver("graph launch"))
    }

    /// Waits for this tensor only: the copy goes into pinned memory behind the ops that made
    /// it, and an event after the copy is what the thread waits on, so another thread's batch
    /// queued behind it keeps the GPU busy meanwhile.
    unsafe fn download(&self, ptr: u64, n: usize) -> Result<Vec<u8>> {
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
        // SAFETY: the caller's contract; `dst` is pinned and not touched until the event after
        // the copy has completed.
        unsafe { cu::memcpy_dtoh_async(dst, ptr, s.cu_stream()) }.map_err(driver("download"))?;
        let done = inner.ctx.new_event(None).map_err(driver("event"))?;
        done.record(s).map_err(driver("event record"))?;
        done.synchronize()
            .map_err(driver("execution (a kernel or copy failed)"))?;
        let out = host.as_slice().map_err(driver("pinned buffer"))?[..n].to_vec();
        inner.downloads.lock().unwrap().push(host);
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .context("CUDA execution failed")
            .map_err(|e| anyhow!("{e:#}"))
    }

    /// Two threads per device: while one waits for its batch's result, the other's ops are
    /// already queued, so the GPU never idles between batches.
    fn concurrency(&self) -> usize {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_follows_precision_and_capability() {
        assert_eq!(storage_for(Precision::Auto, (9, 0)).unwrap(), Storage::F16);
        assert_eq!(storage_for(Precision::Auto, (7, 5)).unwrap(), Storage::F16);
        assert_eq!(storage_for(Precision::Bf16, (9, 0)).unwrap(), Storage::Bf16);
        assert_eq!(storage_for(Precision::F32, (9, 0)).unwrap(), Storage::F32);
        assert_eq!(storage_for(Precision::F16, (8, 0)).unwrap(), Storage::F16);
        let err = storage_for(Precision::Bf16, (7, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("8.0") && err.contains("7.0"), "{err}");
        let err = storage_for(Precision::Int8, (9, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("int8 runs on the cpu only"), "{err}");
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

//! A [`KernelDevice`] on the CPU: the CUDA backend's own ops (`cuda/ops.rs`) with kernels/*.cu
//! compiled by the host C++ compiler against `cuda_emu.h` (threads as fibers, barriers, warp
//! shuffles, mma.sync from the PTX ISA's fragment layouts) and the GEMMs computed as cuBLASLt is
//! asked for them (f32 accumulation, the fused epilogue, one rounding to storage).
//!
//! Memory is host memory. Every allocation ends where an inaccessible page begins (its last bytes
//! up to a multiple of 16 are a canary, checked after each launch), and every pointer argument of
//! a launch must lie in a live allocation: a kernel that reads or writes past a buffer, or a
//! launch wired to the wrong address, fails the op with a message naming the buffer.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Result};
use mira::engine::backend::cuda::gemm::Epilogue;
use mira::engine::backend::cuda::graph::Op;
use mira::engine::backend::cuda::kernels::{KernelFile, Storage, COMMON};
use mira::engine::backend::cuda::launch::{Arg, Launch};
use mira::engine::backend::cuda::{KernelBackend, KernelDevice};

const PAGE: usize = 4096;
const CANARY: u8 = 0xa5;

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    u32,
    *mut *mut c_void,
    *mut c_char,
    usize,
) -> i32;

/// One storage type's kernels, compiled for the host and loaded.
struct Library {
    _lib: libloading::Library,
    launch: LaunchFn,
}

/// The emulator's C++ translation unit for `storage`: every kernel file, one registration per
/// entry point, the exported launch function.
fn program(storage: Storage) -> String {
    let mut body = COMMON.to_string();
    let mut entries = Vec::new();
    for file in KernelFile::ALL {
        body += &format!("// ---- kernels/{}.cu\n{}", file.name(), file.source_file());
        entries.extend(file.entry_points(storage));
    }
    wrap(storage, &body, &entries)
}

/// `body` (CUDA C++) as an emulator translation unit exporting `entries`.
fn wrap(storage: Storage, body: &str, entries: &[String]) -> String {
    let mut src = format!("{}#include \"cuda_emu.h\"\n{body}", storage.define());
    for e in entries {
        src += &format!("MIRA_EMU_ENTRY({e})\n");
    }
    src + "MIRA_EMU_RUNTIME\n"
}

fn header_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu")
}

/// The host C++ compiler (`CXX`, else `g++`), if it runs.
pub fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(cxx)
}

/// Compile (once per source, cached under the target directory) and load.
fn build(storage: Storage, src: &str) -> Result<Library> {
    let cxx = compiler().ok_or_else(|| anyhow!("no C++ compiler (set CXX or install g++)"))?;
    let header = std::fs::read_to_string(header_dir().join("cuda_emu.h"))?;
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (src, &header, &cxx).hash(&mut h);
        h.finish()
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
    std::fs::create_dir_all(&dir)?;
    let lib = dir.join(format!("kernels-{}-{key:016x}.so", storage.name()));
    if !lib.exists() {
        // Unique names while building: threads and test processes may build the same library
        // at once, and the last rename wins with identical contents.
        static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unique = format!("{}-{n}", std::process::id());
        let cpp = dir.join(format!(
            "kernels-{}-{key:016x}-{unique}.cpp",
            storage.name()
        ));
        std::fs::write(&cpp, src)?;
        let tmp = lib.with_extension(format!("{unique}.tmp"));
        let out = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-fPIC",
                "-shared",
                "-fno-strict-aliasing",
            ])
            .args(["-fvisibility=hidden", "-fno-gnu-unique"])
            .args(["-Wall", "-Wno-unknown-pragmas", "-Werror"])
            .arg("-I")
            .arg(header_dir())
            .arg(&cpp)
            .arg("-o")
            .arg(&tmp)
            .output()?;
        ensure!(
            out.status.success(),
            "{cxx} cannot compile the kernels ({}) for the emulator:\n{}",
            storage.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &lib)?;
        let _ = std::fs::remove_file(&cpp);
    }
    // SAFETY: the library's initialisers only register entry points.
    let loaded = unsafe { libloading::Library::new(&lib) }?;
    // SAFETY: MIRA_EMU_RUNTIME defines mira_emu_launch with this signature.
    let launch = unsafe { *loaded.get::<LaunchFn>(b"mira_emu_launch\0")? };
    Ok(Library {
        _lib: loaded,
        launch,
    })
}

/// The kernels for `storage`, built once per process.
fn library(storage: Storage) -> Result<&'static Library> {
    static LIBS: OnceLock<Mutex<BTreeMap<&'static str, &'static Library>>> = OnceLock::new();
    let mut libs = LIBS.get_or_init(Default::default).lock().unwrap();
    if let Some(l) = libs.get(storage.name()) {
        return Ok(l);
    }
    let l: &'static Library = Box::leak(Box::new(build(storage, &program(storage))?));
    libs.insert(storage.name(), l);
    Ok(l)
}

/// Host memory that ends where an inaccessible page begins, so a kernel reading or writing past
/// it faults (the emulator turns that into a launch error); the last bytes up to a multiple of
/// 16 (the alignment every allocation has) hold a canary, checked after each launch.
pub struct Mem {
    map: *mut u8,
    map_len: usize,
    ptr: *mut u8,
    live: Arc<Mutex<Live>>,
}

// SAFETY: the memory is only touched through launches, which are serialised, and the methods
// below, which copy in or out under the caller's ordering (as device memory would be).
unsafe impl Send for Mem {}
unsafe impl Sync for Mem {}

impl Drop for Mem {
    fn drop(&mut self) {
        self.live.lock().unwrap().remove(&(self.ptr as u64));
        // SAFETY: mapped in `alloc_mem` with this length.
        unsafe { libc::munmap(self.map as *mut c_void, self.map_len) };
    }
}

/// Live allocations: address -> (bytes, what).
type Live = BTreeMap<u64, (usize, String)>;

/// Bytes up to the allocation's end (the alignment every allocation has).
fn padded(bytes: usize) -> usize {
    bytes.next_multiple_of(16).max(16)
}

pub struct EmuDevice {
    storage: Storage,
    lib: &'static Library,
    live: Arc<Mutex<Live>>,
    /// Refuse to capture graphs (as a driver might), for the fallback test.
    pub refuse_graphs: std::sync::atomic::AtomicBool,
}

impl EmuDevice {
    pub fn new(storage: Storage) -> Result<EmuDevice> {
        Ok(EmuDevice {
            storage,
            lib: library(storage)?,
            live: Arc::default(),
            refuse_graphs: Default::default(),
        })
    }

    /// A device whose kernels are `body` (after kernels/common.cuh) with entry points
    /// `entries`, run with [`EmuDevice::run`]: for testing the emulator itself.
    pub fn custom(storage: Storage, body: &str, entries: &[&str]) -> Result<EmuDevice> {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        let src = wrap(storage, &format!("{COMMON}{body}"), &entries);
        Ok(EmuDevice {
            storage,
            lib: Box::leak(Box::new(build(storage, &src)?)),
            live: Arc::default(),
            refuse_graphs: Default::default(),
        })
    }

    /// Upload f32 values as raw f32 (whatever the storage), returning the memory and address.
    pub fn upload_f32(&self, values: &[f32]) -> (Mem, u64) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(&bytes, "test buffer").unwrap()
    }

    /// `n` f32 values at `ptr`.
    pub fn read_f32(&self, ptr: u64, n: usize) -> Vec<f32> {
        // SAFETY: test buffers hold the values they are read for.
        let bytes = unsafe { self.download(ptr, 4 * n) }.unwrap();
        Storage::F32.decode(&bytes)
    }

    /// Run entry point `name` over `grid` blocks of `block` threads: the launch behind
    /// [`KernelDevice::launch`], with its checks (pointer arguments in live allocations, guards
    /// intact afterwards).
    ///
    /// # Safety
    /// The arguments address memory of the sizes the kernel uses.
    pub unsafe fn run(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        {
            let live = self.live.lock().unwrap();
            for (i, a) in args.iter().enumerate() {
                if let Arg::Ptr(p) = *a {
                    ensure!(
                        p == 0 || Self::owner(&live, p).is_some(),
                        "{name}: argument {i} ({p:#x}) is not in any live allocation"
                    );
                }
            }
        }
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let grid = [grid.0, grid.1, grid.2];
        let cname = CString::new(name).unwrap();
        let mut err = vec![0u8; 512];
        // SAFETY: the caller's contract; values are little-endian in 8-byte slots, as the
        // kernel reads them. (The emulator's state is per OS thread: launches may overlap.)
        let rc = unsafe {
            (self.lib.launch)(
                cname.as_ptr(),
                grid.as_ptr(),
                block,
                ptrs.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            let msg = String::from_utf8_lossy(&err[..end]).into_owned();
            // Name the allocation a fault ran off the end of.
            let owner = msg
                .split("memory fault at 0x")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .and_then(|addr| self.fault_owner(addr));
            match owner {
                Some(o) => bail!("{name}: {msg}: {o}"),
                None => bail!("{name}: {msg}"),
            }
        }
        self.check_guards(name)
    }

    fn alloc_mem(&self, bytes: usize, what: &str) -> Mem {
        let data = padded(bytes).next_multiple_of(PAGE);
        let map_len = data + PAGE;
        // SAFETY: a fresh private anonymous mapping; its last page is made inaccessible.
        let map = unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(m != libc::MAP_FAILED, "cannot map {map_len} bytes");
            assert_eq!(libc::mprotect(m.add(data), PAGE, libc::PROT_NONE), 0);
            m as *mut u8
        };
        // SAFETY: data bytes are mapped; the allocation is its last padded(bytes).
        let ptr = unsafe { map.add(data - padded(bytes)) };
        // Uninitialised device memory: arbitrary bytes (0x5a), then the canary.
        // SAFETY: padded(bytes) bytes from ptr are mapped.
        unsafe {
            std::ptr::write_bytes(ptr, 0x5a, bytes);
            std::ptr::write_bytes(ptr.add(bytes), CANARY, padded(bytes) - bytes);
        }
        self.live
            .lock()
            .unwrap()
            .insert(ptr as u64, (bytes, what.to_string()));
        Mem {
            map,
            map_len,
            ptr,
            live: self.live.clone(),
        }
    }

    /// The allocation `ptr` points into, if any.
    fn owner(live: &Live, ptr: u64) -> Option<(u64, usize, &str)> {
        let (&base, (bytes, what)) = live.range(..=ptr).next_back()?;
        (ptr < base + *bytes as u64 || ptr == base).then_some((base, *bytes, what.as_str()))
    }

    /// `bytes` bytes from `p` lie in one live allocation.
    fn check_live(&self, p: u64, bytes: usize, what: &str) -> Result<()> {
        let live = self.live.lock().unwrap();
        match Self::owner(&live, p) {
            Some((base, len, _)) if p + bytes as u64 <= base + len as u64 => Ok(()),
            _ => bail!("{what} of {bytes} bytes at {p:#x}: not within a live buffer"),
        }
    }

    fn check_guards(&self, after: &str) -> Result<()> {
        for (&base, (bytes, what)) in self.live.lock().unwrap().iter() {
            let pad = padded(*bytes) - bytes;
            // SAFETY: a live allocation's canary bytes.
            let canary =
                unsafe { std::slice::from_raw_parts((base + *bytes as u64) as *const u8, pad) };
            if let Some(at) = canary.iter().position(|&b| b != CANARY) {
                bail!(
                    "{after} wrote past the end of {what} ({bytes} bytes), at byte {}",
                    bytes + at
                );
            }
        }
        Ok(())
    }

    /// For a memory fault at `addr`: the allocation whose end it lies just past.
    fn fault_owner(&self, addr: u64) -> Option<String> {
        let live = self.live.lock().unwrap();
        live.iter().find_map(|(&base, (bytes, what))| {
            let end = base + padded(*bytes) as u64;
            (addr >= end && addr < end + PAGE as u64)
                .then(|| format!("byte {} of {what} ({bytes} bytes)", addr - base))
        })
    }
}

impl KernelDevice for EmuDevice {
    type Mem = Mem;
    type BatchMem = Mem;
    /// The recorded ops, run in order at each launch (every pointer argument is checked against
    /// the live allocations then, so a graph that outlives memory it uses fails).
    type Graph = Vec<Op>;

    fn describe(&self) -> String {
        format!(
            "cuda-emu ({} storage, kernels/*.cu on the CPU)",
            self.storage.name()
        )
    }

    fn storage(&self) -> Storage {
        self.storage
    }

    /// A small device: grid-stride kernels get few blocks, so their loops go round.
    fn multiprocessors(&self) -> u32 {
        2
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<(Mem, u64)> {
        let m = self.alloc_mem(bytes, what);
        let p = m.ptr as u64;
        Ok((m, p))
    }

    unsafe fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.check_live(ptr, bytes, "memset")?;
        // SAFETY: within a live allocation (checked above).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, byte, bytes) };
        Ok(())
    }

    fn upload(&self, bytes: &[u8], what: &str) -> Result<(Mem, u64)> {
        let m = self.alloc_mem(bytes.len(), what);
        // SAFETY: m holds bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), m.ptr, bytes.len()) };
        let p = m.ptr as u64;
        Ok((m, p))
    }

    fn upload_batch(&self, n: usize, fill: &mut dyn FnMut(&mut [u32])) -> Result<(Mem, u64)> {
        let mut host = vec![0u32; n];
        fill(&mut host);
        let bytes: Vec<u8> = host.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(&bytes, "batch index data")
    }

    unsafe fn launch(&self, l: &Launch) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.run(&l.entry.name(), l.grid, l.block, &l.args) }
    }

    unsafe fn gemm(
        &self,
        x: u64,
        w: u64,
        bias: Option<u64>,
        out: u64,
        (m, n, k): (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()> {
        let s = self.storage;
        let e = s.bytes();
        self.check_live(x, m * k * e, "gemm input")?;
        self.check_live(w, n * k * e, "gemm weight")?;
        self.check_live(out, m * n * e, "gemm output")?;
        if let Some(b) = bias {
            self.check_live(b, n * e, "gemm bias")?;
        }
        let read = |p: u64, len: usize| {
            // SAFETY: the caller's contract: p addresses len values.
            s.decode(unsafe { std::slice::from_raw_parts(p as *const u8, len * s.bytes()) })
        };
        // f32 accumulation, the fused epilogue in f32, one rounding to storage: what cuBLASLt
        // is asked for. Each output is a function of its row and column alone (as it is for one
        // cuBLASLt algorithm), so a document's values do not depend on the batch around it.
        let (xs, ws) = (read(x, m * k), read(w, n * k));
        let bs = bias.map(|b| read(b, n));
        let mut y = vec![0f32; m * n];
        let rows_per = m.div_ceil(2).max(1);
        std::thread::scope(|scope| {
            for (part, ys) in y.chunks_mut(rows_per * n).enumerate() {
                let (xs, ws, bs) = (&xs, &ws, &bs);
                scope.spawn(move || {
                    for (r, yr) in ys.chunks_mut(n).enumerate() {
                        let xr = &xs[(part * rows_per + r) * k..][..k];
                        for (j, out) in yr.iter_mut().enumerate() {
                            let mut v = dot(xr, &ws[j * k..][..k]);
                            if let Some(b) = bs {
                                v += b[j];
                            }
                            *out = epilogue_act(epilogue, v);
                        }
                    }
                });
            }
        });
        let bytes = s.encode(&y);
        // SAFETY: the caller's contract: out addresses m·n values.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out as *mut u8, bytes.len()) };
        Ok(())
    }

    unsafe fn download(&self, ptr: u64, bytes: usize) -> Result<Vec<u8>> {
        // SAFETY: the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts(ptr as *const u8, bytes) }.to_vec())
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.check_live(dst, bytes, "copy destination")?;
        self.check_live(src, bytes, "copy source")?;
        // SAFETY: both ranges lie in live allocations (checked above).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn graph(&self, ops: &[Op]) -> Result<Vec<Op>> {
        if self
            .refuse_graphs
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            bail!("stream capture refused (emulated)");
        }
        Ok(ops.to_vec())
    }

    unsafe fn launch_graph(&self, graph: &Vec<Op>) -> Result<()> {
        for op in graph {
            // SAFETY: the caller's contract: the ops' memory is alive.
            unsafe {
                match op {
                    Op::Launch(l) => self.launch(l)?,
                    Op::Gemm {
                        x,
                        w,
                        bias,
                        out,
                        mnk,
                        epilogue,
                    } => self.gemm(*x, *w, *bias, *out, *mnk, *epilogue)?,
                    Op::Memset { ptr, byte, bytes } => self.memset(*ptr, *byte, *bytes)?,
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn concurrency(&self) -> usize {
        1
    }
}

/// A dot product in f32, eight lanes at a time.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// cuBLASLt's fused activation: ReLU, or GELU in its tanh form.
fn epilogue_act(epilogue: Epilogue, v: f32) -> f32 {
    match epilogue {
        Epilogue::Relu | Epilogue::ReluBias => v.max(0.0),
        Epilogue::GeluTanh | Epilogue::GeluTanhBias => {
            0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh())
        }
        Epilogue::Default | Epilogue::Bias => v,
    }
}

/// The CUDA backend's ops on the emulator, outputs poisoned with NaN.
pub fn backend(storage: Storage) -> KernelBackend<EmuDevice> {
    let be = KernelBackend::on(EmuDevice::new(storage).unwrap_or_else(|e| panic!("{e:#}")));
    be.set_poison(true);
    be
}

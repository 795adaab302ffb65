//! The CUDA kernel sources, embedded at build time, and their compilation to PTX with NVRTC
//! (through cudarc, loading `libnvrtc.so.13` at run time: no CUDA toolkit at build time).
//!
//! A program is `#define MIRA_<STORAGE>` + `kernels/common.cuh` + one kernel file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Result};

/// Storage type of weights and activations in device memory (arithmetic is f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    Bf16,
    F16,
    F32,
}

impl Storage {
    pub const ALL: [Storage; 3] = [Storage::Bf16, Storage::F16, Storage::F32];
    /// The line that selects this storage type in a kernel program.
    pub fn define(self) -> &'static str {
        match self {
            Storage::Bf16 => "#define MIRA_BF16 1\n",
            Storage::F16 => "#define MIRA_F16 1\n",
            Storage::F32 => "#define MIRA_F32 1\n",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Storage::Bf16 => "bf16",
            Storage::F16 => "f16",
            Storage::F32 => "f32",
        }
    }

    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 | Storage::F16 => 2,
        }
    }

    /// f32 values as stored (little-endian, rounded to nearest even).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
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

    /// Stored values back to f32.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
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
}

/// One `.cu` file of `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFile {
    LayerNorm,
    Activation,
    Attention,
    /// Tensor-core attention (bf16/f16 storage only).
    AttentionTc,
    Rope,
    Pool,
}

pub const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// Head sizes `attention_tc.cu` has entry points for (`attention_tc_d{D}`, bf16/f16 storage).
pub const ATTENTION_TC_HEAD_DIMS: [usize; 6] = [16, 32, 64, 80, 96, 128];

/// Head sizes `attention.cu` has entry points for (`attention_d{D}`, `attention_rel_d{D}`).
pub const ATTENTION_HEAD_DIMS: [usize; 7] = [8, 16, 32, 64, 80, 96, 128];

impl KernelFile {
    pub const ALL: [KernelFile; 6] = [
        KernelFile::LayerNorm,
        KernelFile::Activation,
        KernelFile::Attention,
        KernelFile::AttentionTc,
        KernelFile::Rope,
        KernelFile::Pool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelFile::LayerNorm => "layernorm",
            KernelFile::Activation => "activation",
            KernelFile::Attention => "attention",
            KernelFile::AttentionTc => "attention_tc",
            KernelFile::Rope => "rope",
            KernelFile::Pool => "pool",
        }
    }

    pub fn source_file(self) -> &'static str {
        match self {
            KernelFile::LayerNorm => include_str!("../../../../kernels/layernorm.cu"),
            KernelFile::Activation => include_str!("../../../../kernels/activation.cu"),
            KernelFile::Attention => include_str!("../../../../kernels/attention.cu"),
            KernelFile::AttentionTc => include_str!("../../../../kernels/attention_tc.cu"),
            KernelFile::Rope => include_str!("../../../../kernels/rope.cu"),
            KernelFile::Pool => include_str!("../../../../kernels/pool.cu"),
        }
    }

    /// The `extern "C"` entry points the file defines for `storage`.
    pub fn entry_points(self, storage: Storage) -> Vec<String> {
        match self {
            KernelFile::LayerNorm => vec![
                "embed_layernorm".into(),
                "layernorm".into(),
                "embed_layernorm_warp".into(),
                "layernorm_warp".into(),
            ],
            KernelFile::Activation => vec!["bias_act".into(), "geglu".into()],
            KernelFile::Attention => ATTENTION_HEAD_DIMS
                .iter()
                .flat_map(|d| [format!("attention_d{d}"), format!("attention_rel_d{d}")])
                .collect(),
            KernelFile::AttentionTc if storage == Storage::F32 => Vec::new(),
            KernelFile::AttentionTc => ATTENTION_TC_HEAD_DIMS
                .iter()
                .map(|d| format!("attention_tc_d{d}"))
                .collect(),
            KernelFile::Rope => vec!["rope".into()],
            KernelFile::Pool => vec!["pool".into()],
        }
    }

    /// The whole program for one storage type.
    pub fn program(self, storage: Storage) -> String {
        format!("{}{}{}", storage.define(), COMMON, self.source_file())
    }
}

/// Whether NVRTC (`libnvrtc.so.13` or a name cudarc accepts) can be loaded here.
pub fn nvrtc_present() -> bool {
    cudarc::get_lib_name_candidates("nvrtc").iter().any(|name| {
        // SAFETY: loading NVRTC runs no initialisers with preconditions; the handle is dropped.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Compile `file` for `storage` to PTX for `arch` (e.g. `"sm_90"`). Errors carry NVRTC's log.
pub fn compile_ptx(file: KernelFile, storage: Storage, arch: &'static str) -> Result<String> {
    compile_program(&file.program(storage), &format!("{}.cu", file.name()), arch)
        .map_err(|e| anyhow::anyhow!("kernels/{}.cu ({storage:?}): {e}", file.name()))
}

/// Compile one CUDA C++ program to PTX for `arch`; `name` appears in NVRTC's messages.
pub fn compile_program(source: &str, name: &str, arch: &'static str) -> Result<String> {
    if !nvrtc_present() {
        bail!(
            "NVRTC (libnvrtc.so.13) not found: install the CUDA 13 runtime compiler (e.g. the PyPI \
             wheel nvidia-cuda-nvrtc) and put its lib folder on LD_LIBRARY_PATH"
        );
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        name: Some(name.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => bail!("{name} does not compile for {arch}: {e:?}"),
    }
}

/// PTX compiled in this process, by (file, storage, architecture): a second backend on the same
/// kind of device (tests, `cuda:all`) compiles nothing.
type PtxCache = HashMap<(KernelFile, Storage, &'static str), Arc<String>>;

/// [`compile_ptx`], once per process for each (file, storage, architecture).
pub fn cached_ptx(file: KernelFile, storage: Storage, arch: &'static str) -> Result<Arc<String>> {
    static CACHE: OnceLock<Mutex<PtxCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().unwrap().get(&(file, storage, arch)) {
        return Ok(ptx.clone());
    }
    // Compiled outside the lock: files compile in parallel when several threads ask.
    let ptx = Arc::new(compile_ptx(file, storage, arch)?);
    cache
        .lock()
        .unwrap()
        .insert((file, storage, arch), ptx.clone());
    Ok(ptx)
}

//! The on-device forward pass: ragged batches, the backend interface and the backends, the
//! device registry (`device`) and the worker pool that runs batches on several engines
//! (`pool`), and the host values weights arrive in (`host_f32`). This file holds the types they
//! share.

pub mod backend;
pub mod batch;
pub mod device;
pub mod host_f32;
pub mod pool;

use anyhow::{bail, Result};

pub use backend::{Backend, GraphStats, LinearKind};
pub use batch::{Batch, Packer};
pub use device::{default_packer, list_devices, resolve, BackendOptions, Device, OnBackend};
pub use host_f32::HostF32;

/// Storage precision of weights and activations on the device (arithmetic is f32 except under
/// `Int8`). On the CPU, bf16 and f16 round the weights and compute in f32 (see
/// `backend::cpu::CpuPrecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// The fastest the device stores accurately enough: f16 on CUDA; on wgpu f16 where the
    /// adapter offers `SHADER_F16`, else f32; f32 on the CPU.
    #[default]
    Auto,
    F32,
    F16,
    /// bfloat16 (CUDA; emulated on the CPU): f32's range with 8 significant bits.
    Bf16,
    /// CPU only: encoder linear layers with int8 weights (a scale per channel and 64 inputs),
    /// 8-bit activations (a scale and zero per token and 64 inputs), exact i32 sums per group.
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Precision> {
        Ok(match s {
            "auto" => Precision::Auto,
            "f32" => Precision::F32,
            "f16" => Precision::F16,
            "bf16" => Precision::Bf16,
            "int8" => Precision::Int8,
            other => bail!("invalid precision '{other}' (expected auto, f32, f16, bf16 or int8)"),
        })
    }
}

/// Element-wise activation fused into a `linear` epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))` (Hugging Face `"gelu"`).
    Gelu,
    /// Tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    Relu,
    Silu,
    Tanh,
}

impl Activation {
    /// Every activation (for tests that cover them all).
    pub const ALL: [Activation; 6] = [
        Activation::None,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
        Activation::Silu,
        Activation::Tanh,
    ];

    /// The code backends' kernels switch on (`activate` in the WGSL and CUDA sources, `math.rs`):
    /// 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu, 4 silu, 5 tanh.
    pub fn code(self) -> u8 {
        match self {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
            Activation::Silu => 4,
            Activation::Tanh => 5,
        }
    }

    /// Map a Hugging Face `hidden_act` string faithfully.
    pub fn from_hf(name: &str) -> Result<Activation> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            other => bail!(
                "unsupported hidden_act '{other}' (supported: gelu, gelu_new, gelu_pytorch_tanh, \
                 gelu_fast, relu, silu, swish, tanh)"
            ),
        })
    }
}

/// How token states become one vector per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's state (`[CLS]`).
    Cls,
    /// The mean over all tokens of the sequence.
    Mean,
    /// Both, side by side: `[CLS | mean]`, twice the hidden width. What `mira select` reads
    /// when its students' heads read different features of one shared encoder.
    ClsAndMean,
}

impl Pooling {
    /// Values per sequence for hidden width `h`.
    pub fn width(self, h: usize) -> usize {
        match self {
            Pooling::Cls | Pooling::Mean => h,
            Pooling::ClsAndMean => 2 * h,
        }
    }
}

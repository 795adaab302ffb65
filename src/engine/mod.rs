//! The on-device forward pass: ragged batches, the backend interface and the backends.

pub mod backend;
pub mod batch;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

pub use backend::wgpu::Precision;
pub use backend::Backend;
pub use batch::{Batch, Packer};

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
}

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The fastest backend available here: CUDA, then wgpu, then CPU.
    Auto,
    Cpu,
    /// A wgpu adapter; `None` picks the best one.
    Wgpu(Option<usize>),
    /// A CUDA device by ordinal; `None` is device 0.
    Cuda(Option<usize>),
}

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Device> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => {
                let n: usize = n.parse().map_err(|_| {
                    anyhow::anyhow!("invalid device '{s}': '{n}' is not a device number")
                })?;
                (k, Some(n))
            }
            None => (s, None),
        };
        Ok(match (kind, ordinal) {
            ("auto", None) => Device::Auto,
            ("cpu", None) => Device::Cpu,
            ("wgpu", n) => Device::Wgpu(n),
            ("cuda", n) => Device::Cuda(n),
            _ => bail!("invalid device '{s}' (expected auto, cpu, wgpu[:N] or cuda[:N])"),
        })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Wgpu(None) => write!(f, "wgpu"),
            Device::Wgpu(Some(n)) => write!(f, "wgpu:{n}"),
            Device::Cuda(None) => write!(f, "cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The packing that suits a device. On CPU a batch of ~4K tokens keeps each layer's activations
/// (at most `4096 × intermediate` floats) near the caches; measured on all-MiniLM-L6-v2, 8K-token
/// batches were ~20% slower and 2K-4K the fastest (BENCHMARKS.md).
pub fn default_packer(device: Device) -> Packer {
    match device {
        Device::Cpu | Device::Auto => Packer {
            max_batch_tokens: 4096,
            ..Packer::default()
        },
        Device::Wgpu(_) | Device::Cuda(_) => Packer::default(),
    }
}

/// One line per backend: whether it is usable here and what it found.
pub fn list_devices() -> Vec<(String, String)> {
    vec![(
        "cpu".into(),
        format!(
            "available: {} threads, {}",
            rayon::current_num_threads(),
            backend::cpu::simd_level()
        ),
    )]
    .into_iter()
    .chain(wgpu_devices())
    .chain([(
        "cuda".into(),
        "not built: the CUDA backend is not part of this build yet".into(),
    )])
    .collect()
}

/// One line per wgpu adapter (`wgpu:N`), or one saying why there is none.
fn wgpu_devices() -> Vec<(String, String)> {
    let adapters = backend::wgpu::adapters();
    if adapters.is_empty() {
        return vec![(
            "wgpu".into(),
            "no adapter found (no Vulkan, Metal, DX12 or GL driver; on Linux without a GPU: \
             apt-get install mesa-vulkan-drivers libvulkan1)"
                .into(),
        )];
    }
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("wgpu:{i}"), backend::wgpu::describe(a)))
        .collect()
}

/// Whether a wgpu adapter that beats the CPU backend exists: a real GPU, not a software
/// rasteriser such as lavapipe (which `--device wgpu` still accepts).
fn hardware_wgpu_adapter() -> Option<String> {
    backend::wgpu::adapters().into_iter().find_map(|a| {
        let info = a.get_info();
        let usable = backend::wgpu::unusable_reason(&a.limits()).is_none();
        (usable && info.device_type != ::wgpu::DeviceType::Cpu)
            .then(|| format!("{} ({:?})", info.name, info.backend))
    })
}

/// Resolve `Auto` to a concrete device and refuse devices this build cannot run.
/// Returns the device and a note explaining an automatic choice.
pub fn resolve(device: Device) -> Result<(Device, Option<String>)> {
    match device {
        Device::Auto => Ok(match hardware_wgpu_adapter() {
            Some(gpu) => (
                Device::Wgpu(None),
                Some(format!(
                    "device auto: chose wgpu on {gpu} (this build has no CUDA backend)"
                )),
            ),
            None => (
                Device::Cpu,
                Some(
                    "device auto: chose cpu (no CUDA backend in this build, no hardware wgpu \
                     adapter found)"
                        .into(),
                ),
            ),
        }),
        Device::Cpu | Device::Wgpu(_) => Ok((device, None)),
        Device::Cuda(_) => bail!(
            "device '{device}' is not available: this build of mira has no CUDA backend \
             (use --device cpu)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_round_trip() {
        for s in ["auto", "cpu", "wgpu", "wgpu:1", "cuda", "cuda:3"] {
            assert_eq!(s.parse::<Device>().unwrap().to_string(), s);
        }
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("cpu:1".parse::<Device>().is_err());
    }

    #[test]
    fn absent_backends_fail_clearly() {
        let msg = resolve(Device::Cuda(Some(0))).unwrap_err().to_string();
        assert!(
            msg.contains("cuda:0") && msg.contains("no CUDA backend"),
            "{msg}"
        );
        let (chosen, note) = resolve(Device::Auto).unwrap();
        assert!(matches!(chosen, Device::Cpu | Device::Wgpu(None)));
        assert!(note.unwrap().contains(&format!("chose {}", chosen)));
    }
}

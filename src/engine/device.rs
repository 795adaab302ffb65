//! The device registry: the one place that knows every backend. It parses device specs
//! (`auto|cpu|wgpu[:N]|cuda[:N]|cuda:all`), lists what is present, resolves `auto`, expands
//! `cuda:all` into one device per usable GPU, and constructs backends with their options. Code
//! above the engine (models, the scorer, benchmarks) sees only [`Device`], [`BackendOptions`]
//! and the [`Backend`] trait.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

use super::backend::cpu::CpuBackend;
use super::backend::cuda::CudaBackend;
use super::backend::wgpu::WgpuBackend;
use super::backend::{self, Backend};
use super::{Packer, Precision};

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
    /// Every usable CUDA device, one engine each, fed from one reader (`cuda:all`).
    CudaAll,
}

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Device> {
        if s == "cuda:all" {
            return Ok(Device::CudaAll);
        }
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
            _ => bail!("invalid device '{s}' (expected auto, cpu, wgpu[:N], cuda[:N] or cuda:all)"),
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
            Device::CudaAll => write!(f, "cuda:all"),
        }
    }
}

/// How a backend is built: storage precision (see `Precision` for the CPU's meaning) and, on CUDA, the
/// largest batch (in tokens) run as a CUDA graph (0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendOptions {
    pub precision: Precision,
    pub cuda_graph_tokens: usize,
}

/// Something built on a backend once it exists, whatever its type (a model, in practice):
/// [`build_on`] makes the backend and hands it over.
pub trait OnBackend {
    type Output;
    fn build<B: Backend>(&self, backend: B) -> Result<Self::Output>;
}

/// Build `what` on the backend of one concrete device (not `auto` or `cuda:all`: see
/// [`resolve`] and [`expand`]).
pub fn build_on<W: OnBackend>(device: Device, opts: BackendOptions, what: &W) -> Result<W::Output> {
    match device {
        Device::Cpu => what.build(CpuBackend::new(opts.precision)),
        Device::Wgpu(n) => what.build(WgpuBackend::new(n, opts.precision)?),
        Device::Cuda(n) => {
            let be = CudaBackend::new(n.unwrap_or(0), opts.precision)?;
            be.set_graph_tokens(opts.cuda_graph_tokens);
            what.build(be)
        }
        Device::Auto | Device::CudaAll => bail!(
            "device {device} names several or no device: resolve and expand it to one per engine"
        ),
    }
}

/// The concrete devices `device` stands for, one engine each: every usable CUDA device for
/// `cuda:all`, else the device itself.
pub fn expand(device: Device) -> Result<Vec<Device>> {
    Ok(match device {
        Device::CudaAll => backend::cuda::device::devices()?
            .iter()
            .filter(|d| backend::cuda::device::unusable_reason(d.capability).is_none())
            .map(|d| Device::Cuda(Some(d.ordinal)))
            .collect(),
        one => vec![one],
    })
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
        Device::Wgpu(_) | Device::Cuda(_) | Device::CudaAll => Packer::default(),
    }
}

/// One line per backend: whether it is usable here and what it found.
pub fn list_devices() -> Vec<(String, String)> {
    vec![(
        "cpu".into(),
        format!(
            "available: {} threads, {} (cpu features: {}; int8 kernel: {}; bf16: {}; f16: \
             emulated)",
            rayon::current_num_threads(),
            backend::cpu::simd_level(),
            backend::cpu::cpu_features(),
            backend::cpu::int8::Kernel::best().name(),
            backend::cpu::bf16::Kernel::vector()
                .map_or("emulated", backend::cpu::bf16::Kernel::name)
        ),
    )]
    .into_iter()
    .chain(wgpu_devices())
    .chain(cuda_devices())
    .collect()
}

/// What `precision` means on `device` when it is not what the name says (the CPU emulates bf16
/// and f16 and runs int8 with its own kernels): a note for stderr.
pub fn precision_note(device: Device, precision: Precision) -> Option<String> {
    match device {
        Device::Cpu => CpuBackend::precision_note(precision),
        _ => None,
    }
}

/// Why `cuda` / `cuda:N` cannot run here, or `None` when it can.
pub fn cuda_unavailable(ordinal: Option<usize>) -> Option<String> {
    backend::cuda::device::unavailable_reason(ordinal)
}

/// One line per CUDA device (`cuda:N`), or one saying why there is none.
fn cuda_devices() -> Vec<(String, String)> {
    match backend::cuda::device::devices() {
        Ok(list) if !list.is_empty() => {
            let missing = backend::cuda::device::missing_runtime_library();
            list.iter()
                .map(|d| {
                    let mut line = d.describe();
                    if let Some(lib) = missing {
                        line += &format!(" (but {lib} was not found)");
                    }
                    (format!("cuda:{}", d.ordinal), line)
                })
                .collect()
        }
        Ok(_) => vec![("cuda".into(), "the CUDA driver sees no device".into())],
        Err(e) => vec![("cuda".into(), format!("not available: {e}"))],
    }
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

/// Resolve `Auto` to a concrete device (CUDA, then a hardware wgpu adapter, then CPU) and refuse
/// devices that cannot run here, saying why. Returns the device and a note explaining an
/// automatic choice.
pub fn resolve(device: Device) -> Result<(Device, Option<String>)> {
    match device {
        Device::Auto => {
            let no_cuda = match cuda_unavailable(None) {
                None => {
                    let name = backend::cuda::device::devices()?
                        .first()
                        .map_or(String::new(), |d| format!(" ({})", d.name));
                    return Ok((
                        Device::Cuda(None),
                        Some(format!("device auto: chose cuda:0{name}")),
                    ));
                }
                Some(why) => why,
            };
            Ok(match hardware_wgpu_adapter() {
                Some(gpu) => (
                    Device::Wgpu(None),
                    Some(format!(
                        "device auto: chose wgpu on {gpu} (no usable CUDA device: {no_cuda})"
                    )),
                ),
                None => (
                    Device::Cpu,
                    Some(format!(
                        "device auto: chose cpu (no usable CUDA device: {no_cuda}; no hardware \
                         wgpu adapter found)"
                    )),
                ),
            })
        }
        Device::Cpu | Device::Wgpu(_) => Ok((device, None)),
        Device::CudaAll => match cuda_unavailable(None) {
            None => Ok((device, None)),
            Some(why) => {
                bail!("device 'cuda:all' is not available: {why} (use --device auto, wgpu or cpu)")
            }
        },
        Device::Cuda(n) => match cuda_unavailable(n) {
            None => Ok((device, None)),
            Some(why) => {
                bail!("device '{device}' is not available: {why} (use --device auto, wgpu or cpu)")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_round_trip() {
        for s in [
            "auto", "cpu", "wgpu", "wgpu:1", "cuda", "cuda:3", "cuda:all",
        ] {
            assert_eq!(s.parse::<Device>().unwrap().to_string(), s);
        }
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("cpu:1".parse::<Device>().is_err());
    }

    #[test]
    fn absent_backends_fail_clearly() {
        let cuda = cuda_unavailable(Some(0));
        if let Some(why) = &cuda {
            let msg = resolve(Device::Cuda(Some(0))).unwrap_err().to_string();
            assert!(
                msg.contains("cuda:0") && msg.contains(why.as_str()),
                "{msg}"
            );
        }
        if cuda.is_some() {
            let msg = resolve(Device::CudaAll).unwrap_err().to_string();
            assert!(msg.contains("cuda:all' is not available"), "{msg}");
        }
        let msg = resolve(Device::Cuda(Some(4096))).unwrap_err().to_string();
        assert!(msg.contains("cuda:4096' is not available"), "{msg}");
        let (chosen, note) = resolve(Device::Auto).unwrap();
        let note = note.unwrap();
        assert!(note.contains(&format!("chose {}", chosen)), "{note}");
        if cuda.is_some() {
            assert!(matches!(chosen, Device::Cpu | Device::Wgpu(None)));
            assert!(note.contains("no usable CUDA device"), "{note}");
        } else {
            assert_eq!(chosen, Device::Cuda(None));
        }
    }

    #[test]
    fn one_engine_per_concrete_device() {
        assert_eq!(expand(Device::Cpu).unwrap(), vec![Device::Cpu]);
        assert_eq!(
            expand(Device::Wgpu(Some(1))).unwrap(),
            vec![Device::Wgpu(Some(1))]
        );
        struct Name;
        impl OnBackend for Name {
            type Output = String;
            fn build<B: Backend>(&self, backend: B) -> Result<String> {
                Ok(backend.name())
            }
        }
        let opts = BackendOptions::default();
        assert!(build_on(Device::Cpu, opts, &Name)
            .unwrap()
            .starts_with("cpu"));
        assert!(build_on(Device::Auto, opts, &Name).is_err());
        assert!(build_on(Device::CudaAll, opts, &Name).is_err());
    }
}

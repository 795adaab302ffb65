//! Adapter choice for the wgpu backend: which adapters exist (Vulkan, Metal, DX12, then GL),
//! which one `wgpu` or `wgpu:N` means, whether its limits can run the shaders, and how it is
//! described to the user.

use anyhow::{anyhow, bail, ensure, Result};

/// Limits below these cannot run the shaders (16×16 GEMM workgroups, 256-wide row reductions,
/// 16 KiB of workgroup memory for attention tiles).
const MIN_INVOCATIONS: u32 = 256;
const MIN_WORKGROUP_STORAGE: u32 = 16 * 1024;

/// The adapters of some APIs (an instance of only those: a GL instance alone prints EGL noise on
/// headless machines).
fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    pollster::block_on(wgpu::Instance::new(desc).enumerate_adapters(backends))
}

/// The adapters wgpu finds here, in a stable order (`wgpu:N` indexes this list): those of the
/// native APIs (Vulkan, Metal, DX12), or the GL ones where there are none. `WGPU_BACKEND` (e.g.
/// `gl`, `vulkan`) overrides the choice.
pub fn adapters() -> Vec<wgpu::Adapter> {
    if let Some(b) = wgpu::Backends::from_env() {
        return enumerate(b);
    }
    let native = enumerate(wgpu::Backends::PRIMARY);
    if native.is_empty() {
        enumerate(wgpu::Backends::SECONDARY)
    } else {
        native
    }
}

/// Rank of an adapter for `--device wgpu`: discrete GPUs first, then integrated, virtual and CPU
/// adapters; native APIs (Vulkan, Metal, DX12) before GL.
fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (kind, api)
}

/// Why an adapter cannot run mira's shaders, if it cannot.
pub fn unusable_reason(limits: &wgpu::Limits) -> Option<String> {
    if limits.max_compute_invocations_per_workgroup < MIN_INVOCATIONS
        || limits.max_compute_workgroup_size_x < MIN_INVOCATIONS
        || limits.max_compute_workgroup_size_y < 16
    {
        return Some(format!(
            "compute workgroups of {} invocations ({}×{}) are too small: mira needs 256 (256×16)",
            limits.max_compute_invocations_per_workgroup,
            limits.max_compute_workgroup_size_x,
            limits.max_compute_workgroup_size_y
        ));
    }
    if limits.max_compute_workgroup_storage_size < MIN_WORKGROUP_STORAGE {
        return Some(format!(
            "{} bytes of workgroup memory are too few: mira needs {MIN_WORKGROUP_STORAGE}",
            limits.max_compute_workgroup_storage_size
        ));
    }
    if limits.max_storage_buffers_per_shader_stage < 8 {
        return Some(format!(
            "{} storage buffers per stage are too few: mira needs 8",
            limits.max_storage_buffers_per_shader_stage
        ));
    }
    None
}

/// One line describing an adapter for `mira devices`.
pub fn describe(adapter: &wgpu::Adapter) -> String {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    let usable = match unusable_reason(&limits) {
        Some(why) => format!("unusable: {why}"),
        None => "usable".into(),
    };
    format!(
        "{} ({:?}, {:?}, driver {} {}); f16 {}; max storage binding {} MiB, max buffer {} MiB, \
         workgroup memory {} KiB; {usable}",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        if f16 { "yes" } else { "no" },
        limits.max_storage_buffer_binding_size >> 20,
        limits.max_buffer_size >> 20,
        limits.max_compute_workgroup_storage_size >> 10,
    )
}

/// Pick the adapter: `Some(n)` is entry n of [`adapters`], `None` the best usable one.
pub(super) fn choose(ordinal: Option<usize>) -> Result<wgpu::Adapter> {
    let mut all = adapters();
    if all.is_empty() {
        bail!(
            "no wgpu adapter found: install a Vulkan, Metal, DX12 or GL driver (on Linux without a \
             GPU, Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)"
        );
    }
    match ordinal {
        Some(n) => {
            ensure!(
                n < all.len(),
                "wgpu:{n} does not exist: this machine has {} wgpu adapter(s) (see `mira devices`)",
                all.len()
            );
            let adapter = all.swap_remove(n);
            if let Some(why) = unusable_reason(&adapter.limits()) {
                bail!(
                    "wgpu:{n} ({}) cannot run mira: {why}",
                    adapter.get_info().name
                );
            }
            Ok(adapter)
        }
        None => {
            let reasons: Vec<String> = all
                .iter()
                .filter_map(|a| {
                    unusable_reason(&a.limits()).map(|why| format!("{}: {why}", a.get_info().name))
                })
                .collect();
            all.retain(|a| unusable_reason(&a.limits()).is_none());
            all.sort_by_key(|a| preference(&a.get_info()));
            all.into_iter()
                .next()
                .ok_or_else(|| anyhow!("no usable wgpu adapter: {}", reasons.join("; ")))
        }
    }
}

//! Finding CUDA devices without assuming there are any: every question first checks that the
//! driver library loads (cudarc panics when a function of a missing library is called), then asks
//! the driver. Used by `mira devices`, `--device cuda[:N]` and `--device auto`.

use anyhow::{bail, Result};
use cudarc::driver::{result, sys};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub memory_bytes: usize,
    pub multiprocessors: i32,
}

impl DeviceInfo {
    /// One line for `mira devices`.
    pub fn describe(&self) -> String {
        let (major, minor) = self.capability;
        let usable = match unusable_reason(self.capability) {
            None => "usable".to_string(),
            Some(why) => format!("not usable: {why}"),
        };
        format!(
            "{}, sm_{major}{minor}, {} multiprocessors, {:.1} GiB; {usable}",
            self.name,
            self.multiprocessors,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// Whether attention_tc.cu runs on this compute capability (`mma.sync.m16n8k16` with bf16/f16
/// operands and `cp.async` need sm_80); older devices use attention.cu.
pub fn has_tensor_core_attention(capability: (i32, i32)) -> bool {
    capability.0 >= 8
}

/// Why a device of this compute capability cannot run mira's kernels, if it cannot.
/// The kernels use warp shuffles with masks and `cvt` to/from f16 (sm_70 and newer).
pub fn unusable_reason(capability: (i32, i32)) -> Option<String> {
    (capability.0 < 7).then(|| {
        format!(
            "compute capability {}.{} is older than 7.0 (Volta), which mira's kernels need",
            capability.0, capability.1
        )
    })
}

/// Whether the NVIDIA driver library (`libcuda.so.1`) can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; calls nothing in it.
    unsafe { sys::is_culib_present() }
}

/// Whether the other libraries the backend needs load: cuBLASLt and NVRTC (CUDA 13).
/// Returns the first missing one's name.
pub fn missing_runtime_library() -> Option<&'static str> {
    // SAFETY: as above, loading only.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Some("cuBLASLt (libcublasLt.so.13)");
    }
    if !super::kernels::nvrtc_present() {
        return Some("NVRTC (libnvrtc.so.13)");
    }
    None
}

/// The devices the driver sees, or why none can be listed.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    if !driver_present() {
        bail!("the NVIDIA driver library (libcuda.so.1) was not found on this machine");
    }
    result::init().map_err(|e| anyhow::anyhow!("the CUDA driver failed to initialise: {e:?}"))?;
    let count = result::device::get_count()
        .map_err(|e| anyhow::anyhow!("the CUDA driver cannot count devices: {e:?}"))?;
    (0..count)
        .map(|i| {
            let err = |e: result::DriverError| anyhow::anyhow!("cuda:{i}: {e:?}");
            let dev = result::device::get(i).map_err(err)?;
            let attr = |a: sys::CUdevice_attribute| {
                // SAFETY: `dev` came from cuDeviceGet.
                unsafe { result::device::get_attribute(dev, a) }.map_err(err)
            };
            use sys::CUdevice_attribute::*;
            Ok(DeviceInfo {
                ordinal: i as usize,
                // SAFETY: as above.
                name: result::device::get_name(dev).map_err(err)?,
                capability: (
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                // SAFETY: as above.
                memory_bytes: unsafe { result::device::total_mem(dev) }.map_err(err)?,
                multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            })
        })
        .collect()
}

/// Why `cuda:ordinal` (or the first device, for `None`) cannot be used here, if it cannot:
/// no driver, no such device, too old a device, or a missing runtime library.
pub fn unavailable_reason(ordinal: Option<usize>) -> Option<String> {
    let devices = match devices() {
        Ok(d) => d,
        Err(e) => return Some(e.to_string()),
    };
    let wanted = ordinal.unwrap_or(0);
    let Some(dev) = devices.get(wanted) else {
        return Some(if devices.is_empty() {
            "the CUDA driver is installed but sees no device".into()
        } else {
            format!(
                "there is no cuda:{wanted} ({} CUDA device{} here)",
                devices.len(),
                if devices.len() == 1 { "" } else { "s" }
            )
        });
    };
    if let Some(why) = unusable_reason(dev.capability) {
        return Some(format!("cuda:{wanted} ({}): {why}", dev.name));
    }
    missing_runtime_library().map(|lib| {
        format!(
            "{lib} was not found (it ships with the CUDA 13 toolkit and in the PyPI wheels \
             nvidia-cublas and nvidia-cuda-nvrtc; put its folder on LD_LIBRARY_PATH)"
        )
    })
}

/// NVRTC's `--gpu-architecture` for a compute capability (`sm_90`); names are interned so NVRTC's
/// options can borrow them for the life of the process.
pub fn arch_name(capability: (i32, i32)) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap();
    names.entry(capability).or_insert_with(|| {
        Box::leak(format!("sm_{}{}", capability.0, capability.1).into_boxed_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_follow_the_capability() {
        assert_eq!(arch_name((9, 0)), "sm_90");
        assert_eq!(arch_name((8, 6)), "sm_86");
        assert_eq!(arch_name((12, 0)), "sm_120");
        assert!(std::ptr::eq(arch_name((9, 0)), arch_name((9, 0))));
    }

    #[test]
    fn tensor_core_attention_starts_at_sm80() {
        assert!(!has_tensor_core_attention((7, 0)));
        assert!(!has_tensor_core_attention((7, 5)));
        assert!(has_tensor_core_attention((8, 0)));
        assert!(has_tensor_core_attention((9, 0)));
    }

    #[test]
    fn old_devices_are_refused_with_a_reason() {
        assert!(unusable_reason((6, 1)).unwrap().contains("6.1"));
        assert!(unusable_reason((7, 0)).is_none());
        assert!(unusable_reason((9, 0)).is_none());
    }

    #[test]
    fn no_driver_is_a_reason_not_a_panic() {
        // On machines without the driver this must explain itself; with one it lists devices.
        match devices() {
            Ok(list) => {
                for d in list {
                    assert!(!d.describe().is_empty());
                }
            }
            Err(e) => assert!(e.to_string().contains("libcuda.so.1"), "{e}"),
        }
        if !driver_present() {
            let why = unavailable_reason(Some(0)).unwrap();
            assert!(why.contains("driver"), "{why}");
        }
    }
}

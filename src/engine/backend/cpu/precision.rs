//! What `--precision` means on the CPU backend: f32; bf16 linear layers (`bf16.rs`) where the
//! CPU has AVX512_BF16, else bf16 emulated like f16 (weights rounded at load, f32 arithmetic);
//! int8 linear layers (`int8.rs`); the notes that say so; and the CPU features `mira devices`
//! lists.

use super::{bf16, int8, CpuBackend};
use crate::engine::Precision;

/// What `--precision` means on the CPU.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum CpuPrecision {
    /// f32 weights and arithmetic (`auto` and `f32`).
    #[default]
    F32,
    /// Linear layers in bf16 products with f32 sums where the CPU has AVX512_BF16 (`bf16.rs`);
    /// elsewhere weights rounded to bf16 at load and f32 arithmetic (see `precision_note`).
    Bf16,
    /// Weights rounded to f16 at load, f32 arithmetic, likewise.
    F16,
    /// Encoder linear layers in integer arithmetic (`int8.rs`: int8 weights with a scale per
    /// channel and 64 inputs, 8-bit activations with a scale and zero per token and 64 inputs);
    /// everything else f32.
    Int8,
}

impl CpuBackend {
    /// The backend for a requested precision. `auto` is f32: int8 and bf16 change the numbers,
    /// so they are the user's choice, made after `mira bench --against f32` on their own data.
    pub fn new(precision: Precision) -> CpuBackend {
        let precision = match precision {
            Precision::Auto | Precision::F32 => CpuPrecision::F32,
            Precision::Bf16 => CpuPrecision::Bf16,
            Precision::F16 => CpuPrecision::F16,
            Precision::Int8 => CpuPrecision::Int8,
        };
        CpuBackend {
            precision,
            ..CpuBackend::default()
        }
    }

    /// What a user who asked for `precision` on the CPU gets, when it is not plain f32.
    pub fn precision_note(precision: Precision) -> Option<String> {
        match CpuBackend::new(precision).precision {
            CpuPrecision::F32 => None,
            CpuPrecision::Bf16 if bf16::Kernel::vector().is_some() => Some(format!(
                "precision bf16 on the cpu: encoder linear layers use bf16 weights and \
                 activations with f32 sums, kernel {}; everything else computes in f32 (on \
                 weights rounded to bf16); some CPUs run \
                 bf16 dot products slower than f32 ones, so check the speed and the fidelity on \
                 your data with `mira bench --precision bf16 --against f32`",
                bf16::Kernel::best().name()
            )),
            CpuPrecision::Bf16 | CpuPrecision::F16 => Some(format!(
                "precision {precision} on the cpu is emulated: weights are rounded to {precision} \
                 at load and the arithmetic is f32, so results are {precision}'s at f32's speed \
                 (mira has no {precision} dot-product kernel for the CPU; this CPU: {})",
                cpu_features()
            )),
            CpuPrecision::Int8 => {
                let kernel = int8::Kernel::best();
                let slow = if kernel.has_vnni() {
                    ""
                } else {
                    "; this CPU has no VNNI (AVX512-VNNI or AVX-VNNI), and without it mira's int8 \
                     runs near its f32 speed (1.1-1.2x on an AVX2 AMD Zen 3, BENCHMARKS.md), so \
                     f32 is the better choice here unless you need int8's numbers"
                };
                Some(format!(
                    "precision int8 on the cpu: encoder linear layers use int8 weights (a scale \
                     per channel and 64 inputs) and 8-bit activations (a scale and zero per token \
                     and 64 inputs, channels smoothed by a calibration pass at load) with exact \
                     i32 sums, kernel {}{slow}; check the fidelity on your data with `mira bench \
                     --precision int8 --against f32`",
                    kernel.name()
                ))
            }
        }
    }
}

/// The CPU's vector extensions that matter to mira's kernels, for `mira devices` and notes.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let names = [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512_vnni", std::is_x86_feature_detected!("avx512vnni")),
            ("avx_vnni", std::is_x86_feature_detected!("avxvnni")),
            ("avx512_bf16", std::is_x86_feature_detected!("avx512bf16")),
        ];
        let has: Vec<&str> = names.iter().filter(|(_, h)| *h).map(|(n, _)| *n).collect();
        if has.is_empty() {
            "sse2 only".into()
        } else {
            has.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::env::consts::ARCH.to_string()
}

/// Which vector extensions the element-wise kernels use on this machine.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
            return "avx512";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
        "sse2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    "baseline"
}

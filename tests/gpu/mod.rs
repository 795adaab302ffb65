//! Shared by the GPU backends' tests: the backends to test (wgpu with f32 storage and f16 where
//! the adapter has SHADER_F16; CUDA with bf16, f16 and f32), random inputs and the comparison
//! against the CPU backend. The op checks themselves are in `ops.rs`.
#![allow(dead_code)]

pub mod ops;

use mira::engine::backend::cuda::{self, CudaBackend};
use mira::engine::backend::wgpu::{adapters, WgpuBackend};
use mira::engine::Precision;

/// Storage precision of a backend under test, which sets the tolerances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prec {
    F32,
    F16,
    Bf16,
}

impl Prec {
    /// Per-element tolerance relative to `1 + |reference|`.
    pub fn tol(self) -> f64 {
        match self {
            Prec::F32 => 1e-4,
            Prec::F16 => 2e-2,
            // 8 significant bits instead of f16's 11.
            Prec::Bf16 => 4e-2,
        }
    }
    /// The least cosine similarity to the CPU result.
    pub fn min_cosine(self) -> f64 {
        match self {
            Prec::F32 => 0.9999,
            Prec::F16 | Prec::Bf16 => 0.999,
        }
    }
}

/// Whether a wgpu adapter exists. Where none does, tests print why and pass vacuously, except
/// under CI (`CI` set), where the adapter (lavapipe) is part of the setup and its absence fails.
pub fn have_adapter() -> bool {
    if !adapters().is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "no wgpu adapter under CI: .ci/run installs Mesa's lavapipe \
             (mesa-vulkan-drivers libvulkan1)"
        );
    }
    eprintln!("SKIPPED: no wgpu adapter on this machine (install mesa-vulkan-drivers libvulkan1)");
    false
}

/// The wgpu backends to test, outputs poisoned with NaN.
pub fn backends() -> Vec<(WgpuBackend, Prec)> {
    if !have_adapter() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let f32 = WgpuBackend::new(None, Precision::F32).expect("open the wgpu adapter (f32)");
    f32.set_poison(true);
    out.push((f32, Prec::F32));
    match WgpuBackend::new(None, Precision::F16) {
        Ok(f16) => {
            f16.set_poison(true);
            out.push((f16, Prec::F16));
        }
        Err(e) => eprintln!("f16 storage not tested: {e:#}"),
    }
    out
}

/// Fail unless a CUDA device mira can use exists. The tests that call this are `#[ignore]`d
/// (CI has no GPU and reports them as ignored); run on a GPU machine with `--include-ignored`.
pub fn require_cuda() {
    if let Some(why) = cuda::device::unavailable_reason(None) {
        panic!("this test needs a usable CUDA device: {why}");
    }
}

/// The CUDA backends to test on device 0, one per storage type, outputs poisoned with NaN.
pub fn cuda_backends() -> Vec<(CudaBackend, Prec)> {
    require_cuda();
    let mut out = Vec::new();
    for (precision, prec) in [
        (Precision::Bf16, Prec::Bf16),
        (Precision::F16, Prec::F16),
        (Precision::F32, Prec::F32),
    ] {
        match CudaBackend::new(0, precision) {
            Ok(be) => {
                be.set_poison(true);
                out.push((be, prec));
            }
            Err(e) if precision == Precision::Bf16 => eprintln!("bf16 not tested: {e:#}"),
            Err(e) => panic!("open cuda:0 with {precision:?} storage: {e:#}"),
        }
    }
    out
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() * 2.0 - 1.0) * scale) as f32)
            .collect()
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    dot / (na * nb)
}

/// `got` (GPU) against `want` (CPU): same length, every value finite and within the precision's
/// tolerance, and the whole within its cosine bound.
pub fn assert_matches(got: &[f32], want: &[f32], prec: Prec, what: &str) {
    assert_eq!(got.len(), want.len(), "{what} ({prec:?}): length");
    let tol = prec.tol();
    let mut worst = (0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what} ({prec:?})[{i}] is {g} (want {w})");
        let err = (*g as f64 - *w as f64).abs() / (1.0 + (*w as f64).abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what} ({prec:?}): [{}] got {}, want {} (relative error {:.2e} > {tol:e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
    let c = cosine(got, want);
    assert!(
        c >= prec.min_cosine(),
        "{what} ({prec:?}): cosine {c} < {}",
        prec.min_cosine()
    );
}

//! bf16 linear layers for `--precision bf16` on CPUs with AVX512_BF16 (Intel Cooper Lake and
//! Sapphire Rapids and later, AMD Zen 4 and later).
//!
//! A weight `[N, K]` is rounded to bf16 once, at load, and packed in panels (`panels.rs`); each
//! activation row is rounded to bf16 at run time (nearest even). `vdpbf16ps` multiplies 32 bf16
//! pairs and adds both products of each pair into its f32 lane: 32 multiply-adds per instruction,
//! twice a 512-bit f32 FMA's 16. Sums stay f32; the bias, activation and everything outside the
//! linear layers stay f32 as on the f32 path.
//!
//! The arithmetic, per output lane and k-pair `t` (Intel's definition of `vdpbf16ps`: inputs and
//! outputs with subnormals flushed to zero, round to nearest even): `acc += a(2t+1)·b(2t+1)`, then
//! `acc += a(2t)·b(2t)`, each a rounded f32 add of the product. The product of two bf16 values is
//! exact in f32 unless it leaves f32's normal range, so the scalar kernel, which multiplies and
//! then adds, computes the same sums except for such products (which Intel's fused definition
//! flushes or keeps differently). The kernel keeps even and odd k-pairs in two chains (to hide the
//! instruction's latency) and adds them at the end, as the scalar kernel does. Both are tested
//! against float64 within the f32 summation bound (tests/cpu_ops.rs); a CPU without AVX512_BF16
//! keeps bf16 emulated instead (the f32 GEMM on bf16-rounded weights, see `precision.rs`).

use rayon::prelude::*;

use super::panels::{self, padded_k, MR, NR};

/// f32 to bf16 bits, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A weight rounded to bf16 and packed for [`gemm`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    packed: Vec<u16>,
}

impl PackedWeight {
    /// Round `w` (`[n, k]`, row-major) to bf16 and pack it.
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedWeight {
        assert_eq!(w.len(), n * k, "weight data does not match its shape");
        let packed = panels::pack(w, n, k, to_bf16);
        PackedWeight { n, k, packed }
    }

    /// The rounded values as f32, `[n, k]` row-major: what the layer computes with.
    pub fn values(&self) -> Vec<f32> {
        panels::unpack(&self.packed, self.n, self.k, to_f32)
    }
}

/// Activations rounded to bf16, row-major with an even stride.
pub struct Bf16Rows {
    m: usize,
    kp: usize,
    q: Vec<u16>,
}

impl Bf16Rows {
    pub fn round(x: &[f32], m: usize, k: usize) -> Bf16Rows {
        assert_eq!(x.len(), m * k, "activation data does not match its shape");
        let kp = padded_k(k);
        let mut q = vec![0u16; m * kp];
        if k > 0 {
            q.par_chunks_mut(kp)
                .zip(x.par_chunks(k))
                .for_each(|(q, x)| q.iter_mut().zip(x).for_each(|(q, &v)| *q = to_bf16(v)));
        }
        Bf16Rows { m, kp, q }
    }
}

/// The micro-kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

impl Kernel {
    /// The vector kernel this CPU runs, if any (without one, bf16 stays emulated).
    pub fn vector() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
            return Some(Kernel::Avx512Bf16);
        }
        None
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        Kernel::vector().unwrap_or(Kernel::Scalar)
    }

    /// Every kernel this CPU runs (tests compare them).
    pub fn available() -> Vec<Kernel> {
        std::iter::once(Kernel::Scalar)
            .chain(Kernel::vector())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar bf16",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => "avx512_bf16 vdpbf16ps",
        }
    }
}

/// `out[i, j] = Σ_k x(i,k)·w(j,k)` in bf16 products and f32 sums; `out` is `[m, n]`.
pub fn gemm(x: &Bf16Rows, w: &PackedWeight, out: &mut [f32]) {
    gemm_with(x, w, out, Kernel::best())
}

/// [`gemm`] with a chosen kernel (tests run each one).
pub fn gemm_with(x: &Bf16Rows, w: &PackedWeight, out: &mut [f32], kernel: Kernel) {
    assert_eq!(x.kp, padded_k(w.k), "activation and weight widths differ");
    // The vector kernel is `unsafe` on a CPU without AVX512_BF16: a caller's choice is checked.
    assert!(
        Kernel::available().contains(&kernel),
        "bf16 kernel {} does not run on this CPU",
        kernel.name()
    );
    let kp = x.kp;
    let tile = |a: &[u16], b: &[u16], mr: usize, tile: &mut [[f32; NR]; MR]| match kernel {
        Kernel::Scalar => scalar_kernel(a, kp, b, mr, tile),
        // SAFETY: `Avx512Bf16` is only chosen when the CPU has it (`vector`, `available`), and
        // `panels::gemm` hands over `mr` rows of `kp` and a whole panel.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => unsafe { panels::by_rows!(mr, avx512::kernel(a, kp, b, tile)) },
    };
    let store = |_: usize, _: usize, acc: &[f32; NR], out: &mut [f32]| {
        out.copy_from_slice(&acc[..out.len()]);
    };
    panels::gemm(x.m, w.n, kp, &x.q, &w.packed, out, tile, store);
}

/// Subnormals to (signed) zero, as `vdpbf16ps` treats its inputs and outputs.
#[inline(always)]
fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `vdpbf16ps` on one lane: the odd product, then the even one, each added with rounding.
#[inline(always)]
fn dot_pair(acc: f32, a: (u16, u16), b: (u16, u16)) -> f32 {
    let acc = flush(acc + flush(to_f32(a.1)) * flush(to_f32(b.1)));
    flush(acc + flush(to_f32(a.0)) * flush(to_f32(b.0)))
}

/// The reference arithmetic: the vector kernel's two chains, one product at a time.
fn scalar_kernel(a: &[u16], kp: usize, b: &[u16], mr: usize, tile: &mut [[f32; NR]; MR]) {
    for (r, out) in tile[..mr].iter_mut().enumerate() {
        let row = &a[r * kp..(r + 1) * kp];
        for (c, out) in out.iter_mut().enumerate() {
            let mut chains = [0f32; 2];
            for (t, pair) in row.chunks_exact(2).enumerate() {
                let w = (b[t * 2 * NR + 2 * c], b[t * 2 * NR + 2 * c + 1]);
                chains[t % 2] = dot_pair(chains[t % 2], (pair[0], pair[1]), w);
            }
            *out = chains[0] + chains[1];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The `R`×16 tile: a k-pair of the panel is one register; even and odd k-pairs accumulate in
    /// two chains, added at the end.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512_BF16; `a` must hold `R` rows of `kp` values and `b`
    /// `kp·16`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel<const R: usize>(
        a: &[u16],
        kp: usize,
        b: &[u16],
        tile: &mut [[f32; NR]; MR],
    ) {
        debug_assert!(a.len() >= R * kp && b.len() >= kp * NR);
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        // SAFETY (every read below): t < kp/2, so the panel reads end at kp·16 and the row reads
        // at row·kp + kp. The bf16 vectors are the same 512 bits reinterpreted.
        let pair = |r: usize, t: usize| unsafe {
            let v = _mm512_set1_epi32((a.add(r * kp + 2 * t) as *const i32).read_unaligned());
            std::mem::transmute::<__m512i, __m512bh>(v)
        };
        let panel = |t: usize| unsafe {
            let v = _mm512_loadu_si512(b.add(t * 2 * NR) as *const _);
            std::mem::transmute::<__m512i, __m512bh>(v)
        };
        super::panels::two_chains(kp / 2, &mut even, &mut odd, panel, |acc, r, t, b| {
            _mm512_dpbf16_ps(acc, pair(r, t), b)
        });
        for ((out, e), o) in tile.iter_mut().zip(&even).zip(&odd) {
            // SAFETY: each tile row holds 16 f32, one 512-bit store.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(*e, *o)) };
        }
    }
}

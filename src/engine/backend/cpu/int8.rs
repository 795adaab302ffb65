//! Integer linear layers for `--precision int8` on the CPU backend.
//!
//! A weight `[N, K]` is quantized once, at load, symmetric per output channel: `w ≈ q·s_j` with
//! `|q| ≤ 127`. Each activation row (token) is quantized at run time the same way with its own
//! scale, `x ≈ p·t_i`, `|p| ≤ act_max(K)`: as wide as the exact i32 sum of K products allows, up to
//! 16 bits (32767 for K ≤ 516, 22017 at K = 768, 16512 at K = 1024). The products `Σ_k p·q` are summed exactly in
//! i32, and the store multiplies by `t_i·s_j` (the bias and activation then run in the f32
//! epilogue as for f32).
//!
//! Why activations wider than 8 bits: with 8-bit per-token activations all-MiniLM-L6-v2 on the
//! sample corpus drifted to embedding cosine 0.9964 (the guard asks 0.999), and on AVX2 the wider
//! operand costs nothing: `vpmaddwd` multiplies 16-bit operands either way.
//!
//! Which layers: every encoder linear map but the feed-forward output projection
//! ([`quantizes`]), which stays f32. Its weights quantize worst: in a fake-quantization check of
//! all-MiniLM-L6-v2 (weights rounded per channel, activations exact, 100 sample documents),
//! int8 everywhere gave embedding cosine min 0.99917; keeping that one projection f32 gave
//! 0.99965, as much as 64-wide weight groups everywhere (0.99966), while keeping any other kind
//! f32 gave at most 0.99935. At MiniLM's size it is also the layer int8 speeds up least
//! (1.04x at K = 1536, N = 384 on an AVX-512 VNNI Xeon, `examples/lowp_gemm`), and leaving it
//! f32 changed whole-model speed by less than the machine's noise (BENCHMARKS.md).
//!
//! The arithmetic is integer and exact, so every kernel variant gives bit-identical results: the
//! scalar kernel (any CPU) is the reference the vector kernels are tested against, and a CPU
//! without a variant still runs the same numbers. Variants:
//! - `avx512_vnni`: `vpdpwssd` on 512-bit registers multiplies 32 i16 pairs and adds both products
//!   of each pair into its i32 lane in one instruction (32 MACs, twice a 512-bit f32 FMA's 16);
//!   one register holds a whole k-pair of a panel, and the reduction runs as two interleaved
//!   chains (even and odd k-pairs) so twelve accumulators hide the instruction's latency;
//! - `avx_vnni`: the same instruction on 256-bit registers (Alder Lake and later, Zen 5);
//! - `avx2`: `vpmaddwd` multiplies 16 i16 pairs and adds each pair into an i32 lane (16 MACs per
//!   instruction, twice an f32 FMA's 8), then `vpaddd` accumulates;
//! - `scalar`: plain loops over the same packed layout (aarch64, x86-64 without AVX2).
//!
//! Operands are stored as i16 (weights within the i8 range) so that `vpmaddwd` needs no widening;
//! its pair sums (at most 2·127·32767) cannot overflow its i32 lanes.
//!
//! Layout: the weight is packed in panels of `NR` = 16 output channels; in a panel, k-pair `t`
//! holds `[w(c, 2t), w(c, 2t+1)]` for c = 0..16, i.e. 32 i16 (two AVX2 registers). K is padded to
//! even and N to a multiple of 16 with zeros. Activations stay row-major with the padded K as stride,
//! so a k-pair of one row is one i32 that the kernel broadcasts. The micro-kernel computes an
//! `MR`×16 tile (6 rows: 12 accumulators, 2 weight registers, 1 broadcast: 15 of 16 ymm); rayon
//! tasks take blocks of rows and walk every panel, so a task's activation rows stay in L2 while the
//! panels stream through.

use rayon::prelude::*;

use super::panels::{self, padded_k, MR, NR};
use crate::engine::LinearKind;

/// Whether `--precision int8` quantizes a linear map of this kind (the rest stay f32; see the
/// module notes for why the feed-forward output projection does).
pub fn quantizes(kind: LinearKind) -> bool {
    kind != LinearKind::FeedForwardDown
}

/// Largest quantized weight magnitude (symmetric int8).
const W_MAX: f32 = 127.0;
/// The widest reduction a layer may have: activations keep at least 8 bits (`act_max ≥ 127`).
pub const MAX_K: usize = (i32::MAX as usize) / (127 * 127);

/// Largest quantized activation magnitude for a reduction over `kp` products: `kp·127·act_max`
/// stays within i32, so the accumulators cannot overflow; at most i16's 32767.
pub fn act_max(kp: usize) -> f32 {
    (i32::MAX as usize / (127 * kp.max(1))).min(32767) as f32
}

/// A weight quantized and packed for [`gemm`]: the values it stands for are `q(j, k)·scale[j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `panels × (kp / 2) × NR × 2` values.
    packed: Vec<i16>,
    scale: Vec<f32>,
}

/// Round to the nearest integer, ties to even, in a way every CPU computes identically.
#[inline(always)]
fn round(x: f32) -> f32 {
    x.round_ties_even()
}

impl PackedWeight {
    /// Quantize `w` (`[n, k]`, row-major) per output channel. Returns the packed weight and the
    /// dequantized values `q·s` (what the layer now computes with, for the other ops and tests).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> (PackedWeight, Vec<f32>) {
        assert_eq!(w.len(), n * k, "weight data does not match its shape");
        assert!(k <= MAX_K, "int8 reduction of {k} exceeds {MAX_K}");
        let scale: Vec<f32> = (0..n)
            .map(|j| {
                let max = w[j * k..(j + 1) * k]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                if max > 0.0 {
                    max / W_MAX
                } else {
                    1.0
                }
            })
            .collect();
        let quant = |j: usize, v: f32| round(v / scale[j]).clamp(-W_MAX, W_MAX);
        let packed = panels::pack(w, n, k, |j, v| quant(j, v) as i16);
        let dequant = (0..n * k)
            .map(|i| quant(i / k, w[i]) * scale[i / k])
            .collect();
        (
            PackedWeight {
                n,
                k,
                packed,
                scale,
            },
            dequant,
        )
    }
}

/// Activations quantized per row for [`gemm`]: row `i` stands for `q(i, ·)·scale[i]`.
pub struct QuantRows {
    m: usize,
    kp: usize,
    q: Vec<i16>,
    scale: Vec<f32>,
}

impl QuantRows {
    /// Quantize `x` (`[m, k]`) per row, symmetric, to `|q| ≤ act_max(k)`.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> QuantRows {
        assert_eq!(x.len(), m * k, "activation data does not match its shape");
        assert!(k <= MAX_K, "int8 reduction of {k} exceeds {MAX_K}");
        let kp = padded_k(k);
        let limit = act_max(kp);
        let mut q = vec![0i16; m * kp];
        let mut scale = vec![0f32; m];
        let rows = (16 * 1024 / kp.max(1)).clamp(1, m.max(1));
        q.par_chunks_mut(rows * kp)
            .zip(scale.par_chunks_mut(rows))
            .zip(x.par_chunks(rows * k))
            .for_each(|((q, scale), x)| {
                for ((q, s), x) in q.chunks_exact_mut(kp).zip(scale).zip(x.chunks_exact(k)) {
                    *s = quantize_row(x, &mut q[..k], limit);
                }
            });
        QuantRows { m, kp, q, scale }
    }
}

crate::engine::backend::cpu::math::multiversion! {
    /// Quantize one row into `q` (`|q| ≤ limit`, ties to even), returning its scale. Branch-free
    /// so that it vectorises: the largest magnitude over 8 lanes, then rounding by the
    /// `1.5·2^23` trick (exact for `|v| < 2^22`), read back from the float's low bits.
    pub fn quantize_row_into(x: &[f32], q: &mut [i16], limit: f32, scale: &mut f32) {
        const ROUND: f32 = 12_582_912.0;
        // Per lane: the largest magnitude, and `Σ v·0`, which is NaN once any value is not finite.
        let (mut lanes, mut poison) = ([0f32; 8], [0f32; 8]);
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for ((m, p), v) in lanes.iter_mut().zip(&mut poison).zip(c) {
                *m = m.max(v.abs());
                *p += v * 0.0;
            }
        }
        for (i, v) in chunks.remainder().iter().enumerate() {
            lanes[i] = lanes[i].max(v.abs());
            poison[i] += v * 0.0;
        }
        let max = lanes.iter().fold(0f32, |m, &v| m.max(v));
        // A row with an infinity or NaN gets a NaN scale, so its outputs are NaN as in f32.
        let finite = poison.iter().sum::<f32>() == 0.0;
        let inv = if max > 0.0 && finite { limit / max } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            let r = (v * inv).clamp(-limit, limit) + ROUND;
            *q = (r.to_bits() as i32 - 0x4B40_0000) as i16;
        }
        *scale = match (finite, max > 0.0) {
            (false, _) => f32::NAN,
            (true, false) => 1.0,
            (true, true) => max / limit,
        };
    }
}

/// Quantize one row into `q`, returning its scale.
fn quantize_row(x: &[f32], q: &mut [i16], limit: f32) -> f32 {
    let mut scale = 0.0;
    quantize_row_into(x, q, limit, &mut scale);
    scale
}

/// `out[i, j] = (Σ_k xq(i,k)·wq(j,k)) · x.scale[i] · w.scale[j]`; `out` is `[m, n]`.
pub fn gemm(x: &QuantRows, w: &PackedWeight, out: &mut [f32]) {
    gemm_with(x, w, out, Kernel::best());
}

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        *Kernel::available()
            .last()
            .expect("the scalar kernel runs anywhere")
    }

    /// Every kernel this CPU runs, slowest first (tests compare them).
    pub fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                all.push(Kernel::Avx2);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("avxvnni") {
                all.push(Kernel::AvxVnni);
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                all.push(Kernel::Avx512Vnni);
            }
        }
        all
    }

    /// The name `mira devices` shows.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar i32",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2 vpmaddwd",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avx_vnni vpdpwssd",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512_vnni vpdpwssd",
        }
    }
}

/// [`gemm`] with a chosen kernel (tests run each one).
pub fn gemm_with(x: &QuantRows, w: &PackedWeight, out: &mut [f32], kernel: Kernel) {
    assert_eq!(x.kp, padded_k(w.k), "activation and weight widths differ");
    // The vector kernels are `unsafe` on a CPU without their features: a caller's choice is
    // checked once per GEMM.
    assert!(
        Kernel::available().contains(&kernel),
        "int8 kernel {} does not run on this CPU",
        kernel.name()
    );
    let store = |row: usize, col: usize, acc: &[i32; NR], out: &mut [f32]| {
        let t = x.scale[row];
        for ((o, &acc), &s) in out.iter_mut().zip(acc).zip(&w.scale[col..]) {
            *o = acc as f32 * (t * s);
        }
    };
    let tile = |a: &[i16], b: &[i16], mr: usize, tile: &mut [[i32; NR]; MR]| {
        micro_kernel(kernel, a, x.kp, b, mr, tile)
    };
    panels::gemm(x.m, w.n, x.kp, &x.q, &w.packed, out, tile, store);
}

/// Fill `tile[..mr]` with the i32 dot products of `mr` activation rows (`a`, stride `kp`) with the
/// 16 channels of one packed panel `b`.
fn micro_kernel(
    kernel: Kernel,
    a: &[i16],
    kp: usize,
    b: &[i16],
    mr: usize,
    tile: &mut [[i32; NR]; MR],
) {
    debug_assert!(a.len() >= mr * kp && b.len() == kp * NR && mr <= MR);
    match kernel {
        Kernel::Scalar => scalar_kernel(a, kp, b, mr, tile),
        // SAFETY (each vector kernel): a kernel is only chosen when the CPU has its features
        // (`best`, `available`), and the slices hold `mr` rows of `kp` and a whole panel, as
        // checked above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { panels::by_rows!(mr, avx2::kernel(a, kp, b, tile)) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { panels::by_rows!(mr, avx_vnni::kernel(a, kp, b, tile)) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { panels::by_rows!(mr, avx512_vnni::kernel(a, kp, b, tile)) },
    }
}

/// The reference arithmetic: the same sums as the vector kernels, one product at a time.
fn scalar_kernel(a: &[i16], kp: usize, b: &[i16], mr: usize, tile: &mut [[i32; NR]; MR]) {
    for (r, acc) in tile[..mr].iter_mut().enumerate() {
        let row = &a[r * kp..(r + 1) * kp];
        *acc = [0; NR];
        for (t, pair) in row.chunks_exact(2).enumerate() {
            let bt = &b[t * 2 * NR..(t + 1) * 2 * NR];
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc += pair[0] as i32 * bt[2 * c] as i32 + pair[1] as i32 * bt[2 * c + 1] as i32;
            }
        }
    }
}

/// A 256-bit micro-kernel module `$module` with `kernel::<R>`: the `R`×16 tile over the whole
/// reduction, per k-pair two panel loads, `R` broadcasts of the row's pair, and `$mac(acc, av, b)`
/// into each of the row's two accumulators.
macro_rules! ymm_kernel {
    ($module:ident, $features:literal, $what:literal, |$acc:ident, $av:ident, $b:ident| $mac:expr) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{MR, NR};
            use std::arch::x86_64::*;

            #[doc = concat!("The `R`×16 tile: ", $what, ".")]
            ///
            /// # Safety
            #[doc = concat!("The CPU must have ", $features, "; `a` must hold `R` rows of `kp` values and `b` `kp·16`.")]
            #[target_feature(enable = $features)]
            pub unsafe fn kernel<const R: usize>(
                a: &[i16],
                kp: usize,
                b: &[i16],
                tile: &mut [[i32; NR]; MR],
            ) {
                debug_assert!(a.len() >= R * kp && b.len() >= kp * NR);
                let mut acc = [[_mm256_setzero_si256(); 2]; R];
                let (a, b) = (a.as_ptr(), b.as_ptr());
                let mac = |$acc: __m256i, $av: __m256i, $b: __m256i| $mac;
                for t in 0..kp / 2 {
                    // SAFETY: t < kp/2, so the panel reads end at kp·16 and the row reads at
                    // row·kp + kp.
                    unsafe {
                        let b0 = _mm256_loadu_si256(b.add(t * 2 * NR) as *const __m256i);
                        let b1 = _mm256_loadu_si256(b.add(t * 2 * NR + NR) as *const __m256i);
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let pair = (a.add(r * kp + 2 * t) as *const i32).read_unaligned();
                            let av = _mm256_set1_epi32(pair);
                            acc[0] = mac(acc[0], av, b0);
                            acc[1] = mac(acc[1], av, b1);
                        }
                    }
                }
                for (out, acc) in tile.iter_mut().zip(&acc) {
                    // SAFETY: each tile row holds 16 i32, the two stores write 8 each.
                    unsafe {
                        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, acc[0]);
                        _mm256_storeu_si256(out.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
                    }
                }
            }
        }
    };
}

ymm_kernel!(avx2, "avx2", "`vpmaddwd` then `vpaddd`", |acc, av, b| {
    _mm256_add_epi32(acc, _mm256_madd_epi16(av, b))
});
ymm_kernel!(
    avx_vnni,
    "avx2,avxvnni",
    "one `vpdpwssd` (AVX-VNNI)",
    |acc, av, b| { _mm256_dpwssd_avx_epi32(acc, av, b) }
);

#[cfg(target_arch = "x86_64")]
mod avx512_vnni {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The `R`×16 tile with 512-bit `vpdpwssd`: a k-pair of the panel is one register; even and
    /// odd k-pairs accumulate separately (two chains per row, summed at the end: integer sums
    /// are exact in any order, and every partial sum is bounded like the whole).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-VNNI; `a` must hold `R` rows of `kp` values and `b`
    /// `kp·16`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn kernel<const R: usize>(
        a: &[i16],
        kp: usize,
        b: &[i16],
        tile: &mut [[i32; NR]; MR],
    ) {
        debug_assert!(a.len() >= R * kp && b.len() >= kp * NR);
        let mut even = [_mm512_setzero_si512(); R];
        let mut odd = [_mm512_setzero_si512(); R];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        // SAFETY (every read below): t < kp/2, so the panel reads end at kp·16 and the row reads
        // at row·kp + kp.
        let pair = |r: usize, t: usize| unsafe {
            _mm512_set1_epi32((a.add(r * kp + 2 * t) as *const i32).read_unaligned())
        };
        let panel = |t: usize| unsafe { _mm512_loadu_si512(b.add(t * 2 * NR) as *const _) };
        super::panels::two_chains(kp / 2, &mut even, &mut odd, panel, |acc, r, t, b| {
            _mm512_dpwssd_epi32(acc, pair(r, t), b)
        });
        for ((out, e), o) in tile.iter_mut().zip(&even).zip(&odd) {
            // SAFETY: each tile row holds 16 i32, one 512-bit store.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr() as *mut _, _mm512_add_epi32(*e, *o)) };
        }
    }
}

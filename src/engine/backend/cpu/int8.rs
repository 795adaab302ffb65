//! Integer linear layers for `--precision int8` on the CPU backend.
//!
//! A weight `[N, K]` is quantized once, at load, symmetric per output channel and per [`GROUP`]
//! (64) consecutive inputs: `w(j, k) ≈ q·s(j, k/64)` with `|q| ≤ 127`. Each activation row
//! (token) is quantized at run time with one scale, `x ≈ p·t_i`, `|p| ≤ 32767` (16 bits). A
//! group's products `Σ p·q` are summed exactly in i32 (64·127·32767 < 2^31), converted to f32
//! and added with one fused multiply-add by the group's scale, groups in order; the store
//! multiplies by `t_i` (bias and activation then run in the f32 epilogue as for f32).
//!
//! Why activations wider than 8 bits: with 8-bit per-token activations all-MiniLM-L6-v2 on the
//! sample corpus drifted to embedding cosine 0.9964 (the guard asks 0.999), and the wider operand
//! costs nothing here: `vpdpwssd`/`vpmaddwd` multiply 16-bit operands.
//!
//! Why groups of 64: with one scale per channel, the feed-forward output projection's weights
//! quantize worst (a fake-quantization check of all-MiniLM-L6-v2, 100 sample documents,
//! activations at 16 bits: embedding cosine min 0.99917 with every layer per channel), so it had
//! to stay f32, a third of the model's multiply-adds. With 64-wide groups every layer is int8 at
//! cosine min 0.99966 (128-wide: 0.99952). The scales cost one conversion and one FMA per 32
//! multiply-add instructions.
//!
//! Every kernel variant computes the same operations in the same order (exact i32 sums, then one
//! rounding conversion and one fused multiply-add per group), so they agree bit for bit: the
//! scalar kernel (any CPU) is the reference the vector kernels are tested against, and a CPU
//! without a variant still runs the same numbers. Variants:
//! - `avx512_vnni`: `vpdpwssd` on 512-bit registers multiplies 32 i16 pairs and adds both products
//!   of each pair into its i32 lane in one instruction (32 MACs, twice a 512-bit f32 FMA's 16);
//!   one register holds a whole k-pair of a panel, and a tile of 4 rows by 3 panels (48 channels)
//!   keeps 12 i32 and 12 f32 accumulators in registers. Wider tiles ran slower on an AVX-512
//!   Xeon (8 rows: 72-95 GMAC/s on one core, 4 rows: 95-107): each row's broadcast needs its own
//!   address arithmetic, which competes for the ports that run `vpdpwssd`;
//! - `avx_vnni`: the same instruction on 256-bit registers (Alder Lake and later, Zen 5);
//! - `avx2`: `vpmaddwd` multiplies 16 i16 pairs and adds each pair into an i32 lane (16 MACs per
//!   instruction, twice an f32 FMA's 8), then `vpaddd` accumulates;
//! - `scalar`: plain loops over the same packed layout (aarch64, x86-64 without AVX2 and FMA).
//!
//! Operands are stored as i16 (weights within the i8 range) so that `vpmaddwd` needs no widening;
//! its pair sums (at most 2·127·32767) cannot overflow its i32 lanes.
//!
//! Layout: the weight is packed in panels of `NR` = 16 output channels; in a panel, k-pair `t`
//! holds `[w(c, 2t), w(c, 2t+1)]` for c = 0..16, i.e. 32 i16 (two AVX2 registers); its scales are
//! `groups × 16` f32. K is padded to even and N to a multiple of 16 with zeros. Activations stay
//! row-major with the padded K as stride, so a k-pair of one row is one i32 that the kernel
//! broadcasts. The 256-bit and scalar kernels take tiles of 6 rows by one panel (12 i32
//! accumulators, 2 weight registers, 1 broadcast: 15 of 16 ymm). Rayon tasks take blocks of 48
//! rows, keep their f32 sums in a buffer of their own, and walk the reduction in blocks of 256
//! inputs (`BLOCK_PAIRS`), in each every panel group and row tile: a block of panels stays in
//! L1 while the task's rows pass over it.

use std::ops::Range;

use rayon::prelude::*;

use super::panels::{self, padded_k, NR};

/// Inputs per weight scale: each output channel has one scale per 64 consecutive inputs.
pub const GROUP: usize = 64;
/// K-pairs per weight scale.
const GROUP_PAIRS: usize = GROUP / 2;
/// Largest quantized weight magnitude (symmetric int8).
const W_MAX: f32 = 127.0;
/// Largest quantized activation magnitude (16 bits): a group's sum, at most
/// `64·127·32767 < 2^31`, cannot overflow its i32 accumulator.
pub const ACT_MAX: f32 = 32767.0;

/// Scale groups over a padded width `kp`.
fn groups(kp: usize) -> usize {
    (kp / 2).div_ceil(GROUP_PAIRS)
}

/// A weight quantized and packed for [`gemm`]: the value at `(j, k)` is `q(j, k)·s(j, k / 64)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `panels × (kp / 2) × NR × 2` values.
    packed: Vec<i16>,
    /// `panels × groups × NR` scales: `s(16·panel + c, g)` at `(panel·groups + g)·16 + c`.
    scale: Vec<f32>,
}

/// Round to the nearest integer, ties to even, in a way every CPU computes identically.
#[inline(always)]
fn round(x: f32) -> f32 {
    x.round_ties_even()
}

impl PackedWeight {
    /// Quantize `w` (`[n, k]`, row-major) per output channel and group of 64 inputs. Returns the
    /// packed weight and the dequantized values `q·s` (what the layer now computes with, for the
    /// other ops and tests).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> (PackedWeight, Vec<f32>) {
        assert_eq!(w.len(), n * k, "weight data does not match its shape");
        let groups = groups(padded_k(k));
        let panels = n.div_ceil(NR);
        // Row-major scales first, `[n, groups]`.
        let by_row: Vec<f32> = (0..n * groups)
            .map(|i| {
                let (j, g) = (i / groups, i % groups);
                let group = &w[j * k + g * GROUP..j * k + ((g + 1) * GROUP).min(k)];
                let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                if max > 0.0 {
                    max / W_MAX
                } else {
                    1.0
                }
            })
            .collect();
        let s = |j: usize, p: usize| by_row[j * groups + p / GROUP];
        let quant = |j: usize, p: usize, v: f32| round(v / s(j, p)).clamp(-W_MAX, W_MAX);
        let packed = panels::pack(w, n, k, |j, p, v| quant(j, p, v) as i16);
        let dequant = (0..n * k)
            .map(|i| {
                let (j, p) = (i / k, i % k);
                quant(j, p, w[i]) * s(j, p)
            })
            .collect();
        let mut scale = vec![0f32; panels * groups * NR];
        for j in 0..n {
            for g in 0..groups {
                scale[((j / NR) * groups + g) * NR + j % NR] = by_row[j * groups + g];
            }
        }
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
    /// Quantize `x` (`[m, k]`) per row, symmetric, to `|q| ≤ ACT_MAX`.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> QuantRows {
        assert_eq!(x.len(), m * k, "activation data does not match its shape");
        let kp = padded_k(k);
        let mut q = vec![0i16; m * kp];
        let mut scale = vec![0f32; m];
        let rows = (16 * 1024 / kp.max(1)).clamp(1, m.max(1));
        q.par_chunks_mut(rows * kp)
            .zip(scale.par_chunks_mut(rows))
            .zip(x.par_chunks(rows * k))
            .for_each(|((q, scale), x)| {
                for ((q, s), x) in q.chunks_exact_mut(kp).zip(scale).zip(x.chunks_exact(k)) {
                    *s = quantize_row(x, &mut q[..k], ACT_MAX);
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

/// `out[i, j] = Σ_g (Σ_{k in g} xq(i,k)·wq(j,k))·s(j, g), times x.scale[i]`; `out` is `[m, n]`.
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
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 {
                all.push(Kernel::Avx2);
            }
            if avx2 && std::is_x86_feature_detected!("avxvnni") {
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
    let kp = x.kp;
    assert_eq!(kp, padded_k(w.k), "activation and weight widths differ");
    // The vector kernels are `unsafe` on a CPU without their features: a caller's choice is
    // checked once per GEMM.
    assert!(
        Kernel::available().contains(&kernel),
        "int8 kernel {} does not run on this CPU",
        kernel.name()
    );
    // SAFETY (each vector kernel): a kernel is only chosen when the CPU has its features
    // (checked above), and `blocked` hands it `mr` rows of `kp`, `np` whole panels with their
    // scales, and sums with `mr` rows of `np` at the stride it passes.
    match kernel {
        Kernel::Scalar => blocked::<6, 1>(x, w, out, |a, b, s, pairs, mr, _, sums, stride| {
            scalar_kernel(a, b, s, pairs, mr, sums, stride)
        }),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => blocked::<6, 1>(x, w, out, |a, b, s, pairs, mr, _, sums, stride| unsafe {
            panels::by_rows!(mr, avx2::kernel(a, kp, b, s, pairs, sums, stride))
        }),
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => {
            blocked::<6, 1>(x, w, out, |a, b, s, pairs, mr, _, sums, stride| unsafe {
                panels::by_rows!(mr, avx_vnni::kernel(a, kp, b, s, pairs, sums, stride))
            })
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            blocked::<4, 3>(x, w, out, |a, b, s, pairs, mr, np, sums, stride| unsafe {
                match np {
                    3 => panels::by_rows!(
                        mr,
                        avx512_vnni::kernel[3](a, kp, b, s, pairs, sums, stride)
                    ),
                    2 => panels::by_rows!(
                        mr,
                        avx512_vnni::kernel[2](a, kp, b, s, pairs, sums, stride)
                    ),
                    _ => panels::by_rows!(
                        mr,
                        avx512_vnni::kernel[1](a, kp, b, s, pairs, sums, stride)
                    ),
                }
            })
        }
    }
}

/// K-pairs per cache block (four scale groups): a block of 3 panels, 24 KB, stays in L1 while
/// every row tile of a task passes over it. Without blocking, the panels of a layer with
/// K = 1536 (147 KB for 3) streamed from L2 for every tile.
const BLOCK_PAIRS: usize = 4 * GROUP_PAIRS;

/// A tile kernel for [`blocked`]: `(rows, panels, their scales, k-pairs, rows count, panel count,
/// sums, stride)` adds the products of k-pairs `pairs` (a range starting on a group) of the rows
/// with the panels to the f32 sums, row `r` and panel `p` at `sums[r·stride + p]`.
trait TileKernel:
    Fn(&[i16], &[i16], &[f32], Range<usize>, usize, usize, &mut [[f32; NR]], usize) + Sync
{
}
impl<F: Fn(&[i16], &[i16], &[f32], Range<usize>, usize, usize, &mut [[f32; NR]], usize) + Sync>
    TileKernel for F
{
}

/// The loop nest: rayon tasks take blocks of `panels::MC` rows; each walks the reduction in
/// blocks of [`BLOCK_PAIRS`], in each every group of `PANELS` panels, and in each every tile of
/// `ROWS` rows, adding into the task's f32 sums; the store multiplies them by the row's scale.
/// The order of the groups within one output is always 0, 1, 2, ..., so the result does not
/// depend on the blocking.
fn blocked<const ROWS: usize, const PANELS: usize>(
    x: &QuantRows,
    w: &PackedWeight,
    out: &mut [f32],
    tile: impl TileKernel,
) {
    let (m, n, kp) = (x.m, w.n, x.kp);
    assert_eq!(out.len(), m * n, "output does not match [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let (panels, pairs) = (n.div_ceil(NR), kp / 2);
    let per_panel = groups(kp) * NR;
    out.par_chunks_mut(panels::MC * n)
        .enumerate()
        .for_each(|(block, out)| {
            let row0 = block * panels::MC;
            let rows = out.len() / n;
            let mut sums = vec![[0f32; NR]; rows * panels];
            for k0 in (0..pairs).step_by(BLOCK_PAIRS) {
                let k = k0..(k0 + BLOCK_PAIRS).min(pairs);
                for first in (0..panels).step_by(PANELS) {
                    let np = PANELS.min(panels - first);
                    let b = &w.packed[first * kp * NR..(first + np) * kp * NR];
                    let s = &w.scale[first * per_panel..(first + np) * per_panel];
                    for r0 in (0..rows).step_by(ROWS) {
                        let mr = ROWS.min(rows - r0);
                        let a = &x.q[(row0 + r0) * kp..(row0 + r0 + mr) * kp];
                        let sums = &mut sums[r0 * panels + first..];
                        tile(a, b, s, k.clone(), mr, np, sums, panels);
                    }
                }
            }
            let rows = out.chunks_exact_mut(n).zip(sums.chunks_exact(panels));
            for (r, (out, sums)) in rows.enumerate() {
                let t = x.scale[row0 + r];
                for (o, &sum) in out.iter_mut().zip(sums.iter().flatten()) {
                    *o = sum * t;
                }
            }
        });
}

/// The reference arithmetic, one product at a time: per group the exact i32 sum, then
/// `sum = fma(group as f32, scale, sum)`, as every vector kernel computes it.
fn scalar_kernel(
    a: &[i16],
    b: &[i16],
    scale: &[f32],
    pairs: Range<usize>,
    mr: usize,
    sums: &mut [[f32; NR]],
    stride: usize,
) {
    let kp = b.len() / NR;
    for r in 0..mr {
        let row = &a[r * kp..(r + 1) * kp];
        let out = &mut sums[r * stride];
        for g in pairs.start / GROUP_PAIRS..pairs.end.div_ceil(GROUP_PAIRS) {
            let mut group = [0i32; NR];
            for t in g * GROUP_PAIRS..((g + 1) * GROUP_PAIRS).min(pairs.end) {
                let bt = &b[t * 2 * NR..(t + 1) * 2 * NR];
                let (x0, x1) = (row[2 * t] as i32, row[2 * t + 1] as i32);
                for (c, acc) in group.iter_mut().enumerate() {
                    *acc += x0 * bt[2 * c] as i32 + x1 * bt[2 * c + 1] as i32;
                }
            }
            for ((out, &sum), &s) in out.iter_mut().zip(&group).zip(&scale[g * NR..]) {
                *out = (sum as f32).mul_add(s, *out);
            }
        }
    }
}

/// A 256-bit micro-kernel module `$module` with `kernel::<R>`: the `R`×16 tile, per group of
/// k-pairs: two panel loads and `R` broadcasts of the row's pair per k-pair, `$mac(acc, av, b)`
/// into each of the row's two i32 accumulators; then each accumulator converted and added to the
/// tile's f32 sums by one FMA with the group's scales.
macro_rules! ymm_kernel {
    ($module:ident, $features:literal, $what:literal, |$acc:ident, $av:ident, $b:ident| $mac:expr) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{GROUP_PAIRS, NR};
            use std::arch::x86_64::*;

            #[doc = concat!("The `R`×16 tile: ", $what, ".")]
            ///
            /// # Safety
            #[doc = concat!("The CPU must have ", $features, "; `a` must hold `R` rows of `kp` values, `b` `kp·16`, `scale` 16 per group, `pairs` lie within `kp / 2` and start on a group, and `tile` hold `R` rows at `stride`.")]
            #[target_feature(enable = $features)]
            pub unsafe fn kernel<const R: usize>(
                a: &[i16],
                kp: usize,
                b: &[i16],
                scale: &[f32],
                pairs: std::ops::Range<usize>,
                tile: &mut [[f32; NR]],
                stride: usize,
            ) {
                debug_assert!(a.len() >= R * kp && b.len() >= kp * NR && pairs.end <= kp / 2);
                debug_assert!(scale.len() >= (kp / 2).div_ceil(GROUP_PAIRS) * NR);
                debug_assert!(tile.len() > (R - 1) * stride && pairs.start.is_multiple_of(GROUP_PAIRS));
                let (a, b, scale) = (a.as_ptr(), b.as_ptr(), scale.as_ptr());
                let mac = |$acc: __m256i, $av: __m256i, $b: __m256i| $mac;
                let mut sums = [[_mm256_setzero_ps(); 2]; R];
                for (r, sums) in sums.iter_mut().enumerate() {
                    let row = &tile[r * stride];
                    // SAFETY: each tile row holds 16 f32, the two loads read 8 each.
                    *sums = unsafe {
                        [_mm256_loadu_ps(row.as_ptr()), _mm256_loadu_ps(row.as_ptr().add(8))]
                    };
                }
                for g in pairs.start / GROUP_PAIRS..pairs.end.div_ceil(GROUP_PAIRS) {
                    let mut acc = [[_mm256_setzero_si256(); 2]; R];
                    for t in g * GROUP_PAIRS..((g + 1) * GROUP_PAIRS).min(pairs.end) {
                        // SAFETY: t < kp/2, so the panel reads end at kp·16 and the row reads
                        // at row·kp + kp.
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
                    // SAFETY: g is a group of the reduction, so the reads end within its scales.
                    let s = unsafe {
                        [_mm256_loadu_ps(scale.add(g * NR)), _mm256_loadu_ps(scale.add(g * NR + 8))]
                    };
                    for (sums, acc) in sums.iter_mut().zip(&acc) {
                        for ((sum, &acc), &s) in sums.iter_mut().zip(acc).zip(&s) {
                            *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, *sum);
                        }
                    }
                }
                for (r, sums) in sums.iter().enumerate() {
                    let out = &mut tile[r * stride];
                    // SAFETY: each tile row holds 16 f32, the two stores write 8 each.
                    unsafe {
                        _mm256_storeu_ps(out.as_mut_ptr(), sums[0]);
                        _mm256_storeu_ps(out.as_mut_ptr().add(8), sums[1]);
                    }
                }
            }
        }
    };
}

ymm_kernel!(
    avx2,
    "avx2,fma",
    "`vpmaddwd` then `vpaddd`",
    |acc, av, b| { _mm256_add_epi32(acc, _mm256_madd_epi16(av, b)) }
);
ymm_kernel!(
    avx_vnni,
    "avx2,avxvnni,fma",
    "one `vpdpwssd` (AVX-VNNI)",
    |acc, av, b| { _mm256_dpwssd_avx_epi32(acc, av, b) }
);

#[cfg(target_arch = "x86_64")]
mod avx512_vnni {
    use super::{GROUP_PAIRS, NR};
    use std::arch::x86_64::*;

    /// The `R`×`16·P` tile with 512-bit `vpdpwssd`: per k-pair, one register per panel (`P`
    /// loads) and one broadcast per row feed `R·P` independent i32 accumulators; at the end of
    /// each group they are converted and added to `R·P` f32 sums by one FMA with the group's
    /// scales (4 rows by 3 panels: 24 accumulators, 3 panel registers, 1 broadcast).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-VNNI; `a` must hold `R` rows of `kp` values, `b`
    /// `P` panels of `kp·16`, `scale` their `P·groups·16` scales, `pairs` lie within `kp / 2`
    /// and start on a group, and `tile` hold `R` rows of `P` at `stride`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn kernel<const R: usize, const P: usize>(
        a: &[i16],
        kp: usize,
        b: &[i16],
        scale: &[f32],
        pairs: std::ops::Range<usize>,
        tile: &mut [[f32; NR]],
        stride: usize,
    ) {
        let groups = (kp / 2).div_ceil(GROUP_PAIRS);
        debug_assert!(a.len() >= R * kp && b.len() >= P * kp * NR && pairs.end <= kp / 2);
        debug_assert!(scale.len() >= P * groups * NR && pairs.start.is_multiple_of(GROUP_PAIRS));
        debug_assert!(tile.len() >= (R - 1) * stride + P);
        let (a, b, scale) = (a.as_ptr(), b.as_ptr(), scale.as_ptr());
        let mut sums = [[_mm512_setzero_ps(); P]; R];
        for (r, sums) in sums.iter_mut().enumerate() {
            for (p, sum) in sums.iter_mut().enumerate() {
                // SAFETY: each tile row holds 16 f32, one 512-bit load.
                *sum = unsafe { _mm512_loadu_ps(tile[r * stride + p].as_ptr()) };
            }
        }
        for g in pairs.start / GROUP_PAIRS..pairs.end.div_ceil(GROUP_PAIRS) {
            let mut acc = [[_mm512_setzero_si512(); P]; R];
            for t in g * GROUP_PAIRS..((g + 1) * GROUP_PAIRS).min(pairs.end) {
                // SAFETY: t < kp/2, so panel p's reads end at (p+1)·kp·16 and row r's at
                // r·kp + kp.
                unsafe {
                    let mut panel = [_mm512_setzero_si512(); P];
                    for (p, v) in panel.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(b.add(p * kp * NR + t * 2 * NR) as *const _);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let pair = (a.add(r * kp + 2 * t) as *const i32).read_unaligned();
                        let pair = _mm512_set1_epi32(pair);
                        for (acc, &panel) in acc.iter_mut().zip(&panel) {
                            *acc = _mm512_dpwssd_epi32(*acc, pair, panel);
                        }
                    }
                }
            }
            let mut s = [_mm512_setzero_ps(); P];
            for (p, s) in s.iter_mut().enumerate() {
                // SAFETY: p < P and g < groups, so the reads end at P·groups·16.
                *s = unsafe { _mm512_loadu_ps(scale.add((p * groups + g) * NR)) };
            }
            for (sums, acc) in sums.iter_mut().zip(&acc) {
                for ((sum, &acc), &s) in sums.iter_mut().zip(acc).zip(&s) {
                    *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, *sum);
                }
            }
        }
        for (r, sums) in sums.iter().enumerate() {
            for (p, sum) in sums.iter().enumerate() {
                // SAFETY: each tile row holds 16 f32, one 512-bit store.
                unsafe { _mm512_storeu_ps(tile[r * stride + p].as_mut_ptr(), *sum) };
            }
        }
    }
}

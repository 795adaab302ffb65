//! Integer linear layers for `--precision int8` on the CPU backend: 8-bit activations times 8-bit
//! weights, `vpdpbusd` where the CPU has AVX512-VNNI or AVX-VNNI.
//!
//! A weight `[N, K]` is quantized once, at load, symmetric per output channel and per [`GROUP`]
//! (64) consecutive inputs: `w(j, k) ≈ q·s(j, g)` with `|q| ≤ 127`, `g = k / 64`. Activations are
//! quantized at run time per token and per the same 64 inputs, asymmetric: `x(i, k) ≈ (u −
//! z)·t(i, g)` with `0 ≤ u ≤ 255`, the range `[min, max]` of the group (widened to hold 0) mapped
//! onto 0..255 and the zero `z` an integer. A group's products `Σ u·q` are summed exactly in i32
//! (at most 64·255·127 < 2^21, so exact in f32 as well), and each group adds
//! `sum ← fma(f32(Σ u·q), s·t, sum)` then `sum ← fma(−z·t, s·Σq, sum)` to the output, groups in
//! order; `s·Σq` is precomputed per weight group and `z·t` per activation group. Bias and
//! activation then run on each task's block of rows while it is in cache ([`Epilogue`]).
//!
//! Why this scheme (a fake-quantization check of all-MiniLM-L6-v2 on 100 sample documents,
//! `benches/reference/int8_fake_quant.py`, embedding cosine min against f32; the guard asks
//! 0.999): 8-bit activations with one scale per token drift too far (symmetric 0.9971,
//! asymmetric 0.9987), since a few channels of a BERT hidden state are far larger than the rest;
//! a scale per 64 inputs confines each such channel to its group (symmetric 0.99926, asymmetric
//! 0.99946, which the zero point buys for the non-negative GELU outputs), and smoothing the
//! channels after a calibration pass (`int8_linear.rs`) brings it to 0.99966, what 16-bit
//! activations per token reached at `vpdpwssd`'s rate, half of `vpdpbusd`'s. Weights get groups
//! of 64 for the same reason (one scale per channel: the feed-forward output projection alone
//! cost the model 0.0005 of cosine).
//!
//! Every kernel variant computes the same operations in the same order (exact i32 sums, then the
//! same conversion, product and two fused multiply-adds per group), so they agree bit for bit:
//! the scalar kernel (any CPU) is the reference the vector kernels are tested against. Variants:
//! - `avx512_vnni`: 512-bit `vpdpbusd` multiplies 64 u8·s8 pairs and adds each four products
//!   into its i32 lane (64 MACs per instruction, four times a 512-bit f32 FMA's 16). One register
//!   holds a k-quad of a panel (16 channels × 4 inputs); a tile of `R` rows by `P` panels keeps
//!   `R·P` i32 accumulators in registers, its f32 sums in the task's buffer (L1);
//! - `avx_vnni`: the same instruction on 256-bit registers (Alder Lake and later, Zen 5);
//! - `avx2`: `vpmaddubsw` multiplies u8 by s8 and adds pairs of products into i16, which
//!   saturates for `u·q` near 255·127, so the kernel multiplies `v = u − 128` instead: `|v| ≤
//!   128` as the unsigned operand, the weight with `v`'s sign (`vpsignb`; `|q| ≤ 127`, so the
//!   negation cannot wrap) as the signed one, at most 2·128·127 = 32512 per pair: exact.
//!   `vpmaddwd` by 1 widens the pairs into i32 lanes, and each group's sums start at `128·Σq`
//!   (kept per weight group), which makes them `Σ u·q` again. On AMD Zen 3 this runs at about
//!   the rate of its vector operations whichever they are: `vpmaddwd` on i16 rows and panels
//!   and a `vpxor`/`vpsubb` sign were no faster, and 7-bit activations, which need no sign
//!   (1.24x end to end), failed the fidelity floors (BENCHMARKS.md, 2026-12-03);
//! - `scalar`: plain loops over the same packed layout (aarch64, x86-64 without AVX2 and FMA).
//!
//! Layout: the weight is packed in panels of `NR` = 16 output channels; in a panel, k-quad `t`
//! holds `[w(c, 4t), .., w(c, 4t+3)]` for c = 0..16, i.e. 64 bytes (one 512-bit register); per
//! group it has 16 scales `s` and 16 corrections `s·Σq`. K is padded to a multiple of 4 and N to
//! a multiple of 16 with zeros. Activations stay row-major with the padded K as stride, so a
//! k-quad of one row is one u32 that the kernel broadcasts. Rayon tasks take blocks of 48 rows
//! (`panels::MC`), keep their f32 sums in a buffer of their own, and walk the reduction in
//! blocks of 256 inputs (`BLOCK_QUADS`), in each every panel group and row tile: a block of
//! panels stays in L1 while the task's rows pass over it.

use std::ops::Range;

use rayon::prelude::*;

use super::panels::{self, NR};

#[cfg(target_arch = "x86_64")]
#[path = "int8_kernels.rs"]
mod kernels;
#[cfg(target_arch = "x86_64")]
use kernels::{avx2, avx512_vnni, avx_vnni};

#[path = "int8_activations.rs"]
mod activations;
pub use activations::QuantRows;
#[cfg(target_arch = "x86_64")]
use activations::{group_range, ROUND};

/// Inputs per scale, for weights (per output channel) and activations (per token) alike.
pub const GROUP: usize = 64;
/// K-quads per scale group.
const GROUP_QUADS: usize = GROUP / 4;
/// Largest quantized weight magnitude (symmetric int8).
const W_MAX: f32 = 127.0;
/// Largest quantized activation (unsigned 8 bits).
pub const ACT_MAX: f32 = 255.0;

/// K padded to whole k-quads.
pub fn padded_k(k: usize) -> usize {
    k.next_multiple_of(4)
}

/// Scale groups over `k` inputs.
fn groups(k: usize) -> usize {
    k.div_ceil(GROUP)
}

/// Round to the nearest integer, ties to even, in a way every CPU computes identically, for
/// `|x| < 2^22` (weights divided by their group's step are within ±127). Adding 1.5·2^23 leaves
/// no fraction bits, so the addition itself rounds to nearest, ties to even; subtracting it
/// again is exact. `round_ties_even` compiles to a call to libm's `rintf` on x86-64 without
/// SSE4.1, which was 5% of an int8 BERT-base start-up.
#[inline(always)]
fn round(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// Where channel `c`'s input `p` sits within its panel: k-quad `p / 4` holds 16 channels' 4
/// consecutive inputs each.
fn in_panel(c: usize, p: usize) -> usize {
    (p / 4) * 4 * NR + c * 4 + p % 4
}

/// A weight quantized and packed for [`gemm`]: the value at `(j, k)` is `q(j, k)·s(j, k / 64)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `panels × (kq / 4) × NR × 4` values.
    packed: Vec<i8>,
    /// `panels × groups × NR` scales: `s(16·panel + c, g)` at `(panel·groups + g)·16 + c`.
    scale: Vec<f32>,
    /// The same layout: `s(j, g)·Σ_{k in g} q(j, k)`, what a zero point `z` costs an output.
    correction: Vec<f32>,
    /// The same layout: `Σ_{k in g} q(j, k)` itself, which the `avx2` kernel adds `128·` to
    /// its sums of `(u − 128)·q`.
    qsum: Vec<i32>,
    /// Per input channel, `1 / f` for the smoothing factor `f` the weight's column was
    /// multiplied by (`int8_linear.rs`; 1 without smoothing): what
    /// [`QuantRows::quantize_for`] multiplies the activations by.
    input_factor: Vec<f32>,
}

impl PackedWeight {
    /// Quantize `w` (`[n, k]`, row-major) per output channel and group of 64 inputs.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> PackedWeight {
        Self::quantize_smoothed(w, n, k, &vec![1.0; k])
    }

    /// The weight this packing stands for, `[n, k]` row-major: `q·s` with the smoothing undone
    /// (`/ f`), which is what the layer computes with up to the activations' rounding.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, groups, kq) = (self.k, groups(self.k), padded_k(self.k));
        (0..self.n * k)
            .map(|i| {
                let (panel, c, p) = (i / k / NR, i / k % NR, i % k);
                let s = self.scale[(panel * groups + p / GROUP) * NR + c] * self.input_factor[p];
                f32::from(self.packed[panel * kq * NR + in_panel(c, p)]) * s
            })
            .collect()
    }

    /// [`quantize`](Self::quantize) with input channel `k`'s column multiplied by `factor[k]`
    /// first. Panels are quantized in parallel, each straight from `w`: no copy of the weight is
    /// made (at load this ran single-threaded over two f32 copies of every weight, most of
    /// `--precision int8`'s start-up after calibration).
    pub fn quantize_smoothed(w: &[f32], n: usize, k: usize, factor: &[f32]) -> PackedWeight {
        assert_eq!(w.len(), n * k, "weight data does not match its shape");
        assert_eq!(factor.len(), k, "one smoothing factor per input channel");
        let (groups, kq, panels) = (groups(k), padded_k(k), n.div_ceil(NR));
        let mut packed = vec![0i8; panels * kq * NR];
        let mut scale = vec![0f32; panels * groups * NR];
        let mut correction = vec![0f32; panels * groups * NR];
        let mut qsum = vec![0i32; panels * groups * NR];
        packed
            .par_chunks_mut(kq * NR)
            .zip(scale.par_chunks_mut(groups * NR))
            .zip(correction.par_chunks_mut(groups * NR))
            .zip(qsum.par_chunks_mut(groups * NR))
            .enumerate()
            .for_each(|(panel, (((packed, scale), correction), qsum))| {
                let channels = (panel * NR..n.min((panel + 1) * NR)).enumerate();
                for (c, j) in channels {
                    let row = &w[j * k..(j + 1) * k];
                    for g in 0..groups {
                        let inputs = g * GROUP..((g + 1) * GROUP).min(k);
                        let smoothed = |p: usize| row[p] * factor[p];
                        let max = inputs.clone().fold(0f32, |m, p| m.max(smoothed(p).abs()));
                        let s = if max > 0.0 { max / W_MAX } else { 1.0 };
                        let mut sum = 0f32;
                        for p in inputs {
                            let q = round(smoothed(p) / s).clamp(-W_MAX, W_MAX);
                            packed[in_panel(c, p)] = q as i8;
                            sum += q;
                        }
                        scale[g * NR + c] = s;
                        // Σq is an integer below 2^13: exact in f32, and so is this one
                        // product's rounding.
                        correction[g * NR + c] = s * sum;
                        qsum[g * NR + c] = sum as i32;
                    }
                }
            });
        PackedWeight {
            n,
            k,
            packed,
            scale,
            correction,
            qsum,
            input_factor: factor.iter().map(|f| 1.0 / f).collect(),
        }
    }
}

/// `out[i, j] = Σ_g s(j, g)·t(i, g)·Σ_{k in g} (u(i, k) − z(i, g))·q(j, k)`; `out` is `[m, n]`.
pub fn gemm(x: &QuantRows, w: &PackedWeight, out: &mut [f32], epilogue: Epilogue) {
    gemm_fused_with(x, w, out, epilogue, Kernel::best());
}

/// What runs on each block of output rows once its sums are complete, while they are in cache:
/// `out[i, j] = act(out[i, j] + bias[j])` (`math::bias_act_rows`; no bias when empty, activation
/// code 0 for none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: &'a [f32],
    pub act: u8,
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

    /// Whether the kernel multiplies u8 by s8 in one instruction (`vpdpbusd`): without it int8
    /// runs near f32's speed (`precision_note` says so).
    pub fn has_vnni(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Kernel::AvxVnni | Kernel::Avx512Vnni) {
            return true;
        }
        false
    }

    /// The name `mira devices` shows.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar u8·s8",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2 vpsignb+vpmaddubsw",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avx_vnni vpdpbusd",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512_vnni vpdpbusd",
        }
    }
}

/// What a tile kernel reads: `R` activation rows at stride `a_stride` (`kq`, or `2·kq` for the
/// `avx2` kernel's rows of `v` then `|v|`, [`activations::signed_rows`]) with their per-group scales and
/// offsets (stride `groups`), `P` panels with theirs, and the k-quads to add (a range starting
/// on a group).
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    a: &'a [u8],
    a_stride: usize,
    a_scale: &'a [f32],
    a_offset: &'a [f32],
    b: &'a [i8],
    b_scale: &'a [f32],
    b_correction: &'a [f32],
    b_qsum: &'a [i32],
    kq: usize,
    groups: usize,
    quads: (usize, usize),
}

impl Tile<'_> {
    /// The scale groups the k-quads cover.
    fn group_range(&self) -> Range<usize> {
        self.quads.0 / GROUP_QUADS..self.quads.1.div_ceil(GROUP_QUADS)
    }

    /// The k-quads of group `g` within the range.
    fn quads_of(&self, g: usize) -> Range<usize> {
        (g * GROUP_QUADS).max(self.quads.0)..((g + 1) * GROUP_QUADS).min(self.quads.1)
    }
}

/// [`gemm`] with a chosen kernel and no epilogue (tests run each kernel).
pub fn gemm_with(x: &QuantRows, w: &PackedWeight, out: &mut [f32], kernel: Kernel) {
    gemm_fused_with(x, w, out, Epilogue::default(), kernel);
}

/// [`gemm`] with a chosen kernel.
pub fn gemm_fused_with(
    x: &QuantRows,
    w: &PackedWeight,
    out: &mut [f32],
    epilogue: Epilogue,
    kernel: Kernel,
) {
    assert_eq!(x.kq, padded_k(w.k), "activation and weight widths differ");
    // The vector kernels are `unsafe` on a CPU without their features: a caller's choice is
    // checked once per GEMM.
    assert!(
        Kernel::available().contains(&kernel),
        "int8 kernel {} does not run on this CPU",
        kernel.name()
    );
    // SAFETY (each vector kernel): a kernel is only chosen when the CPU has its features
    // (checked above), and `blocked` hands it a tile of `mr` rows and `np` whole panels with
    // their scales, and sums with `mr` rows of `np` at the stride it passes.
    let bytes = (&x.u[..], x.kq);
    match kernel {
        Kernel::Scalar => {
            blocked::<6, 1>(x, bytes, w, out, epilogue, |tile, mr, _, sums, stride| {
                scalar_kernel(tile, mr, sums, stride)
            })
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            let signed = activations::signed_rows(x);
            let bytes = (&signed[..], 2 * x.kq);
            blocked::<4, 1>(
                x,
                bytes,
                w,
                out,
                epilogue,
                |tile, mr, _, sums, stride| unsafe {
                    panels::by_rows!(mr, avx2::kernel(tile, sums, stride))
                },
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => blocked::<6, 1>(
            x,
            bytes,
            w,
            out,
            epilogue,
            |tile, mr, _, sums, stride| unsafe {
                panels::by_rows!(mr, avx_vnni::kernel(tile, sums, stride))
            },
        ),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => blocked::<TILE_ROWS, 3>(
            x,
            bytes,
            w,
            out,
            epilogue,
            |tile, mr, np, sums, stride| unsafe {
                match np {
                    3 => avx512_rows::<3>(mr, tile, sums, stride),
                    2 => avx512_rows::<2>(mr, tile, sums, stride),
                    _ => avx512_rows::<1>(mr, tile, sums, stride),
                }
            },
        ),
    }
}

/// Rows per tile of the 512-bit kernel.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 4;

/// The 512-bit kernel for a tile of `mr` rows of `P` panels.
///
/// # Safety
/// As [`avx512_vnni::kernel`].
#[cfg(target_arch = "x86_64")]
unsafe fn avx512_rows<const P: usize>(
    mr: usize,
    tile: Tile,
    sums: &mut [[f32; NR]],
    stride: usize,
) {
    // SAFETY: the caller's.
    unsafe { panels::by_rows!(mr, avx512_vnni::kernel[P](tile, sums, stride)) }
}

/// K-quads per cache block (four scale groups): a block of 3 panels, 12 KB, stays in L1 while
/// every row tile of a task passes over it.
const BLOCK_QUADS: usize = 4 * GROUP_QUADS;

/// The loop nest: rayon tasks take blocks of `panels::MC` rows; each walks the reduction in
/// blocks of [`BLOCK_QUADS`], in each every group of `PANELS` panels, and in each every tile of
/// `ROWS` rows; `tile(tile, rows, panels, sums, stride)` adds a tile's groups into the task's
/// f32 sums, row `r` and panel `p` at `sums[r·stride + p]`; group 0 starts each sum from zero
/// (the kernels store it, so the sums need no clearing first). The order of the groups within
/// one output is always 0, 1, 2, ..., so the result does not depend on the blocking. When N is a
/// whole number of panels the sums are the output rows themselves; otherwise a buffer of the
/// task's that is copied out. The epilogue then runs on the task's rows. The kernel reads the
/// activations from `bytes` (`x`'s or a kernel's form of them), row `i` at `i·stride`.
fn blocked<const ROWS: usize, const PANELS: usize>(
    x: &QuantRows,
    (bytes, a_stride): (&[u8], usize),
    w: &PackedWeight,
    out: &mut [f32],
    epilogue: Epilogue,
    tile: impl Fn(Tile, usize, usize, &mut [[f32; NR]], usize) + Sync,
) {
    let (m, n, kq) = (x.m, w.n, x.kq);
    assert_eq!(out.len(), m * n, "output does not match [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let (panels, quads, groups) = (n.div_ceil(NR), kq / 4, groups(w.k));
    let per_panel = groups * NR;
    let accumulate = |row0: usize, rows: usize, sums: &mut [[f32; NR]]| {
        for k0 in (0..quads).step_by(BLOCK_QUADS) {
            for first in (0..panels).step_by(PANELS) {
                let np = PANELS.min(panels - first);
                let weights = first * per_panel..(first + np) * per_panel;
                for r0 in (0..rows).step_by(ROWS) {
                    let (mr, i) = (ROWS.min(rows - r0), row0 + r0);
                    let t = Tile {
                        a: &bytes[i * a_stride..(i + mr) * a_stride],
                        a_stride,
                        a_scale: &x.scale[i * groups..(i + mr) * groups],
                        a_offset: &x.offset[i * groups..(i + mr) * groups],
                        b: &w.packed[first * kq * NR..(first + np) * kq * NR],
                        b_scale: &w.scale[weights.clone()],
                        b_correction: &w.correction[weights.clone()],
                        b_qsum: &w.qsum[weights.clone()],
                        kq,
                        groups,
                        quads: (k0, (k0 + BLOCK_QUADS).min(quads)),
                    };
                    tile(t, mr, np, &mut sums[r0 * panels + first..], panels);
                }
            }
        }
    };
    out.par_chunks_mut(panels::MC * n)
        .enumerate()
        .for_each(|(block, out)| {
            let (row0, rows) = (block * panels::MC, out.len() / n);
            if quads == 0 {
                out.fill(0.0);
            } else if n.is_multiple_of(NR) {
                accumulate(row0, rows, out.as_chunks_mut::<NR>().0);
            } else {
                let mut sums = vec![[0f32; NR]; rows * panels];
                accumulate(row0, rows, &mut sums);
                let rows = out.chunks_exact_mut(n).zip(sums.chunks_exact(panels));
                for (out, sums) in rows {
                    out.copy_from_slice(&sums.as_flattened()[..n]);
                }
            }
            if epilogue.act != 0 || !epilogue.bias.is_empty() {
                super::math::bias_act_rows(out, epilogue.bias, n, epilogue.act);
            }
        });
}

/// The reference arithmetic, one product at a time: per group the exact i32 sum, then
/// `sum = fma(f32(group), s·t, sum)` and `sum = fma(−z·t, s·Σq, sum)`, with `sum = 0` before
/// group 0 (whatever `sums` held), as every vector kernel computes it.
fn scalar_kernel(tile: Tile, mr: usize, sums: &mut [[f32; NR]], stride: usize) {
    let kq = tile.kq;
    for r in 0..mr {
        let row = &tile.a[r * tile.a_stride..][..kq];
        let out = &mut sums[r * stride];
        for g in tile.group_range() {
            let mut group = [0i32; NR];
            for t in tile.quads_of(g) {
                let bt = &tile.b[t * 4 * NR..(t + 1) * 4 * NR];
                for (c, acc) in group.iter_mut().enumerate() {
                    for i in 0..4 {
                        *acc += row[4 * t + i] as i32 * bt[4 * c + i] as i32;
                    }
                }
            }
            let (t, zt) = (
                tile.a_scale[r * tile.groups + g],
                tile.a_offset[r * tile.groups + g],
            );
            let s = &tile.b_scale[g * NR..(g + 1) * NR];
            let corr = &tile.b_correction[g * NR..(g + 1) * NR];
            for c in 0..NR {
                let sum = if g == 0 { 0.0 } else { out[c] };
                let v = (group[c] as f32).mul_add(s[c] * t, sum);
                out[c] = (-zt).mul_add(corr[c], v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The shift trick rounds like `round_ties_even` over the whole range weights use, ties and
    /// values next to them included.
    #[test]
    fn round_is_ties_to_even() {
        for i in -2600..=2600 {
            let tie = i as f32 + 0.5;
            for x in [i as f32 / 10.0, tie, tie.next_up(), tie.next_down()] {
                assert_eq!(super::round(x), x.round_ties_even(), "round({x})");
            }
        }
    }
}

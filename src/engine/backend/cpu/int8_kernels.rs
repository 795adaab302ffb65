//! The x86-64 vector micro-kernels of `int8.rs` (its child module, so that they read its tiles'
//! fields): 256-bit `avx2` and `avx_vnni`, 512-bit `avx512_vnni`, and the activation quantizer
//! for whole groups (`quantize`). Each computes exactly what `int8.rs`'s scalar code does, in the
//! same order; `int8.rs` says how and why.

/// A 256-bit micro-kernel module `$module` with `kernel::<R>`: the `R`×16 tile, per k-quad two
/// panel loads (channels 0..8 and 8..16) and per row `$row(quad)` of the row's quad (as an i32),
/// then `$mac(acc, row, b)` into each of the row's two i32 accumulators, which each group starts
/// at `$start(Σq)` (the group's weight sums, 8 channels); per group each accumulator is converted
/// and added to the tile's f32 sums (group 0 to zero) as the scalar kernel does.
macro_rules! ymm_kernel {
    (
        $module:ident, $features:literal, $what:literal,
        row: |$quad:ident, $kq:ident| $row:expr,
        start: |$qsum:ident| $start:expr,
        mac: |$acc:ident, $x:ident: $xty:ty, $b:ident| $mac:expr
    ) => {
        pub mod $module {
            use super::super::{Tile, NR};
            use std::arch::x86_64::*;

            #[doc = concat!("The `R`×16 tile: ", $what, ".")]
            ///
            /// # Safety
            #[doc = concat!("The CPU must have ", $features, "; `tile` must hold `R` rows and one panel with their scales, its k-quads lie within `kq / 4` and start on a group, and `sums` hold `R` rows at `stride`.")]
            #[target_feature(enable = $features)]
            pub unsafe fn kernel<const R: usize>(tile: Tile, sums: &mut [[f32; NR]], stride: usize) {
                let (kq, groups) = (tile.kq, tile.groups);
                debug_assert!(tile.a.len() >= R * tile.a_stride && tile.b.len() >= kq * NR);
                debug_assert!(tile.quads.1 <= kq / 4 && sums.len() > (R - 1) * stride);
                debug_assert!(tile.b_scale.len() >= tile.group_range().end * NR);
                let (a, b) = (tile.a.as_ptr(), tile.b.as_ptr());
                let row = |$quad: *const u8, $kq: usize| -> $xty { $row };
                let start = |$qsum: __m256i| $start;
                let mac = |$acc: __m256i, $x: $xty, $b: __m256i| $mac;
                for g in tile.group_range() {
                    let qsum = &tile.b_qsum[g * NR..][..NR];
                    // SAFETY: two loads of 8 i32 from the group's 16.
                    let first = unsafe {
                        [0, 8].map(|h| start(_mm256_loadu_si256(qsum.as_ptr().add(h) as *const _)))
                    };
                    let mut acc = [first; R];
                    for t in tile.quads_of(g) {
                        // SAFETY: t < kq/4, so the panel reads end at kq·16 and the row reads
                        // within row·a_stride + a_stride.
                        unsafe {
                            let b0 = _mm256_loadu_si256(b.add(t * 4 * NR) as *const __m256i);
                            let b1 = _mm256_loadu_si256(b.add(t * 4 * NR + 32) as *const __m256i);
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let x = row(a.add(r * tile.a_stride + 4 * t), kq);
                                acc[0] = mac(acc[0], x, b0);
                                acc[1] = mac(acc[1], x, b1);
                            }
                        }
                    }
                    let (s, corr) = (&tile.b_scale[g * NR..][..NR], &tile.b_correction[g * NR..][..NR]);
                    for (r, acc) in acc.iter().enumerate() {
                        let t = _mm256_set1_ps(tile.a_scale[r * groups + g]);
                        let zt = _mm256_set1_ps(-tile.a_offset[r * groups + g]);
                        let out = &mut sums[r * stride];
                        for (h, &acc) in acc.iter().enumerate() {
                            // SAFETY: each half reads and writes 8 of the 16 values.
                            unsafe {
                                let s = _mm256_loadu_ps(s.as_ptr().add(8 * h));
                                let corr = _mm256_loadu_ps(corr.as_ptr().add(8 * h));
                                let v = if g == 0 {
                                    _mm256_setzero_ps()
                                } else {
                                    _mm256_loadu_ps(out.as_ptr().add(8 * h))
                                };
                                let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(s, t), v);
                                _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), _mm256_fmadd_ps(zt, corr, v));
                            }
                        }
                    }
                }
            }
        }
    };
}

ymm_kernel!(
    avx2,
    "avx2,fma",
    "`v = u − 128` and `|v|` per row (`signed_rows`), per panel half `vpsignb` gives the weights `v`'s sign, \
     `vpmaddubsw` of `|v|` with them (pairs at most 2·128·127, exact in i16) and `vpmaddwd` by 1 \
     into i32; the sums start at `128·Σq`",
    // SAFETY (the reads): a row holds `v` then `|v|`, `kq` bytes each (`signed_rows`).
    row: |quad, kq| unsafe {
        let v = (quad as *const i32).read_unaligned();
        let abs = (quad.add(kq) as *const i32).read_unaligned();
        (_mm256_set1_epi32(v), _mm256_set1_epi32(abs))
    },
    start: |qsum| _mm256_slli_epi32(qsum, 7),
    mac: |acc, x: (__m256i, __m256i), b| {
        let pairs = _mm256_maddubs_epi16(x.1, _mm256_sign_epi8(b, x.0));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
);
ymm_kernel!(
    avx_vnni,
    "avx2,avxvnni,fma",
    "one `vpdpbusd` (AVX-VNNI)",
    // SAFETY: the quad lies within the row (`kernel`'s reads).
    row: |quad, _kq| _mm256_set1_epi32(unsafe { (quad as *const i32).read_unaligned() }),
    start: |_qsum| _mm256_setzero_si256(),
    mac: |acc, x: __m256i, b| _mm256_dpbusd_avx_epi32(acc, x, b)
);

pub mod avx512_vnni {
    use super::super::{Tile, NR};
    use std::arch::x86_64::*;

    /// The `R`×`16·P` tile with 512-bit `vpdpbusd`: per k-quad, one register per panel (`P`
    /// loads) and one broadcast per row feed `R·P` independent i32 accumulators; at the end of
    /// each group they are converted and added to the tile's f32 sums (group 0 to zero) as the
    /// scalar kernel does.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-VNNI; `tile` must hold `R` rows and `P` panels with
    /// their scales, its k-quads lie within `kq / 4` and start on a group, and `sums` hold `R`
    /// rows of `P` at `stride`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn kernel<const R: usize, const P: usize>(
        tile: Tile,
        sums: &mut [[f32; NR]],
        stride: usize,
    ) {
        let (kq, groups) = (tile.kq, tile.groups);
        debug_assert!(tile.a.len() >= R * kq && tile.b.len() >= P * kq * NR);
        debug_assert!(tile.quads.1 <= kq / 4 && sums.len() >= (R - 1) * stride + P);
        debug_assert!(tile.b_scale.len() >= P * groups * NR);
        let (a, b) = (tile.a.as_ptr(), tile.b.as_ptr());
        for g in tile.group_range() {
            let mut acc = [[_mm512_setzero_si512(); P]; R];
            for t in tile.quads_of(g) {
                // SAFETY: t < kq/4, so panel p's reads end at (p+1)·kq·16 and row r's at
                // r·kq + kq.
                unsafe {
                    let mut panel = [_mm512_setzero_si512(); P];
                    for (p, v) in panel.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(b.add(p * kq * NR + t * 4 * NR) as *const _);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let quad =
                            (a.add(r * tile.a_stride + 4 * t) as *const i32).read_unaligned();
                        let quad = _mm512_set1_epi32(quad);
                        for (acc, &panel) in acc.iter_mut().zip(&panel) {
                            *acc = _mm512_dpbusd_epi32(*acc, quad, panel);
                        }
                    }
                }
            }
            let (mut s, mut corr) = ([_mm512_setzero_ps(); P], [_mm512_setzero_ps(); P]);
            for p in 0..P {
                let at = (p * groups + g) * NR;
                // SAFETY: p < P and g < groups, so the reads end at P·groups·16.
                unsafe {
                    s[p] = _mm512_loadu_ps(tile.b_scale.as_ptr().add(at));
                    corr[p] = _mm512_loadu_ps(tile.b_correction.as_ptr().add(at));
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let t = _mm512_set1_ps(tile.a_scale[r * groups + g]);
                let zt = _mm512_set1_ps(-tile.a_offset[r * groups + g]);
                for (p, &acc) in acc.iter().enumerate() {
                    let out = sums[r * stride + p].as_mut_ptr();
                    // SAFETY: each tile row holds 16 f32, one 512-bit load and store.
                    unsafe {
                        let v = if g == 0 {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_loadu_ps(out)
                        };
                        let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s[p], t), v);
                        _mm512_storeu_ps(out, _mm512_fmadd_ps(zt, corr[p], v));
                    }
                }
            }
        }
    }
}

/// Quantize one whole group of 64 activations, as `int8.rs`'s `quantize_group` does: per lane
/// `min`/`max` against the running range (`vminps(v, lo)` is `v < lo ? v : lo`, the scalar
/// select), `Σ v·0` for finiteness, the same [`group_range`](super::group_range), then
/// `v·inv + z` (a product and a sum, not fused), clamped by `vmaxps`/`vminps` and rounded by
/// [`ROUND`](super::ROUND); the byte is the float's low byte.
pub mod quantize {
    use super::super::{group_range, ACT_MAX, GROUP, ROUND};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX512F; `x`, `factor` and `u` hold 64 values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(x: &[f32], factor: &[f32], u: &mut [u8]) -> (f32, f32) {
        assert!(x.len() == GROUP && factor.len() == GROUP && u.len() == GROUP);
        let zero = _mm512_setzero_ps();
        let (mut v, mut lo, mut hi, mut poison) = ([zero; 4], zero, zero, zero);
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: i < 4, 16 values each, within the 64 asserted above.
            unsafe {
                let xs = _mm512_loadu_ps(x.as_ptr().add(16 * i));
                *v = _mm512_mul_ps(xs, _mm512_loadu_ps(factor.as_ptr().add(16 * i)));
            }
            lo = _mm512_min_ps(*v, lo);
            hi = _mm512_max_ps(*v, hi);
            poison = _mm512_add_ps(poison, _mm512_mul_ps(*v, zero));
        }
        let finite = _mm512_reduce_add_ps(poison) == 0.0;
        let (inv, z, group) =
            group_range(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), finite);
        let (inv, z) = (_mm512_set1_ps(inv), _mm512_set1_ps(z));
        let (top, round) = (_mm512_set1_ps(ACT_MAX), _mm512_set1_ps(ROUND));
        for (i, &v) in v.iter().enumerate() {
            let r = _mm512_add_ps(_mm512_mul_ps(v, inv), z);
            let r = _mm512_add_ps(_mm512_min_ps(_mm512_max_ps(r, zero), top), round);
            let bytes = _mm512_cvtepi32_epi8(_mm512_castps_si512(r));
            // SAFETY: 16 bytes at 16·i, within the 64 asserted above.
            unsafe { _mm_storeu_si128(u.as_mut_ptr().add(16 * i) as *mut __m128i, bytes) };
        }
        group
    }

    /// # Safety
    /// The CPU must have AVX2; `x`, `factor` and `u` hold 64 values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(x: &[f32], factor: &[f32], u: &mut [u8]) -> (f32, f32) {
        assert!(x.len() == GROUP && factor.len() == GROUP && u.len() == GROUP);
        let zero = _mm256_setzero_ps();
        let (mut v, mut lo, mut hi, mut poison) = ([zero; 8], zero, zero, zero);
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: i < 8, 8 values each, within the 64 asserted above.
            unsafe {
                let xs = _mm256_loadu_ps(x.as_ptr().add(8 * i));
                *v = _mm256_mul_ps(xs, _mm256_loadu_ps(factor.as_ptr().add(8 * i)));
            }
            lo = _mm256_min_ps(*v, lo);
            hi = _mm256_max_ps(*v, hi);
            poison = _mm256_add_ps(poison, _mm256_mul_ps(*v, zero));
        }
        // SAFETY: a 256-bit register is eight f32 lanes.
        let lanes = |v: __m256| -> [f32; 8] { unsafe { std::mem::transmute(v) } };
        let lo = lanes(lo)
            .into_iter()
            .fold(0f32, |m, v| if v < m { v } else { m });
        let hi = lanes(hi)
            .into_iter()
            .fold(0f32, |m, v| if v > m { v } else { m });
        let finite = lanes(poison).into_iter().sum::<f32>() == 0.0;
        let (inv, z, group) = group_range(lo, hi, finite);
        let (inv, z) = (_mm256_set1_ps(inv), _mm256_set1_ps(z));
        let (top, round) = (_mm256_set1_ps(ACT_MAX), _mm256_set1_ps(ROUND));
        let low_byte = _mm256_set1_epi32(0xff);
        let mut ints = [_mm256_setzero_si256(); 8];
        for (int, &v) in ints.iter_mut().zip(&v) {
            let r = _mm256_add_ps(_mm256_mul_ps(v, inv), z);
            let r = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(r, zero), top), round);
            *int = _mm256_and_si256(_mm256_castps_si256(r), low_byte);
        }
        // Pack 32 i32 (0..=255) into bytes: the packs interleave 128-bit lanes, the permute
        // puts the dwords back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (half, ints) in ints.chunks_exact(4).enumerate() {
            let ab = _mm256_packs_epi32(ints[0], ints[1]);
            let cd = _mm256_packs_epi32(ints[2], ints[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
            // SAFETY: 32 bytes at 32·half, within the 64 asserted above.
            unsafe { _mm256_storeu_si256(u.as_mut_ptr().add(32 * half) as *mut __m256i, bytes) };
        }
        group
    }
}

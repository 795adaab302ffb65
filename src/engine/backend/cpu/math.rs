//! Branch-free f32 math for the CPU backend's element-wise work.
//!
//! `exp`, `erf` and `tanh` from libm are scalar calls that block auto-vectorisation; at BERT sizes
//! the GELU after the FFN up-projection and the softmax in attention would cost a large fraction of
//! the GEMM time. These versions are plain arithmetic (clamp, polynomial, bit tricks), so a loop
//! over a slice vectorises; the `multiversion!` entry points are compiled three times (AVX-512,
//! AVX2+FMA, baseline) and pick one at run time.
//! Accuracy (checked in tests against f64 libm): |exp err| ≤ 2 ulp-ish relative 3e-7,
//! |erf err| ≤ 6e-7 absolute (a few ulp of 1).

/// Fast `e^x` for `x` in the f32 range (inputs are clamped to `[-87.3, 88.0]`), for tanh and
/// SiLU; the attention softmax has its own base-2 version ([`exp_shifted`]).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = -n * LN2_LO + (-n * LN2_HI + x);
    // exp(r) on |r| ≤ ln2/2: degree-6 Taylor polynomial, Horner form.
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // n + 1.5·2^23 holds n in its low mantissa bits: read it back with integer ops (a float to
    // int `as` cast saturates and checks NaN, which blocks vectorisation).
    let n_int = (n + ROUND).to_bits() as i32 - 0x4B40_0000;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
}

/// Fast `erf(x)`: a rational approximation on `[-4, 4]` (outside, erf is ±1 in f32).
/// Coefficients from Eigen's `generic_fast_erf_float` (also used by XLA).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<false>(x)
}

/// [`erf`] with both polynomials in fused multiply-adds where the variant has FMA ([`madd`]):
/// 11 operations instead of 22, for GELU.
#[inline(always)]
pub fn erf_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024_1e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ] {
        p = madd::<FMA>(p, x2, c);
    }
    let mut q = -1.456_607_2e-5_f32;
    for c in [
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ] {
        q = madd::<FMA>(q, x2, c);
    }
    x * p / q
}

/// `tanh(x) = 1 - 2 / (e^{2x} + 1)`, exact to ~1e-7 absolute.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// `FMA` as in [`erf_with`].
#[inline(always)]
pub fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_with::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `a·b + c`, fused where the variant being compiled has FMA (see [`multiversion!`]); a plain
/// multiply-add otherwise (`mul_add` without hardware FMA is a slow libm call).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ f(v)` over `row` in 16 independent lanes, then the remainder, then the lanes in order:
/// a vector sum (one running float sum is a serial chain of adds, which left LayerNorm
/// latency-bound).
#[inline(always)]
pub fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut lanes = [0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Softmax of a row in place; `FMA` as in [`exp_row`].
#[inline(always)]
pub fn softmax_row<const FMA: bool>(row: &mut [f32]) {
    let inv = 1.0 / exp_row::<FMA>(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `x = exp(x - max(row))` in place; returns the sum (the softmax denominator). Each value is
/// [`exp_shifted`]; the sum runs in 16 lanes (value `i` into lane `i % 16`, in order), then
/// [`tree_sum`] (one running float sum is a serial chain that does not vectorise).
/// `FMA`: fused multiply-adds ([`madd`]).
#[inline(always)]
pub fn exp_row<const FMA: bool>(row: &mut [f32]) -> f32 {
    const L: usize = 16;
    let max = row_max(row);
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for (s, x) in sums.iter_mut().zip(c.iter_mut()) {
            *x = exp_shifted::<FMA>(*x - max);
            *s += *x;
        }
    }
    for (s, x) in sums.iter_mut().zip(chunks.into_remainder()) {
        *x = exp_shifted::<FMA>(*x - max);
        *s += *x;
    }
    tree_sum(sums)
}

/// The largest value of `row` (−∞ for an empty one), in 16 lanes.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if x > *m { x } else { *m };
    }
    lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// 16 lane sums added pairwise (lane `i` + lane `i + 8`, then `+ 4`, `+ 2`, `+ 1`): four
/// dependent adds instead of fifteen, in one order every variant shares.
#[inline(always)]
fn tree_sum(mut lanes: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

/// Cephes' `exp2f` polynomial `P`: `2^f ≈ 1 + f·P(f)` on `|f| ≤ 1/2`, relative error about
/// 2^-23.
const EXP2_POLY: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_438e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// `e^d` for `d ≤ 0` (a score minus its row's maximum) as `2^t`, `t = d·log2 e` clamped at −126:
/// `n = round(t)`, `f = t − n`, `2^f` from [`EXP2_POLY`], times `2^n`. The rounding and the
/// scaling are plain arithmetic here; [`exp_row_avx512`] does them in one instruction each
/// (`vrndscaleps`, `vscalefps`) and gets the same values. Below e^-87 the result is 2^-126
/// (about 1e-38) rather than 0, as [`exp`] clamps too.
#[inline(always)]
pub fn exp_shifted<const FMA: bool>(d: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer, ties to even
    let t = d * std::f32::consts::LOG2_E;
    let t = if t > -126.0 { t } else { -126.0 };
    // t + 1.5·2^23 holds n = round(t) (−126..=0) in its low mantissa bits.
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let p = exp2_fraction::<FMA>(t - n);
    // 2^n built from bits (a float to int `as` cast saturates and checks NaN, which blocks
    // vectorisation).
    let n_int = shifted.to_bits() as i32 - 0x4B40_0000;
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `2^f = 1 + f·P(f)` on `|f| ≤ 1/2` ([`EXP2_POLY`] in Horner form).
#[inline(always)]
fn exp2_fraction<const FMA: bool>(f: f32) -> f32 {
    let mut p = EXP2_POLY[0];
    for c in &EXP2_POLY[1..] {
        p = madd::<FMA>(p, f, *c);
    }
    madd::<FMA>(p, f, 1.0)
}

/// [`exp_row`] (with fused multiply-adds) in AVX-512 intrinsics: `vrndscaleps` rounds `t` and
/// `vscalefps` multiplies by `2^n`, where the portable code spends six operations on both, and
/// the last `len % 16` values go through the same vector code under a mask instead of one at a
/// time. Same values bit for bit: both round to nearest even, both scale by an exact power of
/// two with one rounding, and both sum the same lanes in the same order.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_row_avx512(row: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let (n16, rest) = (row.len() / 16 * 16, row.len() % 16);
    // The remainder's lanes: whole vectors with masked loads and stores, as the full chunks.
    let tail: __mmask16 = (1u32 << rest) as u16 - 1;
    let ptr = row.as_mut_ptr();
    let mut lanes_max = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 ≤ row.len().
        lanes_max = _mm512_max_ps(lanes_max, unsafe { _mm512_loadu_ps(ptr.add(i)) });
    }
    // SAFETY: the mask covers only elements n16..row.len().
    let x = unsafe { _mm512_maskz_loadu_ps(tail, ptr.add(n16)) };
    lanes_max = _mm512_mask_max_ps(lanes_max, tail, lanes_max, x);
    // The maximum is exact in any order.
    let max = _mm512_reduce_max_ps(lanes_max);
    let (vmax, log2e, floor, one) = (
        _mm512_set1_ps(max),
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(-126.0),
        _mm512_set1_ps(1.0),
    );
    let exp = |x: __m512| {
        let t = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(x, vmax), log2e), floor);
        let n = _mm512_roundscale_ps::<NEAREST>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(EXP2_POLY[0]);
        for c in &EXP2_POLY[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(_mm512_fmadd_ps(p, f, one), n)
    };
    let mut sums = _mm512_setzero_ps();
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 ≤ row.len().
        let e = exp(unsafe { _mm512_loadu_ps(ptr.add(i)) });
        unsafe { _mm512_storeu_ps(ptr.add(i), e) };
        sums = _mm512_add_ps(sums, e);
    }
    let e = exp(x);
    // SAFETY: as for the masked load.
    unsafe { _mm512_mask_storeu_ps(ptr.add(n16), tail, e) };
    sums = _mm512_mask_add_ps(sums, tail, sums, e);
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
    tree_sum(lanes)
}

/// Define `pub fn $name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has
/// them and for the baseline target otherwise. The body must only call `#[inline(always)]` helpers so that
/// it is compiled (and vectorised) inside each variant. Inside the body, the const `FMA` tells
/// whether the variant has fused multiply-add (use [`madd`]).
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) { body::<true>($($arg),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature enabled on `avx512`, checked above.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) { body::<true>($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body::<false>($($arg),*)
        }
    };
}

multiversion! {
    /// Apply `f` element-wise, chosen by activation kind (0 none, 1 gelu, 2 gelu-tanh, 3 relu,
    /// 4 silu, 5 tanh), optionally adding a bias row first: `x[r][c] = f(x[r][c] + bias[c])`.
    pub fn bias_act_rows(x: &mut [f32], bias: &[f32], cols: usize, kind: u8) {
        for row in x.chunks_exact_mut(cols) {
            if !bias.is_empty() {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += *b;
                }
            }
            match kind {
                1 => row.iter_mut().for_each(|v| *v = gelu_erf::<FMA>(*v)),
                2 => row.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
                3 => row.iter_mut().for_each(|v| *v = v.max(0.0)),
                4 => row.iter_mut().for_each(|v| *v = silu(*v)),
                5 => row.iter_mut().for_each(|v| *v = tanh(*v)),
                _ => {}
            }
        }
    }
}

multiversion! {
    /// Softmax of each row of `x` (`[rows, cols]`) in place.
    pub fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            softmax_row::<FMA>(row);
        }
    }
}

multiversion! {
    /// `x = LayerNorm(x + residual) · w + b` for each row (`residual` may be empty).
    pub fn add_layernorm_rows(x: &mut [f32], residual: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let cols = w.len();
        for (r, row) in x.chunks_exact_mut(cols).enumerate() {
            if !residual.is_empty() {
                let res = &residual[r * cols..(r + 1) * cols];
                row.iter_mut().zip(res).for_each(|(v, r)| *v += *r);
            }
            let mean = lane_sum(row, |v| v) / cols as f32;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / cols as f32;
            let inv = 1.0 / (var + eps).sqrt();
            if b.is_empty() {
                for (v, w) in row.iter_mut().zip(w) {
                    *v = (*v - mean) * inv * w;
                }
            } else {
                for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                    *v = (*v - mean) * inv * w + b;
                }
            }
        }
    }
}

multiversion! {
    /// `x += delta; out = LayerNorm(x) · w + b` for each row (`b` may be empty).
    pub fn add_norm_rows(x: &mut [f32], delta: &[f32], out: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let cols = w.len();
        for ((row, d), o) in x.chunks_exact_mut(cols).zip(delta.chunks_exact(cols)).zip(out.chunks_exact_mut(cols)) {
            row.iter_mut().zip(d).for_each(|(v, d)| *v += *d);
            o.copy_from_slice(row);
        }
        add_layernorm_rows(out, &[], w, b, eps);
    }
}

multiversion! {
    /// `out[r][c] = act(x[r][c]) · x[r][I + c]` for `x` of rows `2I` wide (activation kinds as in
    /// [`bias_act_rows`]).
    pub fn geglu_rows(x: &[f32], out: &mut [f32], inter: usize, kind: u8) {
        for (xr, o) in x.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            o.copy_from_slice(&xr[..inter]);
            bias_act_rows(o, &[], inter, kind);
            o.iter_mut().zip(&xr[inter..]).for_each(|(v, g)| *v *= *g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f64> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f64 / n as f64)
    }

    #[test]
    fn exp_matches_libm() {
        for x in grid(-87.0, 88.0, 200_000) {
            let want = libm::exp(x as f32 as f64);
            let got = exp(x as f32) as f64;
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    /// The softmax's exponential, portable and AVX-512 (where the CPU has it), against f64:
    /// within 4e-7 relative plus 2e-9 of the row's largest term (1; `d·log2 e` rounds to
    /// f32, so e^-49 is off by 1.4e-6 of itself, a 1e-27 share of the sum), and the AVX-512 row
    /// bit for bit equal to the portable one, remainders included.
    #[test]
    fn exp_rows_match_libm_and_each_other() {
        for len in [1, 5, 16, 17, 100, 515] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i as f32 * 0.731).sin() * 40.0) - (i % 7) as f32 * 9.0)
                .collect();
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut portable = row.clone();
            let sum = exp_row::<true>(&mut portable);
            let want: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
            for (i, (&got, &want)) in portable.iter().zip(&want).enumerate() {
                let tol = 4e-7 * want + 2e-9;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "len {len}, [{i}]: {got} vs {want}"
                );
            }
            let want_sum: f64 = want.iter().sum();
            assert!(
                (sum as f64 - want_sum).abs() < 1e-6 * want_sum,
                "len {len}: sum"
            );
            let mut plain = row.clone();
            let plain_sum = exp_row::<false>(&mut plain);
            assert!((plain_sum as f64 - want_sum).abs() < 1e-6 * want_sum);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                let mut wide = row.clone();
                // SAFETY: the CPU has AVX-512F, checked just above.
                let wide_sum = unsafe { exp_row_avx512(&mut wide) };
                assert_eq!(wide_sum.to_bits(), sum.to_bits(), "len {len}: sums differ");
                for (i, (a, b)) in wide.iter().zip(&portable).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "len {len}, [{i}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn erf_matches_libm() {
        for x in grid(-6.0, 6.0, 200_000) {
            let want = libm::erf(x as f32 as f64);
            for (got, how) in [
                (erf(x as f32), "plain"),
                (erf_with::<true>(x as f32), "fused"),
            ] {
                let got = got as f64;
                assert!(
                    (got - want).abs() < 6e-7,
                    "{how} erf({x}) = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn tanh_and_gelus_match_libm() {
        for x in grid(-12.0, 12.0, 100_000) {
            let xf = x as f32 as f64;
            assert!(
                (tanh(xf as f32) as f64 - libm::tanh(xf)).abs() < 3e-7,
                "tanh({x})"
            );
            let want = 0.5 * xf * (1.0 + libm::erf(xf / std::f64::consts::SQRT_2));
            for got in [gelu_erf::<false>(xf as f32), gelu_erf::<true>(xf as f32)] {
                assert!(
                    (got as f64 - want).abs() < 2e-6 * (1.0 + xf.abs()),
                    "gelu({x})"
                );
            }
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * xf * (1.0 + libm::tanh(c * (xf + 0.044715 * xf * xf * xf)));
            assert!(
                (gelu_tanh(xf as f32) as f64 - want).abs() < 2e-6 * (1.0 + xf.abs()),
                "gelu_tanh({x})"
            );
        }
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut x: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let orig = x.clone();
        softmax_rows(&mut x, 10);
        for (r, row) in x.chunks(10).enumerate() {
            let src = &orig[r * 10..r * 10 + 10];
            let m = src.iter().cloned().fold(f64::MIN as f32, f32::max) as f64;
            let z: f64 = src.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (v, s) in row.iter().zip(src) {
                assert!((*v as f64 - (*s as f64 - m).exp() / z).abs() < 1e-6);
            }
        }
    }
}

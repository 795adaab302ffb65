//! Every CPU backend op against a naive float64 reference on fresh random inputs at awkward sizes
//! (not multiples of any tile): the float64 column of the op table (`op_table/mod.rs`), one
//! `#[test]` per op.

mod op_table;

use mira::engine::backend::cpu::{bf16, int8, CpuBackend};
use mira::engine::backend::{Backend, EmbeddingTables, Ntk, Rotary};
use mira::engine::{Activation, Batch, LinearKind, Pooling, Precision};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-scale, scale).
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() * 2.0 - 1.0) * scale) as f32)
            .collect()
    }
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] is {g}");
        assert!(
            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn batch(lens: &[usize]) -> Batch {
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&l| (0..l as u32).map(|t| t % 7).collect())
        .collect();
    Batch::from_sequences(seqs.iter().enumerate().map(|(d, s)| (d, &s[..])))
}

fn act_ref(x: f64, act: Activation) -> f64 {
    match act {
        Activation::None => x,
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

fn linear_with_bias_and_every_activation() {
    let be = CpuBackend::default();
    let mut rng = Rng(0x5eed);
    for (m, k, n) in [(1, 1, 1), (7, 33, 65), (130, 97, 31), (3, 384, 1153)] {
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let b = rng.vec(n, 1.0);
        let (xt, wt, bt) = (
            be.weight(x.clone(), m, k).unwrap(),
            be.weight(w.clone(), n, k).unwrap(),
            be.weight(b.clone(), 1, n).unwrap(),
        );
        for act in Activation::ALL {
            for bias in [false, true] {
                let out = be.linear(&xt, &wt, bias.then_some(&bt), act).unwrap();
                let mut want = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = if bias { b[j] as f64 } else { 0.0 };
                        for p in 0..k {
                            acc += x[i * k + p] as f64 * w[j * k + p] as f64;
                        }
                        want[i * n + j] = act_ref(acc, act);
                    }
                }
                assert_close(
                    out.data(),
                    &want,
                    2e-5 * (k as f64).sqrt(),
                    &format!("linear {m}x{k}x{n} {act:?} bias={bias}"),
                );
            }
        }
    }
}

/// `x·wᵀ` through `linear_weight` as a layer of `kind` (`x` is `[m, k]`, `w` is `[n, k]`).
fn linear_of_kind(
    be: &CpuBackend,
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    kind: LinearKind,
) -> Vec<f32> {
    let wt = be.linear_weight(w.to_vec(), n, k, kind).unwrap();
    let xt = be.weight(x.to_vec(), m, k).unwrap();
    let out = be.linear(&xt, &wt, None, Activation::None).unwrap();
    out.data().to_vec()
}

/// The int8 linear layer (`--precision int8`) against float64 on the unquantized operands: each
/// output within the rigorous bound of its rounding (`Σ|x|·s_w/2 + Σ|ŵ|·s_x/2`, scales from this
/// test's own float64 quantizer), and on average well inside it; a row holding a NaN gives NaNs.
fn int8_linear_matches_reference() {
    let be = CpuBackend::new(Precision::Int8);
    let mut rng = Rng(0x1e8);
    for (m, k, n) in [
        (1, 1, 1),
        (7, 33, 65),
        (130, 97, 31),
        (13, 1537, 70),
        (3, 384, 1153),
        (50, 384, 64),
    ] {
        let x = rng.vec(m * k, 2.0);
        let w = rng.vec(n * k, 1.0 / (k as f64).sqrt());
        let b = rng.vec(n, 0.5);
        let xt = be.weight(x.clone(), m, k).unwrap();
        let wt = be
            .linear_weight(w.clone(), n, k, LinearKind::FeedForwardUp)
            .unwrap();
        let bt = be.weight(b.clone(), 1, n).unwrap();
        let out = be.linear(&xt, &wt, Some(&bt), Activation::None).unwrap();
        // Activations per row and group of 64 inputs, 8-bit asymmetric over the group's range
        // widened to hold 0 (each value within half a step); weights per channel and group.
        let max_abs = |v: &[f32]| v.iter().fold(0f64, |a, &b| a.max((b as f64).abs()));
        let step = |v: &[f32]| {
            let (lo, hi) = v.iter().fold((0f64, 0f64), |(lo, hi), &b| {
                (lo.min(b as f64), hi.max(b as f64))
            });
            (hi - lo) / 255.0
        };
        let (mut err_sum, mut bound_sum) = (0f64, 0f64);
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..n {
                let wr = &w[j * k..(j + 1) * k];
                let (mut exact, mut bound) = (b[j] as f64, 0f64);
                for (xg, wg) in xr.chunks(64).zip(wr.chunks(64)) {
                    let sx = step(xg);
                    let sw = max_abs(wg) / 127.0;
                    for (&xv, &wv) in xg.iter().zip(wg) {
                        let (xv, wv) = (xv as f64, wv as f64);
                        exact += xv * wv;
                        bound += xv.abs() * sw / 2.0 + (wv.abs() + sw) * sx / 2.0;
                    }
                }
                let got = out.data()[i * n + j] as f64;
                let err = (got - exact).abs();
                // f32 rounding of the scales, the group sums and the store on top of the
                // quantization bound.
                assert!(
                    err <= bound * 1.001 + 1e-5 * (1.0 + exact.abs()),
                    "int8 linear {m}x{k}x{n} [{i},{j}]: got {got}, want {exact} (bound {bound})"
                );
                err_sum += err;
                bound_sum += bound;
            }
        }
        // Rounding errors are spread, not all of one sign: the mean is far below the worst case.
        if k >= 33 {
            assert!(
                err_sum < 0.25 * bound_sum,
                "int8 linear {m}x{k}x{n}: mean error {} of bound {}",
                err_sum / (m * n) as f64,
                bound_sum / (m * n) as f64
            );
        }
        // The quantizer's dequantized weight: each value within half its group's step.
        let dequant = int8::PackedWeight::quantize(&w, n, k).dequantize();
        for (j, wr) in w.chunks_exact(k).enumerate() {
            for (p, (&orig, &q)) in wr.iter().zip(&dequant[j * k..(j + 1) * k]).enumerate() {
                let step = max_abs(&wr[p / 64 * 64..((p / 64 + 1) * 64).min(k)]) / 127.0;
                assert!(
                    (orig as f64 - q as f64).abs() <= step / 2.0 * 1.0001,
                    "int8 weight [{j},{p}]: {orig} stored as {q} (step {step})"
                );
            }
        }
    }
    // The epilogue (bias, then the activation, on each block of rows in the GEMM) gives what
    // the activation applied to the biased output gives, with and without a partial panel.
    for (m, k, n) in [(61, 70, 48), (61, 70, 40)] {
        let (x, w, b) = (rng.vec(m * k, 1.0), rng.vec(n * k, 0.2), rng.vec(n, 0.5));
        let xt = be.weight(x, m, k).unwrap();
        let wt = be
            .linear_weight(w, n, k, LinearKind::FeedForwardUp)
            .unwrap();
        let bt = be.weight(b, 1, n).unwrap();
        for act in [Activation::Gelu, Activation::Relu, Activation::Tanh] {
            let mut want = be
                .linear(&xt, &wt, Some(&bt), Activation::None)
                .unwrap()
                .data()
                .to_vec();
            mira::engine::backend::cpu::math::bias_act_rows(&mut want, &[], n, act.code());
            let got = be.linear(&xt, &wt, Some(&bt), act).unwrap();
            assert_eq!(
                got.data(),
                &want[..],
                "int8 {act:?} epilogue at {m}x{k}x{n}"
            );
        }
    }
    // A NaN in one row poisons that row only.
    let (m, k, n) = (3, 40, 20);
    let mut x = rng.vec(m * k, 1.0);
    x[k + 5] = f32::NAN;
    let w = be
        .linear_weight(rng.vec(n * k, 0.2), n, k, LinearKind::FeedForwardUp)
        .unwrap();
    let out = be
        .linear(&be.weight(x, m, k).unwrap(), &w, None, Activation::None)
        .unwrap();
    let rows: Vec<&[f32]> = out.data().chunks_exact(n).collect();
    assert!(rows[0].iter().chain(rows[2]).all(|v| v.is_finite()));
    assert!(rows[1].iter().all(|v| v.is_nan()), "{:?}", rows[1]);
    // Every kind of encoder linear map is quantized the same way (the feed-forward output
    // projection too, since weights have a scale per 64 inputs; int8.rs says why).
    let f32_be = CpuBackend::new(Precision::F32);
    let (m, k, n) = (9, 96, 40);
    let (x, w) = (rng.vec(m * k, 1.0), rng.vec(n * k, 0.2));
    let run = |be: &CpuBackend, kind| linear_of_kind(be, &x, &w, (m, k, n), kind);
    let exact = run(&f32_be, LinearKind::FeedForwardDown);
    let quantized = run(&be, LinearKind::FeedForwardUp);
    assert_ne!(quantized, exact, "int8 quantizes");
    for kind in [
        LinearKind::AttentionInput,
        LinearKind::AttentionOutput,
        LinearKind::FeedForwardDown,
    ] {
        assert_eq!(
            run(&be, kind),
            quantized,
            "{kind:?} is quantized like the others"
        );
    }
}

/// Every int8 micro-kernel this CPU runs gives the scalar kernel's results bit for bit (exact
/// i32 sums per group, then the same conversions and fused multiply-adds), at sizes that leave
/// partial tiles, panel groups and scale groups, and on inputs of only extreme values.
fn int8_kernels_agree_bit_for_bit() {
    let mut rng = Rng(0xb17);
    for (m, k, n) in [
        (1, 1, 1),
        (5, 2, 15),
        (6, 3, 16),
        (7, 33, 17),
        (49, 384, 70),
        (9, 130, 49),
        (97, 1537, 33),
    ] {
        let (mut x, mut w) = (rng.vec(m * k, 3.0), rng.vec(n * k, 0.1));
        if k == 130 {
            // Only the extremes: activations at 0 and 255 (`u − 128` at −128 and 127) against
            // weights at ±127, in every combination, the products the AVX2 kernel's i16 pairs
            // must hold without saturating.
            x.iter_mut().for_each(|v| *v = v.signum());
            w.iter_mut().for_each(|v| *v = 0.1 * v.signum());
        }
        let packed = int8::PackedWeight::quantize(&w, n, k);
        let rows = int8::QuantRows::quantize(&x, m, k);
        let mut want = vec![f32::NAN; m * n];
        int8::gemm_with(&rows, &packed, &mut want, int8::Kernel::Scalar);
        for kernel in int8::Kernel::available() {
            let mut got = vec![f32::NAN; m * n];
            int8::gemm_with(&rows, &packed, &mut got, kernel);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(
                same,
                "int8 {} differs from scalar at {m}x{k}x{n}",
                kernel.name()
            );
        }
    }
}

/// Every activation quantizer this CPU runs (the vector code of each kernel's instruction set)
/// gives the scalar reference's bytes, scales and offsets bit for bit: whole and partial groups,
/// groups all of one sign, all zero, with outliers, infinities and NaN.
fn int8_quantizers_agree_bit_for_bit() {
    let mut rng = Rng(0x9a7);
    for (m, k) in [(1, 1), (3, 64), (5, 130), (17, 384), (4, 1537)] {
        let mut x = rng.vec(m * k, 3.0);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 97 {
                0 => *v *= 1e4,
                1 => *v = v.abs(),
                2 => *v = -v.abs(),
                _ => {}
            }
        }
        if m * k > 200 {
            x[..64].fill(0.0);
            x[64..128].iter_mut().for_each(|v| *v = -v.abs());
            x[150] = f32::INFINITY;
            x[200] = f32::NAN;
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let reference = int8::QuantRows::quantize_with(&x, m, k, int8::Kernel::Scalar);
        let (u, scale, offset) = reference.parts();
        for kernel in int8::Kernel::available() {
            let got = int8::QuantRows::quantize_with(&x, m, k, kernel);
            let (gu, gs, go) = got.parts();
            let what = format!("int8 quantizer of {} at {m}x{k}", kernel.name());
            assert_eq!(gu, u, "{what}: bytes");
            assert_eq!(bits(gs), bits(scale), "{what}: scales");
            assert_eq!(bits(go), bits(offset), "{what}: offsets");
        }
    }
}

/// int8 after calibration (`Backend::set_calibrating`): while calibrating, the layer computes
/// f32's values bit for bit; afterwards it quantizes with per-channel smoothing, which on inputs
/// with a few channels far larger than the rest (as BERT hidden states have) lands much closer to
/// float64 than the same layer never calibrated. f32 does not calibrate.
fn int8_smoothing_after_calibration() {
    let mut rng = Rng(0x5a7);
    let (m, k, n) = (64, 200, 48);
    // Channels 3, 70 and 150 (one in each of the first three 64-input groups) 30x the rest.
    let inputs = |rng: &mut Rng| {
        let mut x = rng.vec(m * k, 1.0);
        for row in x.chunks_exact_mut(k) {
            for c in [3, 70, 150] {
                row[c] *= 30.0;
            }
        }
        x
    };
    let (calibration, x, w) = (inputs(&mut rng), inputs(&mut rng), rng.vec(n * k, 0.1));
    let exact: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, j) = (i / n, i % n);
            (0..k)
                .map(|p| x[r * k + p] as f64 * w[j * k + p] as f64)
                .sum()
        })
        .collect();
    let mean_err = |got: &[f32]| {
        let sum: f64 = got
            .iter()
            .zip(&exact)
            .map(|(g, e)| (*g as f64 - e).abs())
            .sum();
        sum / (m * n) as f64
    };
    let shape = (m, k, n);
    let kind = LinearKind::FeedForwardUp;
    let plain = linear_of_kind(&CpuBackend::new(Precision::Int8), &x, &w, shape, kind);
    let be = CpuBackend::new(Precision::Int8);
    let wt = be.linear_weight(w.clone(), n, k, kind).unwrap();
    let run = |x: &[f32]| {
        let xt = be.weight(x.to_vec(), m, k).unwrap();
        be.linear(&xt, &wt, None, Activation::None).unwrap()
    };
    assert!(be.set_calibrating(true), "the CPU's int8 calibrates");
    let f32_be = CpuBackend::new(Precision::F32);
    let f32_out = linear_of_kind(&f32_be, &calibration, &w, shape, kind);
    assert_eq!(
        run(&calibration).data(),
        &f32_out[..],
        "calibration runs in f32"
    );
    be.set_calibrating(false);
    let (smoothed, plain) = (mean_err(run(&x).data()), mean_err(&plain));
    assert!(
        smoothed < 0.5 * plain,
        "mean error {smoothed} after calibration, {plain} without"
    );
    assert!(
        !f32_be.set_calibrating(true),
        "f32 has nothing to calibrate"
    );
}

/// The CPU's bf16 GEMM, every kernel this CPU runs (the scalar one everywhere), against float64
/// on the bf16-rounded operands, within the f32 summation bound `(k + 2)·2^-24·Σ|x·w|`; and the
/// backend's bf16 linear layer (bias included) the same way (bf16 products where the CPU has a
/// bf16 kernel, else f32 on bf16-rounded weights, emulated as `precision.rs` says; the test's
/// input and bias are made with `weight`, which rounds them to bf16 either way).
fn bf16_linear_matches_reference() {
    let round = |v: f32| bf16::to_f32(bf16::to_bf16(v)) as f64;
    let mut rng = Rng(0xbf16);
    let be = CpuBackend::new(Precision::Bf16);
    for (m, k, n) in [
        (1, 1, 1),
        (5, 2, 15),
        (7, 33, 65),
        (130, 97, 31),
        (13, 1537, 70),
        (3, 384, 1153),
        (50, 384, 64),
    ] {
        let x = rng.vec(m * k, 2.0);
        let w = rng.vec(n * k, 1.0 / (k as f64).sqrt());
        let b = rng.vec(n, 0.5);
        let packed = bf16::PackedWeight::pack(&w, n, k);
        let rows = bf16::Bf16Rows::round(&x, m, k);
        let out = be
            .linear(
                &be.weight(x.clone(), m, k).unwrap(),
                &be.linear_weight(w.clone(), n, k, LinearKind::FeedForwardUp)
                    .unwrap(),
                Some(&be.weight(b.clone(), 1, n).unwrap()),
                Activation::None,
            )
            .unwrap();
        let bound = |abs: f64| (k + 2) as f64 * 2f64.powi(-24) * abs + 1e-30;
        for kernel in bf16::Kernel::available() {
            let mut got = vec![f32::NAN; m * n];
            bf16::gemm_with(&rows, &packed, &mut got, kernel);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut abs) = (0f64, 0f64);
                    for p in 0..k {
                        let v = round(x[i * k + p]) * round(w[j * k + p]);
                        exact += v;
                        abs += v.abs();
                    }
                    let g = got[i * n + j] as f64;
                    assert!(
                        (g - exact).abs() <= bound(abs),
                        "bf16 {} {m}x{k}x{n} [{i},{j}]: got {g}, want {exact} (bound {})",
                        kernel.name(),
                        bound(abs)
                    );
                    // The backend's layer.
                    let (mut exact, mut abs) = (round(b[j]), round(b[j]).abs());
                    for p in 0..k {
                        let v = round(x[i * k + p]) * round(w[j * k + p]);
                        exact += v;
                        abs += v.abs();
                    }
                    let g = out.data()[i * n + j] as f64;
                    assert!(
                        (g - exact).abs() <= bound(abs) + 2f64.powi(-24) * abs,
                        "bf16 linear {m}x{k}x{n} [{i},{j}]: got {g}, want {exact}"
                    );
                }
            }
        }
    }
    // Rounding to bf16 is to nearest, ties to even, and keeps infinities and NaN.
    for (v, want) in [
        (1.0f32, 0x3F80u16),
        (1.0 + 2f32.powi(-8), 0x3F80),
        (1.0 + 3.0 * 2f32.powi(-8), 0x3F82),
        (-2.5, 0xC020),
        (f32::INFINITY, 0x7F80),
        (f32::MAX, 0x7F80),
    ] {
        assert_eq!(bf16::to_bf16(v), want, "{v}");
    }
    assert!(bf16::to_f32(bf16::to_bf16(f32::NAN)).is_nan());
    // bf16 packs every kind of linear map: the same weight gives the same result whatever its
    // kind.
    let (m, k, n) = (5, 64, 24);
    let (x, w) = (rng.vec(m * k, 1.0), rng.vec(n * k, 0.2));
    let run = |kind| linear_of_kind(&be, &x, &w, (m, k, n), kind);
    assert_eq!(
        run(LinearKind::FeedForwardDown),
        run(LinearKind::FeedForwardUp)
    );
}

fn add_layernorm_matches_reference() {
    let be = CpuBackend::default();
    let mut rng = Rng(7);
    for (rows, cols) in [(1, 1), (5, 37), (67, 384)] {
        let x = rng.vec(rows * cols, 3.0);
        let r = rng.vec(rows * cols, 3.0);
        let w = rng.vec(cols, 1.0);
        let b = rng.vec(cols, 1.0);
        let out = be
            .add_layernorm(
                be.weight(x.clone(), rows, cols).unwrap(),
                &be.weight(r.clone(), rows, cols).unwrap(),
                &be.weight(w.clone(), 1, cols).unwrap(),
                Some(&be.weight(b.clone(), 1, cols).unwrap()),
                1e-5,
            )
            .unwrap();
        let mut want = vec![0f64; rows * cols];
        for i in 0..rows {
            let v: Vec<f64> = (0..cols)
                .map(|c| x[i * cols + c] as f64 + r[i * cols + c] as f64)
                .collect();
            let mean = v.iter().sum::<f64>() / cols as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / cols as f64;
            for c in 0..cols {
                want[i * cols + c] =
                    (v[c] - mean) / (var + 1e-5).sqrt() * w[c] as f64 + b[c] as f64;
            }
        }
        assert_close(
            out.data(),
            &want,
            2e-5,
            &format!("add_layernorm {rows}x{cols}"),
        );
    }
}

/// Naive attention in f64: per sequence and head, softmax(q·kᵀ/√d) v over keys with |i-j| ≤ w/2.
fn attention_ref(
    qkv: &[f32],
    lens: &[usize],
    heads: usize,
    h: usize,
    window: Option<usize>,
) -> Vec<f64> {
    let d = h / heads;
    let total: usize = lens.iter().sum();
    let mut out = vec![0f64; total * h];
    let mut start = 0;
    for &len in lens {
        for hd in 0..heads {
            for i in 0..len {
                let q = |p: usize| qkv[(start + i) * 3 * h + hd * d + p] as f64;
                let keys: Vec<usize> = (0..len)
                    .filter(|&j| window.is_none_or(|w| i.abs_diff(j) <= w / 2))
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|p| q(p) * qkv[(start + j) * 3 * h + h + hd * d + p] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, &j) in scores.iter().zip(&keys) {
                    let p = (s - max).exp() / z;
                    for c in 0..d {
                        out[(start + i) * h + hd * d + c] +=
                            p * qkv[(start + j) * 3 * h + 2 * h + hd * d + c] as f64;
                    }
                }
            }
        }
        start += len;
    }
    out
}

fn varlen_attention_with_and_without_windows() {
    let be = CpuBackend::default();
    let mut rng = Rng(42);
    for (heads, d) in [(3, 8), (2, 64), (1, 80), (12, 32)] {
        let h = heads * d;
        for lens in [vec![1], vec![5, 63, 64], vec![65, 1, 130], vec![200]] {
            let b = batch(&lens);
            let dev = be.upload_batch(&b, 7, 512).unwrap();
            let total: usize = lens.iter().sum();
            let qkv = rng.vec(total * 3 * h, 2.0);
            let qkv_t = be.weight(qkv.clone(), total, 3 * h).unwrap();
            for window in [None, Some(1), Some(7), Some(128)] {
                let out = be.attention(&qkv_t, &dev, heads, window).unwrap();
                let want = attention_ref(&qkv, &lens, heads, h, window);
                assert_close(
                    out.data(),
                    &want,
                    2e-5,
                    &format!("attention heads={heads} d={d} lens={lens:?} window={window:?}"),
                );
            }
        }
    }
}

/// DeBERTa's disentangled attention in float64: `(q_i·k_j + q_i·pk[r] + k_j·pq[r]) /
/// sqrt(d · factor)` with `r = relative_index(i, j)` (checked against transformers' buckets in
/// tests/parity.rs), softmax, times V.
#[allow(clippy::too_many_arguments)] // the op's inputs, one each
fn disentangled_ref(
    qkv: &[f32],
    lens: &[usize],
    heads: usize,
    h: usize,
    pk: Option<&[f32]>,
    pq: Option<&[f32]>,
    (span, buckets, max_relative): (usize, usize, usize),
    factor: usize,
) -> Vec<f64> {
    let d = h / heads;
    let total: usize = lens.iter().sum();
    let mut out = vec![0f64; total * h];
    let at = |m: &[f32], row: usize, stride: usize, col: usize| -> Vec<f64> {
        (0..d).map(|p| m[row * stride + col + p] as f64).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut start = 0;
    for &len in lens {
        for hd in 0..heads {
            for i in 0..len {
                let q = at(qkv, start + i, 3 * h, hd * d);
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        let k = at(qkv, start + j, 3 * h, h + hd * d);
                        let r = mira::engine::backend::relative_index(
                            i,
                            j,
                            span,
                            buckets,
                            max_relative,
                        );
                        let mut s = dot(&q, &k);
                        if let Some(pk) = pk {
                            s += dot(&q, &at(pk, r, h, hd * d));
                        }
                        if let Some(pq) = pq {
                            s += dot(&k, &at(pq, r, h, hd * d));
                        }
                        s / ((d * factor) as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / z;
                    for c in 0..d {
                        out[(start + i) * h + hd * d + c] +=
                            p * qkv[(start + j) * 3 * h + 2 * h + hd * d + c] as f64;
                    }
                }
            }
        }
        start += len;
    }
    out
}

fn disentangled_attention_matches_reference() {
    let be = CpuBackend::default();
    let mut rng = Rng(77);
    // (span, buckets, max_relative): v3-like log buckets, plain clamped distances, v3-base's.
    for rel in [(8usize, 8usize, 32usize), (16, 0, 16), (256, 256, 512)] {
        for (heads, d) in [(3usize, 8usize), (2, 64), (1, 80)] {
            let h = heads * d;
            for lens in [vec![1], vec![5, 63, 64], vec![65, 1, 130]] {
                let b = batch(&lens);
                let dev = be.upload_batch(&b, 7, 512).unwrap();
                let total: usize = lens.iter().sum();
                let qkv = rng.vec(total * 3 * h, 1.0);
                let qkv_t = be.weight(qkv.clone(), total, 3 * h).unwrap();
                let pk = rng.vec(2 * rel.0 * h, 1.0);
                let pq = rng.vec(2 * rel.0 * h, 1.0);
                let (pk_t, pq_t) = (
                    be.weight(pk.clone(), 2 * rel.0, h).unwrap(),
                    be.weight(pq.clone(), 2 * rel.0, h).unwrap(),
                );
                for (c2p, p2c) in [(true, true), (true, false), (false, true)] {
                    let factor = 1 + c2p as usize + p2c as usize;
                    let op = mira::engine::backend::Disentangled {
                        pos_key: c2p.then_some(&pk_t),
                        pos_query: p2c.then_some(&pq_t),
                        span: rel.0,
                        buckets: rel.1,
                        max_relative: rel.2,
                        scale_factor: factor,
                    };
                    let out = be.attention_disentangled(&qkv_t, &dev, heads, &op).unwrap();
                    let want = disentangled_ref(
                        &qkv,
                        &lens,
                        heads,
                        h,
                        c2p.then_some(&pk[..]),
                        p2c.then_some(&pq[..]),
                        rel,
                        factor,
                    );
                    assert_close(
                        out.data(),
                        &want,
                        2e-5,
                        &format!("disentangled heads={heads} d={d} lens={lens:?} rel={rel:?} c2p={c2p} p2c={p2c}"),
                    );
                }
            }
        }
    }
    // A table of the wrong shape is an error naming it.
    let b = batch(&[4]);
    let dev = be.upload_batch(&b, 7, 512).unwrap();
    let qkv = be.weight(rng.vec(4 * 3 * 16, 1.0), 4, 48).unwrap();
    let bad = be.weight(rng.vec(3 * 16, 1.0), 3, 16).unwrap();
    let op = mira::engine::backend::Disentangled {
        pos_key: Some(&bad),
        pos_query: None,
        span: 4,
        buckets: 0,
        max_relative: 4,
        scale_factor: 2,
    };
    let err = format!(
        "{:#}",
        be.attention_disentangled(&qkv, &dev, 2, &op).unwrap_err()
    );
    assert!(
        err.contains("pos_key is [3, 16], expected [8, 16]"),
        "{err}"
    );
}

fn embed_and_pool_match_reference() {
    let be = CpuBackend::default();
    let mut rng = Rng(99);
    let (vocab, maxpos, h) = (7, 140, 19);
    let word = rng.vec(vocab * h, 1.0);
    let pos = rng.vec(maxpos * h, 1.0);
    let typ = rng.vec(h, 1.0);
    let (lw, lb) = (rng.vec(h, 1.0), rng.vec(h, 1.0));
    let tables = EmbeddingTables {
        word: be.weight(word.clone(), vocab, h).unwrap(),
        position: Some(be.weight(pos.clone(), maxpos, h).unwrap()),
        token_type: Some(be.weight(typ.clone(), 1, h).unwrap()),
        norm_weight: be.weight(lw.clone(), 1, h).unwrap(),
        norm_bias: Some(be.weight(lb.clone(), 1, h).unwrap()),
        eps: 1e-12,
    };
    let lens = [3, 1, 130];
    let b = batch(&lens);
    let dev = be.upload_batch(&b, vocab, maxpos).unwrap();
    let x = be.embed(&dev, &tables).unwrap();
    let mut want = Vec::new();
    for (t, (&id, &p)) in b.ids.iter().zip(&b.positions).enumerate() {
        let v: Vec<f64> = (0..h)
            .map(|c| {
                word[id as usize * h + c] as f64 + pos[p as usize * h + c] as f64 + typ[c] as f64
            })
            .collect();
        let mean = v.iter().sum::<f64>() / h as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / h as f64;
        want.extend(
            (0..h).map(|c| (v[c] - mean) / (var + 1e-12).sqrt() * lw[c] as f64 + lb[c] as f64),
        );
        assert_eq!(t * h, want.len() - h);
    }
    assert_close(x.data(), &want, 2e-5, "embed");
    let cls = be.pool(&x, &dev, Pooling::Cls).unwrap();
    let mean = be.pool(&x, &dev, Pooling::Mean).unwrap();
    let both = be.pool(&x, &dev, Pooling::ClsAndMean).unwrap();
    let mut start = 0;
    for (s, &len) in lens.iter().enumerate() {
        let first: Vec<f64> = want[start * h..(start + 1) * h].to_vec();
        assert_close(&cls.data()[s * h..(s + 1) * h], &first, 1e-6, "cls pool");
        let avg: Vec<f64> = (0..h)
            .map(|c| (start..start + len).map(|t| want[t * h + c]).sum::<f64>() / len as f64)
            .collect();
        assert_close(&mean.data()[s * h..(s + 1) * h], &avg, 2e-5, "mean pool");
        let side_by_side = [first, avg].concat();
        assert_close(
            &both.data()[s * 2 * h..(s + 1) * 2 * h],
            &side_by_side,
            2e-5,
            "cls-and-mean pool",
        );
        start += len;
    }
}

fn malformed_batches_are_errors_not_ub() {
    let be = CpuBackend::default();
    let mut b = batch(&[3, 2]);
    assert!(be.upload_batch(&b, 7, 8).is_ok());
    b.cu_seqlens = vec![0, 1];
    assert!(
        be.upload_batch(&b, 7, 8).is_err(),
        "cu_seqlens short of the tokens"
    );
    let mut b = batch(&[3, 2]);
    b.cu_seqlens = vec![0, 3, 3, 5];
    b.docs.push(2);
    assert!(be.upload_batch(&b, 7, 8).is_err(), "empty sequence");
    assert!(
        be.upload_batch(&batch(&[3, 2]), 2, 8).is_err(),
        "id outside the vocabulary"
    );
    assert!(
        be.upload_batch(&batch(&[9]), 7, 8).is_err(),
        "position beyond the table"
    );
    let qkv = be.weight(vec![0.0; 5 * 12], 5, 12).unwrap();
    let dev = be.upload_batch(&batch(&[3, 2]), 7, 8).unwrap();
    assert!(be.attention(&qkv, &dev, 2, Some(0)).is_err(), "zero window");
}

fn add_norm_and_layernorm_match_reference() {
    let be = CpuBackend::default();
    let mut rng = Rng(11);
    for (rows, cols) in [(1, 3), (9, 48), (70, 64)] {
        let x = rng.vec(rows * cols, 2.0);
        let d = rng.vec(rows * cols, 2.0);
        let w = rng.vec(cols, 1.0);
        let b = rng.vec(cols, 1.0);
        let (wt, bt) = (
            be.weight(w.clone(), 1, cols).unwrap(),
            be.weight(b.clone(), 1, cols).unwrap(),
        );
        let norm = |v: &[f64], bias: bool| -> Vec<f64> {
            let mean = v.iter().sum::<f64>() / cols as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / cols as f64;
            (0..cols)
                .map(|c| {
                    (v[c] - mean) / (var + 1e-5).sqrt() * w[c] as f64
                        + if bias { b[c] as f64 } else { 0.0 }
                })
                .collect()
        };
        for bias in [false, true] {
            let mut xt = be.weight(x.clone(), rows, cols).unwrap();
            let out = be
                .add_norm(
                    &mut xt,
                    &be.weight(d.clone(), rows, cols).unwrap(),
                    &wt,
                    bias.then_some(&bt),
                    1e-5,
                )
                .unwrap();
            let sum: Vec<f64> = x
                .iter()
                .zip(&d)
                .map(|(a, b)| *a as f64 + *b as f64)
                .collect();
            assert_close(xt.data(), &sum, 1e-6, "add_norm residual");
            let want: Vec<f64> = sum.chunks(cols).flat_map(|r| norm(r, bias)).collect();
            assert_close(out.data(), &want, 2e-5, "add_norm output");
            let ln = be
                .layernorm(
                    &be.weight(x.clone(), rows, cols).unwrap(),
                    &wt,
                    bias.then_some(&bt),
                    1e-5,
                )
                .unwrap();
            let xs: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let want: Vec<f64> = xs.chunks(cols).flat_map(|r| norm(r, bias)).collect();
            assert_close(ln.data(), &want, 2e-5, "layernorm");
        }
    }
}

fn rope_rotates_q_and_k_at_sequence_positions() {
    let be = CpuBackend::default();
    let mut rng = Rng(5);
    // theta, then NTK scaling as GTE's published code has it: (factor, mixed_b).
    let cases = [
        (2, 8, 10_000.0f64, None),
        (3, 16, 160_000.0, None),
        (1, 64, 10_000.0, None),
        (2, 64, 500_000.0, Some((2.0f64, None))),
        (1, 32, 10_000.0, Some((4.0, Some(0.75f64)))),
    ];
    for (heads, d, theta, ntk) in cases {
        let h = heads * d;
        // Float64 frequencies from the published formulas (NTKScalingRotaryEmbedding).
        let freq = |i: usize| -> f64 {
            let e = (2 * i) as f64 / d as f64;
            match ntk {
                None => theta.powf(-e),
                Some((f, None)) => (theta * f).powf(-e) / f.powf(2.0 / d as f64),
                Some((f, Some(b))) => {
                    let a = f.ln() / ((d / 2) as f64).powf(b);
                    theta.powf(-e) / (a * ((i + 1) as f64).powf(b)).exp()
                }
            }
        };
        let rotary = Rotary {
            theta: theta as f32,
            ntk: ntk.map(|(factor, mixed_b)| Ntk {
                factor: factor as f32,
                mixed_b: mixed_b.map(|b| b as f32),
            }),
        };
        let lens = [1, 7, 300];
        let b = batch(&lens);
        let dev = be.upload_batch(&b, 7, 512).unwrap();
        let total: usize = lens.iter().sum();
        let qkv = rng.vec(total * 3 * h, 1.0);
        let out = be
            .rope(
                be.weight(qkv.clone(), total, 3 * h).unwrap(),
                &dev,
                heads,
                rotary,
            )
            .unwrap();
        let mut want: Vec<f64> = qkv.iter().map(|v| *v as f64).collect();
        for (t, &p) in b.positions.iter().enumerate() {
            for blk in 0..2 * heads {
                let base = t * 3 * h + blk * d;
                for i in 0..d / 2 {
                    let angle = p as f64 * freq(i);
                    let (x1, x2) = (qkv[base + i] as f64, qkv[base + i + d / 2] as f64);
                    want[base + i] = x1 * angle.cos() - x2 * angle.sin();
                    want[base + i + d / 2] = x2 * angle.cos() + x1 * angle.sin();
                }
            }
        }
        // Angles are formed in f32 (as transformers does), so allow for p·ulp(freq) at p < 300.
        assert_close(
            out.data(),
            &want,
            1e-4,
            &format!("rope heads={heads} d={d} ntk={ntk:?}"),
        );
    }
}

fn geglu_matches_reference() {
    let be = CpuBackend::default();
    let mut rng = Rng(3);
    for (rows, inter) in [(1, 1), (13, 96), (40, 1152)] {
        let x = rng.vec(rows * 2 * inter, 3.0);
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Silu] {
            let out = be
                .geglu(&be.weight(x.clone(), rows, 2 * inter).unwrap(), act)
                .unwrap();
            let want: Vec<f64> = (0..rows * inter)
                .map(|k| {
                    let (r, c) = (k / inter, k % inter);
                    act_ref(x[r * 2 * inter + c] as f64, act) * x[r * 2 * inter + inter + c] as f64
                })
                .collect();
            assert_close(
                out.data(),
                &want,
                2e-5,
                &format!("geglu {rows}x{inter} {act:?}"),
            );
        }
    }
}

macro_rules! cpu_against_f64 {
    ($op:ident, [$($vs_cpu:ident),*], [$($vs_f64:ident),*]) => {
        #[test]
        fn $op() {
            $($vs_f64();)*
        }
    };
}

op_table::every_op!(cpu_against_f64);

/// A linear weight packed for int8 or bf16 holds its values once, in the packed form: `download`
/// gives them back (int8: the f32 weight until it is packed, then within half a quantization
/// step of it, each step computed here from the weight's own groups of 64 inputs; bf16: the
/// weight rounded to bf16, exactly), and `data()` refuses rather than return nothing.
#[test]
fn packed_linear_weights_hold_their_values_once() {
    let mut rng = Rng(0x5eed);
    let (m, k, n) = (3, 150, 37);
    let (x, w) = (rng.vec(m * k, 1.0), rng.vec(n * k, 0.2));
    let kind = LinearKind::AttentionOutput;
    let be = CpuBackend::new(Precision::Int8);
    let wt = be.linear_weight(w.clone(), n, k, kind).unwrap();
    assert_eq!(
        be.download(&wt).unwrap(),
        w,
        "before packing: the f32 weight"
    );
    assert!(std::panic::catch_unwind(|| wt.data().len()).is_err());
    let xt = be.weight(x, m, k).unwrap();
    be.linear(&xt, &wt, None, Activation::None).unwrap();
    let values = be.download(&wt).unwrap();
    for j in 0..n {
        for g in (0..k).step_by(64) {
            let group = &w[j * k + g..j * k + (g + 64).min(k)];
            let step = group.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (p, want) in group.iter().enumerate() {
                let got = values[j * k + g + p];
                assert!(
                    (got - want).abs() <= 0.5 * step * (1.0 + 1e-6),
                    "({j}, {}): {got} for {want}, step {step}",
                    g + p
                );
            }
        }
    }
    assert!(wt == wt.clone(), "a packed weight equals its clone");
    // Calibrated on inputs with outlier channels, the packed weight is smoothed (columns scaled);
    // its values come back with the smoothing undone.
    let wt = be.linear_weight(w.clone(), n, k, kind).unwrap();
    let mut outliers = rng.vec(m * k, 1.0);
    outliers.iter_mut().step_by(7).for_each(|v| *v *= 40.0);
    be.set_calibrating(true);
    be.linear(
        &be.weight(outliers, m, k).unwrap(),
        &wt,
        None,
        Activation::None,
    )
    .unwrap();
    be.set_calibrating(false);
    be.linear(&xt, &wt, None, Activation::None).unwrap();
    let values = be.download(&wt).unwrap();
    let err: f32 = values.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum();
    let size: f32 = w.iter().map(|v| v.abs()).sum();
    assert!(
        err < 0.02 * size,
        "smoothed: mean error {} of the mean size",
        err / size
    );
    let be = CpuBackend::new(Precision::Bf16);
    let wt = be.linear_weight(w.clone(), n, k, kind).unwrap();
    let rounded: Vec<f32> = w.iter().map(|&v| bf16::to_f32(bf16::to_bf16(v))).collect();
    assert_eq!(
        be.download(&wt).unwrap(),
        rounded,
        "bf16: the rounded weight"
    );
}

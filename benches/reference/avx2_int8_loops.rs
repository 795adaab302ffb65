//! Register-only throughput of the AVX2 instruction sequences an int8 micro-kernel without VNNI
//! can use, against f32 FMAs, in multiply-adds per second on one core: what BENCHMARKS.md's
//! "int8 on AVX2" sections call the register-only loop. Not part of the cargo build (x86-64 with
//! AVX2 and FMA only):
//!   rustc --edition 2021 -O -C target-cpu=native benches/reference/avx2_int8_loops.rs -o /tmp/avx2_int8_loops
//!   /tmp/avx2_int8_loops
//! Each loop keeps 8 independent accumulators, each with its own weight register, so no two
//! products share both operands (until 2026-12-03 they shared four weights, and LLVM computed
//! each product once for two accumulators: the int8 figures were about twice what the sequences
//! cost). The activations change once per outer iteration, so `|a|` in `vpsignb` is computed once
//! per iteration, as mira's kernel prepares `|v|` once per GEMM. No loads, no per-group output:
//! the engine's kernels issue more.

use std::arch::x86_64::*;
use std::hint::black_box;
use std::time::Instant;

const N: usize = 20_000_000;

/// mira's landed kernel: `vpsignb`, `vpmaddubsw` of `|v|`, `vpmaddwd` by 1, `vpaddd`.
#[target_feature(enable = "avx2,fma")]
fn vpsignb(w: &[__m256i; 8], a: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let (mut acc, mut a) = ([_mm256_setzero_si256(); 8], a);
    for _ in 0..N {
        for (j, acc) in acc.iter_mut().enumerate() {
            let signed = _mm256_sign_epi8(w[j], a);
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a), signed);
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
        }
        a = _mm256_add_epi8(a, ones);
    }
    acc.into_iter().fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, v))
}

/// 7-bit operands: `vpmaddubsw`, `vpmaddwd` by 1, `vpaddd`.
#[target_feature(enable = "avx2,fma")]
fn vpmaddubsw(w: &[__m256i; 8], a: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let (mut acc, mut a) = ([_mm256_setzero_si256(); 8], a);
    for _ in 0..N {
        for (j, acc) in acc.iter_mut().enumerate() {
            let pairs = _mm256_maddubs_epi16(a, w[j]);
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
        }
        a = _mm256_add_epi8(a, ones);
    }
    acc.into_iter().fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, v))
}

/// 16-bit operands: two `vpmaddwd` and two `vpaddd` per 32 multiply-adds.
#[target_feature(enable = "avx2,fma")]
fn vpmaddwd(w: &[__m256i; 8], a: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let (mut acc, mut a, mut b) = ([_mm256_setzero_si256(); 8], a, _mm256_slli_epi16(a, 1));
    for _ in 0..N {
        for (j, acc) in acc.iter_mut().enumerate() {
            let low = _mm256_madd_epi16(a, w[j]);
            let high = _mm256_madd_epi16(b, w[j]);
            *acc = _mm256_add_epi32(*acc, _mm256_add_epi32(low, high));
        }
        (a, b) = (_mm256_add_epi8(a, ones), _mm256_sub_epi8(b, ones));
    }
    acc.into_iter().fold(_mm256_setzero_si256(), |s, v| _mm256_add_epi32(s, v))
}

/// f32: four FMAs per 32 multiply-adds.
#[target_feature(enable = "avx2,fma")]
fn fma(w: &[__m256; 4], a: __m256) -> __m256 {
    let (mut acc, mut a) = ([_mm256_setzero_ps(); 8], a);
    for _ in 0..N {
        for step in 0..4 {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(a, w[(j + step) & 3], *acc);
            }
        }
        a = _mm256_add_ps(a, _mm256_set1_ps(1e-30));
    }
    acc.into_iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, v))
}

fn main() {
    assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
    let macs = (N * 8 * 32) as f64;
    let rate = |t: Instant| macs / t.elapsed().as_secs_f64() / 1e9;
    // SAFETY: the CPU has AVX2 and FMA (asserted above).
    unsafe {
        let w = [3, -5, 7, 1, -9, 11, -13, 2].map(|v| _mm256_set1_epi8(v));
        let wf = [0.5, 0.25, 0.125, 1.0].map(|v| _mm256_set1_ps(v));
        let (a, af) = (black_box(_mm256_set1_epi8(2)), black_box(_mm256_set1_ps(1.0)));
        for _ in 0..2 {
            let t = Instant::now();
            black_box(vpsignb(&w, a));
            print!("vpsignb {:.1}", rate(t));
            let t = Instant::now();
            black_box(vpmaddubsw(&w, a));
            print!("  vpmaddubsw (7-bit) {:.1}", rate(t));
            let t = Instant::now();
            black_box(vpmaddwd(&w, a));
            print!("  vpmaddwd {:.1}", rate(t));
            let t = Instant::now();
            black_box(fma(&wf, af));
            println!("  f32 fma {:.1} (GMAC/s)", rate(t));
        }
    }
}

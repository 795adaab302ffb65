//! Throughput of the CPU backend's linear layer at f32, bf16 and int8 on encoder shapes, in GMAC/s,
//! best of several runs: f32 and bf16 through the backend (bf16: converting the activations
//! included; emulated on f32 where the CPU has no bf16 kernel), then int8 with every integer
//! micro-kernel this CPU runs (quantizing the activations included).
//! `cargo run --release --example lowp_gemm [-- M K N]`

use std::time::Instant;

use mira::engine::backend::cpu::{int8, CpuBackend};
use mira::engine::backend::Backend;
use mira::engine::{Activation, LinearKind, Precision};

/// The best of five timings of `f`, as GMAC/s for an `m·k·n` product.
fn gmacs(m: usize, k: usize, n: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (m * k * n) as f64 / best / 1e9
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let shapes = match args[..] {
        [m, k, n] => vec![(m, k, n)],
        _ => vec![
            (4096, 384, 1152),
            (4096, 384, 1536),
            (4096, 1536, 384),
            (4096, 768, 3072),
        ],
    };
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 5000.0)
            .collect();
        let mut line = format!("{m}x{k}x{n}:");
        for p in [Precision::F32, Precision::Bf16] {
            let be = CpuBackend::new(p);
            let xt = be.weight(x.clone(), m, k)?;
            let wt = be.linear_weight(w.clone(), n, k, LinearKind::FeedForwardUp)?;
            let rate = gmacs(m, k, n, || {
                std::hint::black_box(be.linear(&xt, &wt, None, Activation::None).unwrap());
            });
            line += &format!("  {p} {rate:.1}");
        }
        let packed = int8::PackedWeight::quantize(&w, n, k);
        for kernel in int8::Kernel::available() {
            let mut out = vec![0f32; m * n];
            let rate = gmacs(m, k, n, || {
                let rows = int8::QuantRows::quantize(&x, m, k);
                int8::gemm_with(&rows, &packed, &mut out, kernel);
                std::hint::black_box(&out);
            });
            line += &format!("  int8 {} {rate:.1}", kernel.name());
        }
        println!("{line} (GMAC/s)");
    }
    Ok(())
}

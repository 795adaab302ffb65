//! Throughput of the CPU backend's linear layer at f32 and int8, on encoder shapes: the GEMM
//! alone (quantizing the activations included for int8), in GMAC/s, best of several runs.
//! `cargo run --release --example int8_gemm [-- M K N]`

use std::time::Instant;

use mira::engine::backend::cpu::CpuBackend;
use mira::engine::backend::Backend;
use mira::engine::{Activation, Precision};

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
        for p in [Precision::F32, Precision::Int8] {
            let be = CpuBackend::new(p);
            let xt = be.weight(x.clone(), m, k)?;
            let wt = be.linear_weight(w.clone(), n, k)?;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                std::hint::black_box(be.linear(&xt, &wt, None, Activation::None)?);
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!("  {p} {:.1} GMAC/s", (m * k * n) as f64 / best / 1e9);
        }
        println!("{line}");
    }
    Ok(())
}

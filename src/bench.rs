//! Engine throughput: tokens/s, docs/s and per-batch latency of the forward pass alone.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::Scorer;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub input: String,
    pub max_tokens: usize,
    pub batch_tokens: usize,
    pub docs: usize,
    pub tokens: usize,
    pub batches: usize,
    pub repeat: usize,
    /// Wall time of the best pass.
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub docs_per_s: f64,
    pub batch_p50_ms: f64,
    pub batch_p99_ms: f64,
    /// Model FLOPs per token on these documents (dense layers and attention, no padding).
    pub model_flops_per_token: f64,
    /// Achieved model FLOP/s of the best pass, in TFLOP/s (MFU = this / the device's peak).
    pub tflops_per_s: f64,
    /// Tokenization throughput (docs/s) when the input was text, not measured in the engine figures.
    pub tokenize_docs_per_s: Option<f64>,
    /// CUDA graph counters over the warm-up and all passes (CUDA only): graphs recorded,
    /// forward passes replayed from one, graph-sized batches run op by op.
    pub cuda_graphs: Option<crate::engine::GraphStats>,
}

/// Time the forward pass over `ids` (`repeat` passes after one warm-up batch; the best pass is
/// reported, latencies are over all passes).
pub fn run(scorer: &Scorer, ids: &[Vec<u32>], repeat: usize, input: &str) -> Result<BenchReport> {
    let batches = scorer.packer().pack(ids);
    if let Some(b) = batches.first() {
        scorer.forward_batch(b)?; // warm-up: page in weights, grow allocator pools
    }
    let mut latencies = Vec::new();
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        // All engines, as a scoring job runs them (one per GPU for cuda:all, two threads per
        // CUDA device); latency is per batch as each worker saw it.
        let start = Instant::now();
        let done = scorer.forward_batches(&batches)?;
        best = best.min(start.elapsed().as_secs_f64());
        latencies.extend(done.into_iter().map(|(_, ms)| ms));
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let flops: f64 = ids.iter().map(|d| scorer.flops(d.len())).sum();
    Ok(BenchReport {
        model: scorer.model_dir().display().to_string(),
        device: scorer.device_name(),
        threads: rayon::current_num_threads(),
        input: input.to_string(),
        max_tokens: scorer.max_tokens(),
        batch_tokens: scorer.packer().max_batch_tokens,
        docs: ids.len(),
        tokens,
        batches: batches.len(),
        repeat: repeat.max(1),
        seconds: best,
        tokens_per_s: tokens as f64 / best,
        docs_per_s: ids.len() as f64 / best,
        batch_p50_ms: if latencies.is_empty() { 0.0 } else { pct(0.5) },
        batch_p99_ms: if latencies.is_empty() { 0.0 } else { pct(0.99) },
        model_flops_per_token: flops / tokens.max(1) as f64,
        tflops_per_s: flops / best / 1e12,
        tokenize_docs_per_s: None,
        cuda_graphs: scorer.graph_stats(),
    })
}

/// Deterministic synthetic documents: token ids drawn uniformly from the upper vocabulary, lengths drawn from a
/// log-normal mix (median ~150 tokens, a long tail) capped at `max_tokens`. Throughput depends on
/// lengths only, so this stands in when no corpus is given. `length` fixes every document's length
/// instead (it must fit `max_tokens`).
pub fn synthetic_docs(
    n: usize,
    max_tokens: usize,
    vocab: usize,
    length: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        // xorshift64*: uniform in (0, 1)
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    if let Some(len) = length {
        anyhow::ensure!(
            (1..=max_tokens).contains(&len),
            "--length {len} must be between 1 and the model's max_tokens {max_tokens}"
        );
    }
    let hi = vocab.max(2) as u64;
    let lo = (hi / 4).min(1000);
    Ok((0..n)
        .map(|_| {
            // Box–Muller normal -> log-normal length.
            let z = (-2.0 * next().ln()).sqrt() * (2.0 * std::f64::consts::PI * next()).cos();
            let len = length.unwrap_or(
                ((150f64.ln() + 0.9 * z).exp() as usize).clamp(8.min(max_tokens), max_tokens),
            );
            (0..len)
                .map(|_| (lo + (next() * (hi - lo) as f64) as u64).min(hi - 1) as u32)
                .collect()
        })
        .collect())
}

//! Criterion benchmarks of the CPU backend: the hot ops at MiniLM shapes, and the whole
//! all-MiniLM-L6-v2 forward pass over the bundled sample corpus (throughput in tokens).
//!
//! `cargo bench --bench cpu_forward`; the model and sample come from `scripts/setup.sh`.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mira::engine::backend::cpu::CpuBackend;
use mira::engine::backend::Backend;
use mira::engine::{Activation, Batch};
use mira::{Device, Scorer};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn ops(c: &mut Criterion) {
    let be = CpuBackend::default();
    let (t, h, i) = (4096, 384, 1536);
    let x = be.weight(random(t * h, 1), t, h).unwrap();
    let w = be.weight(random(i * h, 2), i, h).unwrap();
    let b = be.weight(random(i, 3), 1, i).unwrap();
    let mut g = c.benchmark_group("ops");
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function("linear_gelu_4096x384x1536", |bench| {
        bench.iter(|| be.linear(&x, &w, Some(&b), Activation::Gelu).unwrap())
    });
    let lens: Vec<usize> = (0..t / 256).map(|_| 256).collect();
    let seqs: Vec<Vec<u32>> = lens.iter().map(|&l| vec![1; l]).collect();
    let batch = Batch::from_sequences(seqs.iter().enumerate().map(|(d, s)| (d, &s[..])));
    let dev_batch = be.upload_batch(&batch, 2, 512).unwrap();
    let qkv = be.weight(random(t * 3 * h, 4), t, 3 * h).unwrap();
    g.bench_function("attention_16x256_12heads", |bench| {
        bench.iter(|| be.attention(&qkv, &dev_batch, 12, None).unwrap())
    });
    // BERT-base's attention (d = 64) over 512-token sequences, as the public classifiers run.
    let (t64, h64) = (4096, 768);
    let seqs: Vec<Vec<u32>> = (0..t64 / 512).map(|_| vec![1; 512]).collect();
    let batch = Batch::from_sequences(seqs.iter().enumerate().map(|(d, s)| (d, &s[..])));
    let dev_batch = be.upload_batch(&batch, 2, 512).unwrap();
    let qkv = be.weight(random(t64 * 3 * h64, 5), t64, 3 * h64).unwrap();
    g.bench_function("attention_8x512_12heads_d64", |bench| {
        bench.iter(|| be.attention(&qkv, &dev_batch, 12, None).unwrap())
    });
    g.finish();
}

fn minilm(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join(".data/models/all-MiniLM-L6-v2");
    let sample = root.join(".data/sample/corpus.jsonl");
    if !model.join("model.safetensors").exists() || !sample.exists() {
        eprintln!("skipping minilm benchmark: run scripts/setup.sh to fetch the model and sample");
        return;
    }
    let scorer = Scorer::load(&model, Device::Cpu).unwrap();
    let texts: Vec<String> = std::fs::read_to_string(&sample)
        .unwrap()
        .lines()
        .take(128)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let ids = scorer.tokenize(&texts).unwrap();
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("minilm");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("embed_sample_128_docs", |b| {
        b.iter(|| scorer.embed_ids(&ids).unwrap())
    });
    g.finish();
}

criterion_group!(benches, ops, minilm);
criterion_main!(benches);

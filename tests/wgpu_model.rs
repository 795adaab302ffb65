//! Whole models on the wgpu backend against the CPU backend: all-MiniLM-L6-v2 (real weights) and
//! the random-weight checkpoints of tests/fixtures (BERT, ModernBERT, (XLM-)RoBERTa, GTE, DeBERTa
//! and NeMo Curator's format: heads, biases, bf16/f16 files, sliding windows, RoPE, GeGLU,
//! disentangled attention). Embeddings: cosine ≥ 0.9999 with f32 storage, ≥ 0.999
//! with f16; head outputs within 0.1% (f32) or 1% (f16) of the CPU outputs' range; a batch
//! gives each document exactly what it gets alone. Also: one submission per forward pass, and a
//! repeated batch allocates no buffer and builds no bind group.

mod common;
mod gpu;
#[macro_use]
#[path = "gpu/model.rs"]
mod model_check;

use common::minilm_dir;
use gpu::{have_adapter, Prec};
use mira::engine::backend::wgpu::WgpuBackend;
use mira::engine::{Device, Precision};
use mira::model::config::{Arch, ModelConfig};
use mira::model::weights::Weights;
use mira::model::Encoder;
use mira::Batch;

fn precisions() -> Vec<(Precision, Prec)> {
    let mut v = vec![(Precision::F32, Prec::F32)];
    if WgpuBackend::new(None, Precision::F16).is_ok() {
        v.push((Precision::F16, Prec::F16));
    } else {
        eprintln!("f16 storage not tested: the adapter has no SHADER_F16");
    }
    v
}

fn check(dir: &std::path::Path, golden_name: &str) {
    if have_adapter() {
        model_check::check(dir, golden_name, Device::Wgpu(None), &precisions());
    }
}

model_tests!(check);

/// A forward pass is one submission; the same batch again reuses every pooled buffer and every
/// bind group; a longer batch in the same size classes creates none either.
#[test]
fn one_submit_per_forward_and_reused_buffers() {
    if !have_adapter() {
        return;
    }
    let dir = minilm_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir).unwrap();
    let Arch::Bert(c) = &cfg.arch else {
        panic!("MiniLM is a BERT")
    };
    let be = WgpuBackend::new(None, Precision::F32).unwrap();
    let model =
        mira::model::bert::Bert::load(be.clone(), c, &weights, false, Default::default()).unwrap();
    let seqs: Vec<Vec<u32>> = (0..9)
        .map(|d| {
            (0..(20 + 13 * d))
                .map(|t| 1000 + (t * 31 + d) % 20000)
                .collect()
        })
        .collect();
    let batch = Batch::from_sequences(seqs.iter().enumerate().map(|(d, s)| (d, &s[..])));
    let first = model.pooled(&batch, mira::Pooling::Mean).unwrap();
    let after_first = be.counters();
    let second = model.pooled(&batch, mira::Pooling::Mean).unwrap();
    let after_second = be.counters();
    assert_eq!(first, second, "the same batch twice gives the same result");
    assert_eq!(
        after_second.submits - after_first.submits,
        1,
        "one submission per forward pass"
    );
    assert!(
        after_second.dispatches - after_first.dispatches >= 6 * 7,
        "every op is a dispatch: {after_first:?} -> {after_second:?}"
    );
    // Pooled buffers of equal size may trade roles from one pass to the next (the pool is a
    // stack), which makes new bind groups once; from then on nothing is created.
    let _ = model.pooled(&batch, mira::Pooling::Mean).unwrap();
    let third = be.counters();
    let fourth_result = model.pooled(&batch, mira::Pooling::Mean).unwrap();
    let fourth = be.counters();
    assert_eq!(first, fourth_result);
    assert_eq!(
        (fourth.buffers_created, fourth.bind_groups_created),
        (third.buffers_created, third.bind_groups_created),
        "a repeated batch allocates nothing and builds no bind group: {third:?} -> {fourth:?}"
    );
    assert_eq!(
        after_second.buffers_created, after_first.buffers_created,
        "the second pass takes every buffer from the pool"
    );
    // A different batch within the same size classes reuses the buffers too.
    let seqs2: Vec<Vec<u32>> = (0..9)
        .map(|d| {
            (0..(21 + 13 * d))
                .map(|t| 2000 + (t * 17 + d) % 20000)
                .collect()
        })
        .collect();
    let batch2 = Batch::from_sequences(seqs2.iter().enumerate().map(|(d, s)| (d, &s[..])));
    let _ = model.pooled(&batch2, mira::Pooling::Mean).unwrap();
    assert_eq!(be.counters().buffers_created, fourth.buffers_created);
}

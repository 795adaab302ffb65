//! A device whose bindings are small (reproduced with MIRA_WGPU_MAX_BINDING): batches are split
//! so no activation exceeds one binding, with the same scores as unsplit batches, and a weight
//! that cannot fit is an error naming the tensor. One test in this file, because it sets an
//! environment variable for the whole process.

mod common;
mod gpu;

use common::fixture_model;
use gpu::have_adapter;
use mira::engine::{Device, Precision};
use mira::{LoadOptions, Scorer};

fn load(cap: Option<u64>) -> anyhow::Result<Scorer> {
    match cap {
        Some(c) => std::env::set_var("MIRA_WGPU_MAX_BINDING", c.to_string()),
        None => std::env::remove_var("MIRA_WGPU_MAX_BINDING"),
    }
    Scorer::load_with(
        fixture_model("bert-cls-regression"),
        Device::Wgpu(None),
        LoadOptions {
            precision: Precision::F32,
            ..Default::default()
        },
    )
}

#[test]
fn small_bindings_split_batches_and_oversized_weights_are_named() {
    if !have_adapter() {
        return;
    }
    // hidden 32, intermediate 64: the widest activation is the fused QKV, 96 f32 per token;
    // the word embeddings are 6000 × 32 f32 = 768,000 bytes.
    let texts: Vec<String> = (0..300)
        .map(|i| format!("{} document {i}", "word ".repeat(1 + i % 50)))
        .collect();
    let full = load(None).unwrap();
    assert_eq!(full.packer().max_batch_tokens, 16384);
    let want = full.score(&texts).unwrap();

    let cap = 1_000_000u64;
    let small = load(Some(cap)).unwrap();
    let limit = (cap / (96 * 4)) as usize;
    assert_eq!(
        small.packer().max_batch_tokens,
        limit,
        "batches fit one binding"
    );
    let got = small.score(&texts).unwrap();
    assert_eq!(got.values.len(), want.values.len());
    for (g, w) in got.values.iter().zip(&want.values) {
        assert!(
            (g - w).abs() <= 1e-6,
            "split batches score {g}, whole ones {w}"
        );
    }

    let err = format!("{:#}", load(Some(500_000)).err().unwrap());
    assert!(
        err.contains("word_embeddings") && err.contains("binds at most 500000 bytes"),
        "{err}"
    );
    if let Err(e) = load(Some(u64::MAX)) {
        panic!("a cap above the device's limit changes nothing, but: {e:#}");
    }
    std::env::set_var("MIRA_WGPU_MAX_BINDING", "lots");
    let err = format!("{:#}", load_raw().err().unwrap());
    assert!(err.contains("MIRA_WGPU_MAX_BINDING"), "{err}");
}

fn load_raw() -> anyhow::Result<Scorer> {
    Scorer::load_with(
        fixture_model("bert-cls-regression"),
        Device::Wgpu(None),
        LoadOptions::default(),
    )
}

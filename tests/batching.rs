//! Batched results equal single-document results, whatever the batch size or input order.

mod common;

use common::*;
use mira::{Device, LoadOptions, Packer, Scorer};

fn texts() -> Vec<String> {
    let g = golden("minilm");
    let mut t: Vec<String> = g["settings"][0]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    for i in 0..20 {
        t.push(format!(
            "document {i}: {}",
            "the quick brown fox jumps over the lazy dog ".repeat(i * 3)
        ));
    }
    t
}

fn scorer(dir: &std::path::Path, batch_tokens: usize, max_seqs: usize) -> Scorer {
    let packer = Packer {
        max_batch_tokens: batch_tokens,
        max_batch_seqs: max_seqs,
        sort_window: 7,
    };
    Scorer::load_with(
        dir,
        Device::Cpu,
        LoadOptions {
            max_tokens: None,
            packer: Some(packer),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Equal up to f32 summation-order noise (GEMM blocking differs with the number of rows), relative
/// to the row's magnitude; a batching bug (cross-sequence attention, misplaced rows) is far larger.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let m = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().fold(1.0f32, |s, y| s.max(y.abs()));
    assert!(
        m <= 2e-6 * scale,
        "{what}: batched and single differ by {m:e} (scale {scale})"
    );
}

#[test]
fn minilm_batched_equals_single_and_order_does_not_matter() {
    let dir = minilm_dir();
    let t = texts();
    let single = scorer(&dir, 1, 1);
    let big = scorer(&dir, 4096, 64);
    let tiny = scorer(&dir, 300, 3);
    let reference: Vec<Vec<f32>> = t
        .iter()
        .map(|x| single.embed(&[x]).unwrap().row(0).to_vec())
        .collect();
    for s in [&big, &tiny] {
        let e = s.embed(&t).unwrap();
        for (i, r) in reference.iter().enumerate() {
            assert_close(e.row(i), r, &format!("doc {i}"));
        }
    }
    // Reversed input order gives the same rows, reversed.
    let rev: Vec<&String> = t.iter().rev().collect();
    let e = big.embed(&rev).unwrap();
    for (i, r) in reference.iter().rev().enumerate() {
        assert_close(e.row(i), r, &format!("reversed doc {i}"));
    }
}

#[test]
fn classifier_scores_do_not_depend_on_batching() {
    let dir = fixture_model("bert-cls-regression");
    let t = texts();
    let single = scorer(&dir, 1, 1);
    let batched = scorer(&dir, 512, 16);
    let s = batched.score(&t).unwrap();
    for (i, x) in t.iter().enumerate() {
        assert_close(
            s.row(i),
            single.score(&[x]).unwrap().row(0),
            &format!("doc {i}"),
        );
    }
}

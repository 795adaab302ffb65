//! Parity with independent references: Hugging Face transformers / sentence-transformers run in
//! float64 by tests/fixtures/make_goldens.py. Tolerances from DESIGN.md §3 (f32 CPU vs f64).

mod common;

use common::*;
use mira::{Device, LoadOptions, Scorer};

fn load(dir: &std::path::Path, max_tokens: usize) -> Scorer {
    Scorer::load_with(
        dir,
        Device::Cpu,
        LoadOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("load {}: {e:#}", dir.display()))
}

/// Check token ids and embeddings of every case in every setting of an embed golden.
fn check_embed(dir: &std::path::Path, golden_name: &str) {
    let g = golden(golden_name);
    assert_eq!(g["kind"], "embed");
    for setting in g["settings"].as_array().unwrap() {
        let max_tokens = setting["max_tokens"].as_u64().unwrap() as usize;
        let scorer = load(dir, max_tokens);
        let cases = setting["cases"].as_array().unwrap();
        let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
        let tokens = scorer.tokenize(&texts).unwrap();
        let emb = scorer.embed(&texts).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let label = format!(
                "{golden_name} max_tokens={max_tokens} case {i} ({:.30?})",
                texts[i]
            );
            assert_eq!(tokens[i], ids(&c["ids"]), "{label}: token ids differ");
            let want = floats(&c["output"]);
            let (m, cos) = (max_abs(emb.row(i), &want), cosine(emb.row(i), &want));
            assert!(
                m <= 1e-4 && cos >= 0.99999,
                "{label}: max abs {m:e}, cosine {cos}"
            );
        }
    }
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    check_embed(&minilm_dir(), "minilm");
}

#[test]
fn minilm_default_truncation_is_sentence_bert_max_seq_length() {
    let scorer = Scorer::load(minilm_dir(), Device::Cpu).unwrap();
    let g = golden("minilm");
    assert_eq!(
        scorer.max_tokens() as u64,
        g["settings"][0]["max_tokens"].as_u64().unwrap()
    );
    assert_eq!(scorer.pooling(), (mira::Pooling::Mean, true));
}

#[test]
fn bf16_bert_model_mean_pooled_embeddings_match_transformers() {
    check_embed(&fixture_model("bert-base-bf16"), "bert-base-bf16");
}

/// Check ids, raw logits and (for classification) probabilities of a score golden.
fn check_score(name: &str) {
    let dir = fixture_model(name);
    let g = golden(name);
    assert_eq!(g["kind"], "score");
    let labels: Vec<String> = g["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    for setting in g["settings"].as_array().unwrap() {
        let max_tokens = setting["max_tokens"].as_u64().unwrap() as usize;
        let scorer = load(&dir, max_tokens);
        assert_eq!(scorer.head().unwrap().labels, labels);
        let cases = setting["cases"].as_array().unwrap();
        let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
        let tokens = scorer.tokenize(&texts).unwrap();
        let logits = scorer.logits_ids(&tokens).unwrap();
        let scores = scorer.score(&texts).unwrap();
        let n = labels.len();
        for (i, c) in cases.iter().enumerate() {
            let label = format!("{name} max_tokens={max_tokens} case {i}");
            assert_eq!(tokens[i], ids(&c["ids"]), "{label}: token ids differ");
            let want = floats(&c["logits"]);
            let got = &logits[i * n..(i + 1) * n];
            let (m, cos) = (max_abs(got, &want), cosine(got, &want));
            assert!(
                m <= 1e-4 && cos >= 0.99999,
                "{label}: logits max abs {m:e}, cosine {cos}"
            );
            let want_scores = if c.get("probs").is_some() {
                floats(&c["probs"])
            } else {
                want
            };
            let m = max_abs(scores.row(i), &want_scores);
            assert!(m <= 1e-4, "{label}: scores max abs {m:e}");
        }
    }
}

#[test]
fn random_regression_classifier_matches_transformers() {
    check_score("bert-cls-regression");
}

#[test]
fn sharded_f16_gelu_tanh_classifier_matches_transformers() {
    check_score("bert-cls-f16-sharded");
}

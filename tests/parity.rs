//! Parity with independent references: Hugging Face transformers / sentence-transformers run in
//! float64 by tests/fixtures/make_goldens.py and make_roberta.py. Tolerances from DESIGN.md §3 (f32 CPU vs f64).

mod common;

use common::*;
use mira::{Device, Scorer};

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

#[test]
fn random_regression_classifier_matches_transformers() {
    check_score("bert-cls-regression");
}

#[test]
fn sharded_f16_gelu_tanh_classifier_matches_transformers() {
    check_score("bert-cls-f16-sharded");
}

#[test]
fn xlm_roberta_classifier_with_unigram_tokenizer_matches_transformers() {
    check_score("xlmr-cls-single");
}

#[test]
fn roberta_model_with_byte_level_bpe_f16_matches_transformers() {
    check_embed(&fixture_model("roberta-base-f16"), "roberta-base-f16");
}

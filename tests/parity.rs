//! Parity with independent references: Hugging Face transformers / sentence-transformers run in
//! float64 by tests/fixtures/make_goldens.py and make_roberta.py, and float64 numpy references
//! where no transformers class exists (GTE: make_gte.py). Tolerances from DESIGN.md §3 (f32 CPU vs f64).

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

#[test]
fn gte_classifier_with_ntk_rotary_matches_the_float64_reference() {
    // tests/fixtures/make_gte.py: numpy float64 from the published GTE modeling code.
    check_score("gte-cls-ntk");
}

#[test]
fn gte_f16_model_with_mixed_ntk_matches_the_float64_reference() {
    check_embed(&fixture_model("gte-base-mixed"), "gte-base-mixed");
}

#[test]
fn nemo_style_mixin_classifier_matches_its_pytorch_module() {
    // config.json names its base model by a path relative to the checkpoint folder.
    check_score("nemo-mixin-roberta");
}

/// A mixin checkpoint moved away from its base model: an error that says where it looked; then
/// found by `--base-model`, and by a hub id in the local Hugging Face cache (`HF_HUB_CACHE`),
/// with the same scores as in place.
#[test]
fn mixin_base_model_is_found_by_flag_or_in_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("quality-classifier");
    copy_dir(&fixture_model("nemo-mixin-roberta"), &ckpt);
    let input = tmp.path().join("docs.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"text\":\"The quick brown fox.\"}\n{\"id\":\"b\",\"text\":\"def f(x): return x\"}\n",
    )
    .unwrap();
    let score = |model: &std::path::Path, extra: &[&std::ffi::OsStr], hub: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mira"))
            .args(["score", "--device", "cpu", "--output", "-", "--model"])
            .arg(model)
            .arg("--input")
            .arg(&input)
            .args(extra)
            .env("HF_HUB_CACHE", hub)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let empty_hub = tmp.path().join("empty-hub");
    let (ok, in_place, err) = score(&fixture_model("nemo-mixin-roberta"), &[], &empty_hub);
    assert!(ok, "{err}");
    assert!(in_place.contains("\"High\""), "{in_place}");

    let (ok, _, err) = score(&ckpt, &[], &empty_hub);
    assert!(!ok);
    assert!(
        err.contains("base model '../roberta-base-f16' not found")
            && err.contains("Hugging Face cache")
            && err.contains("--base-model"),
        "{err}"
    );

    let base = fixture_model("roberta-base-f16");
    let (ok, by_flag, err) = score(
        &ckpt,
        &["--base-model".as_ref(), base.as_os_str()],
        &empty_hub,
    );
    assert!(ok, "{err}");
    assert_eq!(by_flag, in_place);

    // As NeMo Curator's files name it: a hub id, found in the local cache's snapshot of main.
    let cfg_path = ckpt.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("../roberta-base-f16", "acme/roberta-tiny"),
    )
    .unwrap();
    let hub = tmp.path().join("hub");
    let repo = hub.join("models--acme--roberta-tiny");
    let snapshot = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd\n").unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), snapshot.join(f)).unwrap();
    }
    let (ok, from_cache, err) = score(&ckpt, &[], &hub);
    assert!(ok, "{err}");
    assert_eq!(from_cache, in_place);
}

#[test]
fn deberta_v3_classifier_with_log_bucketed_relative_attention_matches_transformers() {
    check_score("deberta-v3-cls");
}

#[test]
fn deberta_v2_model_with_separate_position_projections_matches_transformers() {
    check_embed(
        &fixture_model("deberta-v2-base-bf16"),
        "deberta-v2-base-bf16",
    );
}

#[test]
fn nemo_style_mixin_on_deberta_matches_its_pytorch_module() {
    check_score("nemo-mixin-deberta");
}

/// `relative_index` against transformers' `make_log_bucket_position`, for the fixtures' settings
/// and deberta-v3-base's (256 buckets, 512 positions), over every distance up to 1,100.
#[test]
fn deberta_relative_buckets_equal_transformers() {
    let g = golden("deberta-buckets");
    for t in g["tables"].as_array().unwrap() {
        let buckets = t["buckets"].as_u64().unwrap() as usize;
        let max_relative = t["max_relative"].as_u64().unwrap() as usize;
        let from = t["from"].as_i64().unwrap();
        let span = buckets;
        let base = 2000usize;
        for (k, b) in t["bucket"].as_array().unwrap().iter().enumerate() {
            let rel = from + k as i64;
            let want = (b.as_i64().unwrap() + span as i64).clamp(0, 2 * span as i64 - 1) as usize;
            let got = mira::engine::backend::relative_index(
                (base as i64 + rel) as usize,
                base,
                span,
                buckets,
                max_relative,
            );
            assert_eq!(
                got, want,
                "buckets {buckets}, max {max_relative}, distance {rel}"
            );
        }
    }
}

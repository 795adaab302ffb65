//! The CPU's reduced precisions (`--precision int8`, and bf16: vdpbf16ps where the CPU has
//! AVX512_BF16, else emulated) against f32 on whole
//! models, by the fidelity guard (`mira::fidelity`): all-MiniLM-L6-v2 embeddings on the sample
//! corpus plus long, multilingual and code text; a real encoder with a random-weight regression
//! head (a student as `mira distill` writes one); a 50% token-budget selection. The thresholds are
//! issue #19's, except for int8 where it does not meet them (said where they are).

mod common;

use common::{minilm_dir, repo};
use mira::engine::Precision;
use mira::fidelity::{self, FidelityReport, Guard};
use mira::{Device, LoadOptions, Scorer};

fn load(dir: &std::path::Path, precision: Precision) -> Scorer {
    let opts = LoadOptions {
        precision,
        ..LoadOptions::default()
    };
    Scorer::load_with(dir, Device::Cpu, opts).unwrap()
}

/// Every sixth sample-corpus document (all seven sources), then text the corpus lacks: long
/// prose past the 256-token limit, eight scripts, and code in four languages.
fn texts() -> Vec<String> {
    let corpus = std::fs::read_to_string(repo().join(".data/sample/corpus.jsonl"))
        .expect("the sample corpus (scripts/setup.sh makes .data/sample/corpus.jsonl)");
    let mut out: Vec<String> = corpus
        .lines()
        .step_by(6)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    let long = "The committee reviewed the proposal in detail, weighing the cost of the new \
                storage tier against the expected growth of the archive, and asked for a \
                second estimate from an independent vendor before any decision. "
        .repeat(30);
    out.push(long);
    out.extend(
        [
            "Der schnelle braune Fuchs springt über den faulen Hund, und niemand weiß warum.",
            "Быстрая коричневая лиса перепрыгивает через ленивую собаку у старого моста.",
            "敏捷的棕色狐狸跳过了懒狗，然后在河边的树下休息了一个下午。",
            "素早い茶色の狐がのろまな犬を飛び越え、夕方まで森の中を歩き回った。",
            "الثعلب البني السريع يقفز فوق الكلب الكسول بجانب النهر في الصباح.",
            "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर से कूद गई और जंगल में चली गई।",
            "Le renard brun rapide saute par-dessus le chien paresseux près de la gare 🦊🐕.",
            "빠른 갈색 여우가 게으른 개를 뛰어넘어 강가의 나무 아래에서 쉬었다.",
            "fn main() { let v: Vec<u64> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }",
            "#include <stdio.h>\nint main(void) { for (int i = 0; i < 3; i++) printf(\"%d\\n\", i); return 0; }",
            "SELECT user_id, COUNT(*) AS n FROM events WHERE ts > now() - interval '1 day' GROUP BY 1 ORDER BY n DESC;",
            "const sum = (xs) => xs.reduce((a, b) => a + b, 0);\nexport default sum;",
        ]
        .map(String::from),
    );
    out
}

fn compare(dir: &std::path::Path, precision: Precision, ids: &[Vec<u32>]) -> FidelityReport {
    let (candidate, reference) = (load(dir, precision), load(dir, Precision::F32));
    let name = precision.to_string();
    let report = fidelity::compare(
        &candidate,
        &reference,
        ids,
        (&name, "f32"),
        Guard::default(),
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    report
}

#[test]
fn minilm_embeddings_at_int8_and_bf16_stay_close_to_f32() {
    let dir = minilm_dir();
    let ids = load(&dir, Precision::F32).tokenize(&texts()).unwrap();
    // Issue #19's floors. int8 (8-bit activations per token and 64 inputs, smoothed after
    // calibration) measured min 0.99942 on these texts (0.99948 before exp and erf went to fused
    // multiply-adds and LayerNorm to lane sums, which move f32 and int8 alike); 0.99897 without
    // the smoothing; 0.99937 with the earlier 16-bit activations per token.
    for (precision, floor) in [(Precision::Int8, 0.999), (Precision::Bf16, 0.9995)] {
        let r = compare(&dir, precision, &ids);
        assert!(
            r.embedding.cosine_min >= floor,
            "{precision}: embedding cosine {} below {floor}",
            r.embedding.cosine_min
        );
        assert!(r.labels.is_empty() && r.selection_overlap.is_none());
    }
}

/// A student as `mira distill` writes it, with a random head: all-MiniLM-L6-v2 and 8 regression
/// outputs drawn uniformly in ±2/√H, so each label is a random direction of the pooler output.
fn random_head_student(out: &std::path::Path) {
    let encoder = Scorer::load(minilm_dir(), Device::Cpu).unwrap();
    let h = encoder.embedding_dim();
    let labels: Vec<String> = (0..8).map(|i| format!("random_{i}")).collect();
    let mut state = 0x5eed_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let w: Vec<f64> = (0..labels.len() * h)
        .map(|_| next() * 2.0 / (h as f64).sqrt())
        .collect();
    let b: Vec<f64> = (0..labels.len()).map(|_| next()).collect();
    let info = mira::select::distill::StudentInfo {
        anchors: labels.clone(),
        lambda: vec![0.0; labels.len()],
        n_train: 0,
        n_validation: 0,
        skipped: 0,
        mae: vec![None; labels.len()],
        spearman: vec![None; labels.len()],
        feature: mira::select::features::Feature::Pooler,
        candidates: Vec::new(),
        // The encoder's own limit (256): the figures below were measured at it.
        max_tokens: None,
    };
    mira::select::distill::write_student(&encoder, out, "random", &labels, &w, &b, &info).unwrap();
}

#[test]
fn random_head_scores_and_half_budget_selection_at_int8_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("student");
    random_head_student(&dir);
    let ids = load(&dir, Precision::F32).tokenize(&texts()).unwrap();
    // bf16: issue #19's floors. int8 meets the selection floor (a 50% selection keeps 100% of
    // f32's tokens here) but not the label one: labels are off by 1.3-2.6% of their range with
    // 8-bit activations (the issue asks 1%; 0.78-1.74% with the earlier 16-bit activations;
    // 1.5-3.4% and a 95% selection without smoothing). Its label bound (3%) catches a broken
    // int8 path, not a met target.
    for (precision, label_limit, min_overlap) in
        [(Precision::Int8, 0.03, 0.98), (Precision::Bf16, 0.01, 0.98)]
    {
        let r = compare(&dir, precision, &ids);
        assert_eq!(r.labels.len(), 8);
        let overlap = r.selection_overlap.unwrap();
        assert!(
            overlap >= min_overlap,
            "{precision}: a 50% selection keeps {overlap} of f32's tokens"
        );
        for l in &r.labels {
            assert!(
                l.share_of_range <= label_limit,
                "{precision}: label {} off by {:.3}% of its range",
                l.label,
                100.0 * l.share_of_range
            );
        }
    }
}

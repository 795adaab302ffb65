//! The whole-model check shared by the GPU backends' tests (`wgpu_model.rs`, `cuda_model.rs`,
//! `cuda_emu.rs`):
//! a checkpoint on a device against the same checkpoint on the CPU backend. Embeddings: cosine
//! ≥ 0.9999 with f32 storage, ≥ 0.999 with f16, ≥ 0.998 with bf16; head outputs within 0.1%
//! (f32), 1% (f16) or 12% (bf16) of the CPU outputs' range; a batch gives each document exactly
//! what it gets alone.
//! Included with `#[path]` by test crates that also have `mod common; mod gpu;`.

use crate::common::golden;
use crate::gpu::{cosine, Prec};
use mira::engine::{Device, Precision};
use mira::{LoadOptions, Scorer};

/// The least embedding cosine to the CPU for a whole model. bf16 storage keeps 8 significant
/// bits to f16's 11, and its rounding compounds over the layers: on the random-weight
/// checkpoints it reaches cosine 0.9988, and head outputs 1.1-1.5% of the score range, 9.4% on
/// bert-cls-f16-sharded, whose small random pooler and classifier amplify input error (f16:
/// 0.64% there, 0.13-0.26% elsewhere; all measured on the CUDA kernel emulator,
/// tests/cuda_emu.rs). So bf16's bounds are 0.998 and 12%; f16 (the default) is held to 0.999
/// and 1%.
fn min_cosine(prec: Prec) -> f64 {
    match prec {
        Prec::F32 => 0.9999,
        Prec::F16 => 0.999,
        Prec::Bf16 => 0.998,
    }
}

/// The texts of a golden's settings, and the largest truncation they use.
fn texts(golden_name: &str) -> (Vec<String>, usize) {
    let g = golden(golden_name);
    let mut out = Vec::new();
    let mut max_tokens = 0;
    for s in g["settings"].as_array().unwrap() {
        max_tokens = max_tokens.max(s["max_tokens"].as_u64().unwrap() as usize);
        for c in s["cases"].as_array().unwrap() {
            out.push(c["text"].as_str().unwrap().to_string());
        }
    }
    (out, max_tokens)
}

fn load(dir: &std::path::Path, device: Device, precision: Precision, max_tokens: usize) -> Scorer {
    Scorer::load_with(
        dir,
        device,
        LoadOptions {
            max_tokens: Some(max_tokens),
            precision,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("load {} on {device}: {e:#}", dir.display()))
}

/// Compare `dir` on `device` with CPU for the texts of `golden_name`, once per storage
/// precision.
#[allow(dead_code)] // (cuda_emu.rs uses check_loaded only)
pub fn check(
    dir: &std::path::Path,
    golden_name: &str,
    device: Device,
    precisions: &[(Precision, Prec)],
) {
    check_loaded(dir, golden_name, precisions, |precision, max_tokens| {
        load(dir, device, precision, max_tokens)
    });
}

/// As [`check`], with the device's scorer made by `open(precision, max_tokens)`.
pub fn check_loaded(
    dir: &std::path::Path,
    golden_name: &str,
    precisions: &[(Precision, Prec)],
    open: impl Fn(Precision, usize) -> Scorer,
) {
    let (texts, max_tokens) = texts(golden_name);
    let cpu = load(dir, Device::Cpu, Precision::F32, max_tokens);
    let ids = cpu.tokenize(&texts).unwrap();
    let want = cpu.embed_ids(&ids).unwrap();
    let want_logits = cpu.head().map(|_| cpu.logits_ids(&ids).unwrap());
    for &(precision, prec) in precisions {
        let gpu = open(precision, max_tokens);
        let got = gpu.embed_ids(&ids).unwrap();
        let mut min_cos = 1f64;
        for (d, doc) in ids.iter().enumerate() {
            let c = cosine(got.row(d), want.row(d));
            min_cos = min_cos.min(c);
            assert!(
                c >= min_cosine(prec),
                "{golden_name} {prec:?} doc {d} ({} tokens): cosine {c}",
                doc.len()
            );
        }
        let mut line = format!(
            "{golden_name} on {}: {} docs, min embedding cosine {min_cos:.7}",
            gpu.device_name(),
            ids.len()
        );
        if let Some(want) = &want_logits {
            let got = gpu.logits_ids(&ids).unwrap();
            let lo = want.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let range = (hi - lo).max(1e-6) as f64;
            let worst = got
                .iter()
                .zip(want)
                .map(|(g, w)| (g - w).abs() as f64)
                .fold(0f64, f64::max);
            let allowed = match prec {
                Prec::F32 => 1e-3,
                Prec::F16 => 1e-2,
                Prec::Bf16 => 12e-2,
            } * range;
            assert!(
                worst <= allowed,
                "{golden_name} {prec:?}: logits differ by {worst:e}, allowed {allowed:e} \
                 (range {range:e})"
            );
            line += &format!(", logits within {:.3}% of range", 100.0 * worst / range);
        }
        eprintln!("{line}");

        // Batched equals single: one packed batch vs each document alone, on the GPU.
        let single: Vec<Vec<f32>> = ids
            .iter()
            .map(|one| gpu.embed_ids(std::slice::from_ref(one)).unwrap().values)
            .collect();
        for (d, s) in single.iter().enumerate() {
            let diff = s
                .iter()
                .zip(got.row(d))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-6,
                "{golden_name} {prec:?} doc {d}: batched differs from single by {diff:e}"
            );
        }
    }
}

/// CUDA graphs on `dir`: forward passes replayed from a recorded graph give exactly what the
/// same backend gives running the ops one by one, for batches other than the recorded one
/// (same shape, different tokens), for embeddings and head outputs; and the graph cache records
/// on a shape's second sighting and replays after. `open()` makes a backend (poisoned outputs,
/// so a value a replay fails to write shows).
#[allow(dead_code)] // (wgpu_model.rs has no graphs)
pub fn check_graphs<D: mira::engine::backend::cuda::KernelDevice>(
    dir: &std::path::Path,
    golden_name: &str,
    open: impl Fn() -> mira::engine::backend::cuda::KernelBackend<D>,
) {
    use mira::engine::backend::cuda::graph::GraphStats;
    let (texts, max_tokens) = texts(golden_name);
    let opts = || LoadOptions {
        max_tokens: Some(max_tokens),
        ..Default::default()
    };
    let load = |be| Scorer::load_on_backend(dir, be, opts()).unwrap_or_else(|e| panic!("{e:#}"));
    let direct = load(open());
    let be = open();
    be.set_graph_tokens(1 << 20);
    let graphs = load(be.clone());

    // a and b: the same length, different tokens (b is a with its inner tokens rotated); c: longer.
    let ids = direct.tokenize(&texts).unwrap();
    let mut by_len = ids.clone();
    by_len.sort_by_key(Vec::len);
    let a = by_len
        .iter()
        .find(|d| d.len() >= 4)
        .expect("a text of 4+ tokens")
        .clone();
    let mut b = a.clone();
    let inner = b.len() - 1;
    b[1..inner].rotate_left(1);
    assert_ne!(a, b);
    let c = by_len.last().unwrap().clone();
    assert!(c.len() > a.len() && c.len() >= 14);
    // p and q: two documents of 14 tokens in all, split 5 + 9 and 4 + 10: the same shape (the
    // rotary table covers 16 positions for both) with different sequence boundaries and
    // positions.
    let p = vec![c[..5].to_vec(), c[5..14].to_vec()];
    let q = vec![c[..4].to_vec(), c[4..14].to_vec()];
    let calls: Vec<Vec<Vec<u32>>> = vec![
        vec![a.clone()],
        vec![b.clone()],
        vec![a.clone()],
        vec![b.clone()],
        vec![c.clone()],
        vec![b.clone(), c.clone()],
        vec![a.clone(), c.clone()],
        vec![b.clone(), c.clone()],
        p.clone(),
        p,
        q,
    ];
    let has_head = direct.head().is_some();
    for (i, docs) in calls.iter().enumerate() {
        let want = direct.embed_ids(docs).unwrap().values;
        let got = graphs.embed_ids(docs).unwrap().values;
        assert!(
            want.iter().all(|v| v.is_finite()),
            "{golden_name} call {i}: direct run"
        );
        assert_eq!(got, want, "{golden_name} call {i}: embeddings");
        if has_head {
            let want = direct.logits_ids(docs).unwrap();
            let got = graphs.logits_ids(docs).unwrap();
            assert_eq!(got, want, "{golden_name} call {i}: head outputs");
        }
    }
    // Per output kind: the 1-document shape of a/b runs direct, records, replays twice; c's runs
    // direct; the shape of (a or b, c) runs direct, records, replays for the other batch; p's
    // runs direct, records, replays for q.
    let per_kind = GraphStats {
        recorded: 3,
        replayed: 4,
        direct: 4,
        evicted: 0,
    };
    let kinds = if has_head { 2 } else { 1 };
    let want = GraphStats {
        recorded: per_kind.recorded * kinds,
        replayed: per_kind.replayed * kinds,
        direct: per_kind.direct * kinds,
        evicted: 0,
    };
    assert_eq!(be.graph_stats(), want, "{golden_name}");

    // Two threads at once on one backend (as the two workers per CUDA device run): each
    // thread's recording is its own, a graph is replayed by one thread at a time, and every
    // result is still exact.
    let want_a = direct.embed_ids(std::slice::from_ref(&a)).unwrap().values;
    let want_b = direct.embed_ids(std::slice::from_ref(&b)).unwrap().values;
    let before = be.graph_stats();
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (graphs, a, b, want_a, want_b) = (&graphs, &a, &b, &want_a, &want_b);
            scope.spawn(move || {
                for i in 0..6 {
                    let (doc, want) = if (i + t) % 2 == 0 {
                        (a, want_a)
                    } else {
                        (b, want_b)
                    };
                    let got = graphs.embed_ids(std::slice::from_ref(doc)).unwrap().values;
                    assert_eq!(&got, want, "{golden_name} thread {t} call {i}");
                }
            });
        }
    });
    let after = be.graph_stats();
    // What `mira bench` reports is the backend's count.
    assert_eq!(graphs.graph_stats(), Some(after));
    let calls = |s: GraphStats| s.recorded + s.replayed + s.direct;
    assert_eq!(calls(after) - calls(before), 12, "{after:?}");
    assert!(after.replayed > before.replayed, "{after:?}");
    let (held, buffers, bytes) = be.graph_footprint();
    // At most one more graph of that shape (one per thread).
    assert!(
        held as u64 == after.recorded && after.recorded - before.recorded <= 1,
        "{after:?}"
    );
    eprintln!(
        "{golden_name} on {}: graphs {:?}, {held} graphs hold {buffers} activation buffers \
         ({bytes} bytes)",
        graphs.device_name(),
        be.graph_stats()
    );
}

/// The whole-model tests, one per checkpoint (MiniLM and the nine random BERT, RoBERTa, XLM-R, NeMo-style
/// mixin and ModernBERT fixtures),
/// each calling `$check(dir, golden_name)`. For test crates that have `mod common;` and this
/// file as `#[macro_use] mod model_check;`.
macro_rules! model_tests {
    ($check:ident $(, #[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn minilm_matches_cpu() {
            $check(&common::minilm_dir(), "minilm");
        }

        #[test]
        $(#[$attr])*
        fn bert_regression_head_matches_cpu() {
            $check(
                &common::fixture_model("bert-cls-regression"),
                "bert-cls-regression",
            );
        }

        #[test]
        $(#[$attr])*
        fn bert_base_bf16_matches_cpu() {
            $check(&common::fixture_model("bert-base-bf16"), "bert-base-bf16");
        }

        #[test]
        $(#[$attr])*
        fn bert_f16_sharded_classifier_matches_cpu() {
            $check(
                &common::fixture_model("bert-cls-f16-sharded"),
                "bert-cls-f16-sharded",
            );
        }

        #[test]
        $(#[$attr])*
        fn xlm_roberta_classifier_matches_cpu() {
            $check(&common::fixture_model("xlmr-cls-single"), "xlmr-cls-single");
        }

        #[test]
        $(#[$attr])*
        fn roberta_f16_encoder_matches_cpu() {
            $check(&common::fixture_model("roberta-base-f16"), "roberta-base-f16");
        }

        #[test]
        $(#[$attr])*
        fn gte_ntk_classifier_matches_cpu() {
            $check(&common::fixture_model("gte-cls-ntk"), "gte-cls-ntk");
        }

        #[test]
        $(#[$attr])*
        fn gte_f16_mixed_ntk_encoder_matches_cpu() {
            $check(&common::fixture_model("gte-base-mixed"), "gte-base-mixed");
        }

        #[test]
        $(#[$attr])*
        fn deberta_v3_log_bucketed_classifier_matches_cpu() {
            $check(&common::fixture_model("deberta-v3-cls"), "deberta-v3-cls");
        }

        #[test]
        $(#[$attr])*
        fn deberta_v2_bf16_encoder_matches_cpu() {
            $check(
                &common::fixture_model("deberta-v2-base-bf16"),
                "deberta-v2-base-bf16",
            );
        }

        #[test]
        $(#[$attr])*
        fn nemo_style_mixin_on_deberta_matches_cpu() {
            $check(&common::fixture_model("nemo-mixin-deberta"), "nemo-mixin-deberta");
        }

        #[test]
        $(#[$attr])*
        fn nemo_style_mixin_classifier_matches_cpu() {
            $check(&common::fixture_model("nemo-mixin-roberta"), "nemo-mixin-roberta");
        }

        #[test]
        $(#[$attr])*
        fn modernbert_mean_pooled_head_matches_cpu() {
            $check(
                &common::fixture_model("modernbert-cls-mean"),
                "modernbert-cls-mean",
            );
        }

        #[test]
        $(#[$attr])*
        fn modernbert_biased_cls_head_matches_cpu() {
            $check(
                &common::fixture_model("modernbert-cls-biased"),
                "modernbert-cls-biased",
            );
        }

        #[test]
        $(#[$attr])*
        fn modernbert_encoder_matches_cpu() {
            $check(
                &common::fixture_model("modernbert-base-enc"),
                "modernbert-base-enc",
            );
        }
    };
}

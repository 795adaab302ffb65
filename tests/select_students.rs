//! Students' features chosen by validation (`mira::select::features`) and their two export
//! formats: labels constructed to be exactly linear in one feature of the real encoder
//! (all-MiniLM-L6-v2) per group, so the right choice is known; each student then loads in mira
//! and scores as the written tensors say, and `mira select` runs one shared encoder for heads
//! that read different features. (That the folders load in transformers and
//! sentence-transformers with equal scores is `python/tests/test_student_export.py`.)

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use mira::select::distill::{self, DistillOptions};
use mira::select::features::{Feature, FeatureChoice, Pooler, Row};
use mira::select::label::{split_of, LabelRow};
use mira::select::reliability::{self, Thresholds};
use mira::select::retain::{self, SelectOptions};
use mira::select::students::Students;
use mira::select::Groups;
use mira::{Device, LoadOptions, Scorer};
use serde_json::{json, Map, Value};

/// Group -> (source, the feature its labels are linear in).
const GROUPS: [(&str, &str, Feature); 3] = [
    ("gpool", "docs/click", Feature::Pooler),
    ("gcls", "python-code/requests", Feature::Cls),
    ("gmean", "licenses", Feature::Mean),
];
const PER_GROUP: usize = 80;

fn records() -> Vec<Value> {
    let sample = common::repo().join(".data/sample/corpus.jsonl");
    let text = std::fs::read_to_string(&sample)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", sample.display()));
    let mut out = Vec::new();
    for (_, source, _) in GROUPS {
        out.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|v| v["source"] == source)
                .take(PER_GROUP),
        );
    }
    assert_eq!(out.len(), 3 * PER_GROUP, "sample corpus lacks the sources");
    out
}

/// Feature `kind` of each text, in f64: the encoder's `[CLS | mean]` rows at the length students
/// read by default (the encoder's `max_position_embeddings`), the pooler applied here in f64
/// from its tensors.
fn features(encoder: &Scorer, texts: &[&str], kind: Feature, pooler: &Pooler) -> Vec<Vec<f64>> {
    let h = encoder.hidden_size();
    let ids = encoder.tokenize_at(texts, encoder.max_positions()).unwrap();
    let (rows, failures) = encoder.cls_and_mean_ids_lenient(&ids).unwrap();
    assert!(failures.is_empty());
    rows.values
        .chunks_exact(2 * h)
        .map(|r| match kind {
            Feature::Cls => r[..h].iter().map(|v| *v as f64).collect(),
            Feature::Mean => r[h..].iter().map(|v| *v as f64).collect(),
            Feature::Pooler => pooler.apply(&r[..h]).iter().map(|v| *v as f64).collect(),
        })
        .collect()
}

/// Two anchors per group, each exactly linear in the group's feature: y = u·f(x), with u a
/// random combination of the training rows' centred features (so a ridge fit on them can
/// recover it), rescaled to mean 5 and standard deviation 2.
fn labels(encoder: &Scorer, rows: &[Value]) -> Vec<LabelRow> {
    let pooler = pooler_of(encoder);
    let mut out = Vec::new();
    for (g, (group, source, kind)) in GROUPS.iter().enumerate() {
        let mine: Vec<&Value> = rows.iter().filter(|v| v["source"] == *source).collect();
        let texts: Vec<&str> = mine.iter().map(|v| v["text"].as_str().unwrap()).collect();
        let ids: Vec<&str> = mine.iter().map(|v| v["id"].as_str().unwrap()).collect();
        let f = features(encoder, &texts, *kind, &pooler);
        let mut anchors = Vec::new();
        for a in 0..2u64 {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (g as u64 * 7 + a);
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            };
            // Centred as the ridge fit centres its inputs, so u lies in the span it fits in.
            let train: Vec<&Vec<f64>> = (0..f.len())
                .filter(|&i| split_of(ids[i], 0.3) == "train")
                .map(|i| &f[i])
                .collect();
            let centre: Vec<f64> = (0..f[0].len())
                .map(|k| train.iter().map(|fi| fi[k]).sum::<f64>() / train.len() as f64)
                .collect();
            let mut u = vec![0f64; f[0].len()];
            for fi in &train {
                let c = next();
                for (k, uk) in u.iter_mut().enumerate() {
                    *uk += c * (fi[k] - centre[k]);
                }
            }
            let y: Vec<f64> = f
                .iter()
                .map(|fi| fi.iter().zip(&u).map(|(x, u)| x * u).sum())
                .collect();
            let mean = y.iter().sum::<f64>() / y.len() as f64;
            let sd = (y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
            anchors.push(
                y.iter()
                    .map(|v| 5.0 + 2.0 * (v - mean) / sd)
                    .collect::<Vec<_>>(),
            );
        }
        for i in 0..mine.len() {
            let mut scores = Map::new();
            scores.insert("first".into(), json!(anchors[0][i]));
            scores.insert("second".into(), json!(anchors[1][i]));
            out.push(LabelRow {
                id: ids[i].to_string(),
                source: source.to_string(),
                group: group.to_string(),
                split: split_of(ids[i], 0.3).to_string(),
                text: Some(texts[i].to_string()),
                scores,
                rationales: Map::new(),
                error: None,
                origin: Some("constructed".into()),
            });
        }
    }
    out
}

fn pooler_of(encoder: &Scorer) -> Pooler {
    let w = mira::model::weights::Weights::open(encoder.model_dir()).unwrap();
    Pooler::read(&w, encoder.hidden_size()).unwrap().unwrap()
}

/// The student in `dir` says `n` tokens in all three of its files, and mira loads it at `n`.
fn assert_max_tokens(dir: &Path, n: usize) {
    assert_eq!(
        json_file(&dir.join("tokenizer.json"))["truncation"]["max_length"],
        n
    );
    assert_eq!(
        json_file(&dir.join("tokenizer_config.json"))["model_max_length"],
        n
    );
    assert_eq!(
        json_file(&dir.join("sentence_bert_config.json"))["max_seq_length"],
        n
    );
    assert_eq!(json_file(&dir.join("mira_student.json"))["max_tokens"], n);
    assert_eq!(Scorer::load(dir, Device::Cpu).unwrap().max_tokens(), n);
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `[outputs, hidden]` and `[outputs]` f32 tensors of a safetensors file.
fn head_tensors(path: &Path, weight: &str, bias: &str) -> (Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap_or_else(|e| panic!("{}: {n}: {e}", path.display()))
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    (f32s(weight), f32s(bias))
}

#[test]
fn features_chosen_by_validation_export_and_share_one_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let encoder = Scorer::load(common::minilm_dir(), Device::Cpu).unwrap();
    let rows = records();
    let labels = labels(&encoder, &rows);
    let students = tmp.path().join("students");
    let v = distill::distill(&encoder, &labels, &students, &DistillOptions::default()).unwrap();

    // Each group's head reads the feature its labels are linear in, by a clear margin.
    let pooler = pooler_of(&encoder);
    for (group, _, kind) in GROUPS {
        let info = &v.students[group];
        assert_eq!(info.feature, kind, "group {group}: {:?}", info.candidates);
        assert_eq!(info.candidates.len(), 3);
        let mae = |f: Feature| {
            let c = info.candidates.iter().find(|c| c.feature == f).unwrap();
            c.mae.unwrap()
        };
        for other in Feature::ALL.into_iter().filter(|f| *f != kind) {
            assert!(
                mae(kind) < 0.05 && mae(kind) < 0.1 * mae(other),
                "group {group}: {:?}",
                info.candidates
            );
        }
        let chosen = info.candidates.iter().find(|c| c.feature == kind).unwrap();
        assert!(chosen.spearman.unwrap() > 0.9, "{:?}", info.candidates);
    }
    let report = std::fs::read_to_string(students.join("validation.md")).unwrap();
    assert!(
        report.contains("| mean |") && report.contains("chosen"),
        "{report}"
    );

    // The export follows the feature; each student scores as its written tensors say.
    let texts: Vec<&str> = rows
        .iter()
        .step_by(9)
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    for (group, _, kind) in GROUPS {
        let dir = students.join(group);
        let cfg = json_file(&dir.join("config.json"));
        assert_eq!(cfg["problem_type"], "regression");
        assert_eq!(cfg["id2label"], json!({"0": "first", "1": "second"}));
        let (w, b) = if kind == Feature::Pooler {
            assert_eq!(
                cfg["architectures"],
                json!(["BertForSequenceClassification"])
            );
            assert!(!dir.join("modules.json").exists());
            head_tensors(
                &dir.join("model.safetensors"),
                "classifier.weight",
                "classifier.bias",
            )
        } else {
            assert_eq!(cfg["architectures"], json!(["BertModel"]));
            let modules = json_file(&dir.join("modules.json"));
            let kinds: Vec<&str> = modules
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["type"].as_str().unwrap())
                .collect();
            assert_eq!(
                kinds,
                [
                    "sentence_transformers.models.Transformer",
                    "sentence_transformers.models.Pooling",
                    "sentence_transformers.models.Dense"
                ]
            );
            let pooling = json_file(&dir.join("1_Pooling/config.json"));
            assert_eq!(pooling["pooling_mode_cls_token"], kind == Feature::Cls);
            assert_eq!(pooling["pooling_mode_mean_tokens"], kind == Feature::Mean);
            let dense = json_file(&dir.join("2_Dense/config.json"));
            assert_eq!(
                dense["activation_function"],
                "torch.nn.modules.linear.Identity"
            );
            head_tensors(
                &dir.join("2_Dense/model.safetensors"),
                "linear.weight",
                "linear.bias",
            )
        };
        let student = Scorer::load(&dir, Device::Cpu).unwrap();
        assert_eq!(student.head().unwrap().labels, ["first", "second"]);
        let got = student.score(&texts).unwrap();
        let f = features(&encoder, &texts, kind, &pooler);
        let h = encoder.hidden_size();
        let mut worst = 0f64;
        for (d, fd) in f.iter().enumerate() {
            for j in 0..2 {
                let want = b[j] as f64 + (0..h).map(|k| w[j * h + k] as f64 * fd[k]).sum::<f64>();
                worst = worst.max((want - got.row(d)[j] as f64).abs());
            }
        }
        assert!(
            worst < 1e-4,
            "group {group}: student vs W·feature + b: {worst}"
        );
    }

    // One encoder for all three heads, reading [CLS | mean] rows; each head on its row gives
    // what its student, loaded whole, gives.
    let groups = Groups::from_sources(
        GROUPS
            .iter()
            .map(|(g, s, _)| (s.to_string(), g.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    let names = groups.names();
    let shared = Students::load(&students, &names, Device::Cpu, LoadOptions::default()).unwrap();
    let Students::Shared {
        encoder: one,
        heads,
        row,
    } = &shared
    else {
        panic!("the students share their encoder")
    };
    assert_eq!(*row, Row::ClsAndMean);
    let (rows_cm, _) = one
        .cls_and_mean_ids_lenient(&one.tokenize(&texts).unwrap())
        .unwrap();
    for (group, _, _) in GROUPS {
        let whole = Scorer::load(students.join(group), Device::Cpu)
            .unwrap()
            .score(&texts)
            .unwrap();
        for d in 0..texts.len() {
            let via_head = heads[group].apply(rows_cm.row(d), *row).unwrap();
            for (x, y) in via_head.iter().zip(whole.row(d)) {
                let diff = (x - y).abs();
                assert!(diff < 1e-4, "group {group} doc {d}: {diff}");
            }
        }
    }

    // `mira select` over the three groups runs on that shared encoder.
    let corpus = tmp.path().join("corpus.jsonl");
    let lines: String = rows.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(&corpus, lines).unwrap();
    let rel = reliability::mask(&v, &Thresholds::default());
    let files = mira::corpus::expand_inputs(&[corpus]).unwrap();
    let opts = SelectOptions {
        device: Device::Cpu,
        ..Default::default()
    };
    let sel = retain::select(
        &files,
        &groups,
        &students,
        &rel,
        &tmp.path().join("out"),
        &opts,
    )
    .unwrap();
    assert_eq!(sel.total.records, rows.len() as u64, "{sel:?}");
    assert!(sel.errors.is_empty(), "{sel:?}");
}

#[test]
fn a_fixed_feature_is_used_for_every_group_and_a_rewrite_leaves_no_stale_head() {
    let tmp = tempfile::tempdir().unwrap();
    let encoder = Scorer::load(common::minilm_dir(), Device::Cpu).unwrap();
    let labels = labels(&encoder, &records());
    let opts = DistillOptions {
        feature: FeatureChoice::Fixed(Feature::Cls),
        max_tokens: Some(128),
        ..Default::default()
    };
    let v = distill::distill(&encoder, &labels, tmp.path(), &opts).unwrap();
    for info in v.students.values() {
        assert_eq!(info.feature, Feature::Cls);
        assert_eq!(info.candidates.len(), 1);
        assert_eq!(info.max_tokens, Some(128));
    }
    let dir = tmp.path().join("gmean");
    // A length asked for is the one every file of the student states, and mira reads.
    assert_max_tokens(&dir, 128);
    let report = std::fs::read_to_string(tmp.path().join("validation.md")).unwrap();
    assert!(report.contains("of the first 128 tokens"), "{report}");
    let texts = [
        "a short text",
        "another one, a little longer than the first",
    ];

    // Without a problem_type in config.json the Dense module is part of the embedding, as
    // sentence-transformers applies it: no head, and the embedding is the Dense output.
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut plain = json_file(&cfg_path);
    plain.as_object_mut().unwrap().remove("problem_type");
    std::fs::write(&cfg_path, plain.to_string()).unwrap();
    let embedder = Scorer::load(&dir, Device::Cpu).unwrap();
    assert!(embedder.head().is_none());
    assert_eq!(embedder.embedding_dim(), 2);
    std::fs::write(&cfg_path, cfg).unwrap();
    let as_head = Scorer::load(&dir, Device::Cpu)
        .unwrap()
        .score(&texts)
        .unwrap();
    assert_eq!(embedder.embed(&texts).unwrap().values, as_head.values);

    // Distilled again into the same folders as pooler students: no sentence-transformers
    // module of the earlier students is left behind to be loaded instead of the classifier.
    let opts = DistillOptions {
        feature: FeatureChoice::Fixed(Feature::Pooler),
        ..Default::default()
    };
    distill::distill(&encoder, &labels, tmp.path(), &opts).unwrap();
    for name in ["modules.json", "1_Pooling", "2_Dense"] {
        assert!(!dir.join(name).exists(), "{name} left behind");
    }
    // By default a student reads as far as the encoder's positions reach (512 for MiniLM,
    // whose own sentence-transformers limit is 256), as transformers' defaults do.
    assert_max_tokens(&dir, encoder.max_positions());
    assert_eq!(encoder.max_positions(), 512);
    let groups = Groups::from_sources(
        GROUPS
            .iter()
            .map(|(g, s, _)| (s.to_string(), g.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    let students = Students::load(
        tmp.path(),
        &groups.names(),
        Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        students,
        Students::Shared {
            row: Row::Pooler,
            ..
        }
    ));
}

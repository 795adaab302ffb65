//! The selection method end to end without a teacher: real documents (the bundled sample
//! corpus) grouped with all-MiniLM-L6-v2, labels constructed from the text (so their truth is
//! known), distillation into students, the reliability mask and budget selection. Plus label
//! ingestion from datatrove output and score-column files (JSONL and Parquet).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mira::corpus::expand_inputs;
use mira::select::distill::{self, DistillOptions};
use mira::select::features::{Feature, FeatureChoice};
use mira::select::group::{self, GroupOptions};
use mira::select::label::{self, split_of, IngestOptions, LabelRow};
use mira::select::reliability::{self, Thresholds};
use mira::select::retain::{self, Cutoff, ScoreRow, SelectOptions};
use mira::select::{stats, Groups};
use mira::{Device, Scorer};
use serde_json::{json, Map, Value};

const SOURCES: [&str; 3] = ["python-code/requests", "docs/click", "licenses"];

/// Up to 30 sample records of each of three sources, split over a plain and a gzip file.
fn corpus(dir: &Path) -> Vec<Value> {
    let sample = common::repo().join(".data/sample/corpus.jsonl");
    let text = std::fs::read_to_string(&sample)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", sample.display()));
    let mut per: HashMap<String, usize> = HashMap::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let s = v["source"].as_str().unwrap().to_string();
        if SOURCES.contains(&s.as_str()) && *per.get(&s).unwrap_or(&0) < 30 {
            *per.entry(s).or_default() += 1;
            rows.push(v);
        }
    }
    assert_eq!(rows.len(), 90, "sample corpus lacks the expected sources");
    let (a, b) = rows.split_at(45);
    let plain: String = a.iter().map(|v| format!("{}\n", spaced(v))).collect();
    std::fs::write(dir.join("part1.jsonl"), plain).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for v in b {
        std::io::Write::write_all(&mut gz, format!("{}\n", spaced(v)).as_bytes()).unwrap();
    }
    std::fs::write(dir.join("part2.jsonl.gz"), gz.finish().unwrap()).unwrap();
    rows
}

/// A record as a JSON line that no serialiser would write back the same (spaces after `:`
/// and `,`, non-ASCII escaped), so kept lines are checked byte for byte.
fn spaced(v: &Value) -> String {
    let fields: Vec<String> = v
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, x)| {
            let x = serde_json::to_string(x).unwrap();
            let escaped: String = x
                .chars()
                .map(|c| {
                    if c.is_ascii() {
                        c.to_string()
                    } else {
                        let mut units = [0u16; 2];
                        c.encode_utf16(&mut units)
                            .iter()
                            .map(|u| format!("\\u{u:04x}"))
                            .collect()
                    }
                })
                .collect();
            format!("{}: {}", serde_json::to_string(k).unwrap(), escaped)
        })
        .collect();
    format!("{{ {} }}", fields.join(",  "))
}

/// Labels whose truth is known: `length` (learnable from text), `has_def` (code-ness within
/// a source), `noise` (a hash of the id: nothing to learn).
fn constructed_labels(rows: &[Value], groups: &Groups) -> Vec<LabelRow> {
    rows.iter()
        .map(|v| {
            let id = v["id"].as_str().unwrap().to_string();
            let text = v["text"].as_str().unwrap().to_string();
            let source = v["source"].as_str().unwrap().to_string();
            let mut scores = Map::new();
            scores.insert(
                "length".into(),
                json!((text.len() as f64 / 300.0).min(10.0)),
            );
            scores.insert(
                "has_def".into(),
                json!(if text.contains("def ") { 10.0 } else { 0.0 }),
            );
            scores.insert(
                "noise".into(),
                json!((stats::keyed_hash(11, &id) % 11) as f64),
            );
            LabelRow {
                split: split_of(&id, 0.3).to_string(),
                group: groups.group_of(&source).unwrap().to_string(),
                id,
                source,
                text: Some(text),
                scores,
                rationales: Map::new(),
                error: None,
                origin: Some("constructed".into()),
            }
        })
        .collect()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    rows: Vec<Value>,
    groups: Groups,
    encoder: Arc<Scorer>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let rows = corpus(&dir);
    let encoder = Arc::new(Scorer::load(common::minilm_dir(), Device::Cpu).unwrap());
    let files = expand_inputs(&[dir.join("part1.jsonl"), dir.join("part2.jsonl.gz")]).unwrap();
    let groups = group::group_sources(&encoder, &files, &GroupOptions::default()).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        rows,
        groups,
        encoder,
    }
}

#[test]
fn group_distill_mask_and_select() {
    let fx = fixture();
    let g = &fx.groups;
    // Three sources, k by silhouette over 2..=2: licences stand apart from code and docs.
    assert_eq!(g.k, 2, "{g:?}");
    let lic = g.group_of("licenses").unwrap();
    assert_eq!(g.members[lic], vec!["licenses".to_string()]);
    assert_eq!(g.group_of("docs/click"), g.group_of("python-code/requests"));
    let (code_group, _) = g.members.iter().find(|(k, _)| k.as_str() != lic).unwrap();
    let inter = g.inter_similarity.values().next().unwrap();
    assert!(g.intra_similarity[code_group] > *inter, "{g:?}");
    group::write(g, &fx.dir.join("groups.json")).unwrap();
    assert_eq!(&Groups::load(&fx.dir.join("groups.json")).unwrap(), g);

    // Distil students from the constructed labels.
    let labels = constructed_labels(&fx.rows, g);
    label::write_labels(&fx.dir.join("labels.jsonl"), &labels).unwrap();
    let labels = label::read_labels(&fx.dir.join("labels.jsonl")).unwrap();
    let students = fx.dir.join("students");
    // The pooler, so the students are BertForSequenceClassification folders (the feature
    // choice and the other export are tests/select_students.rs).
    let opts = DistillOptions {
        feature: FeatureChoice::Fixed(Feature::Pooler),
        ..Default::default()
    };
    let v = distill::distill(&fx.encoder, &labels, &students, &opts).unwrap();
    assert_eq!(v.students.len(), 2);
    let info = &v.students[code_group];
    assert_eq!(info.anchors, vec!["length", "has_def", "noise"]);
    let sp = |a: &str| info.spearman[info.anchors.iter().position(|x| x == a).unwrap()];
    // A learnable anchor is learnt; the noise is not. (`length` is not asserted: past 512
    // tokens the encoder never sees how long a document is.)
    assert!(sp("has_def").unwrap() > 0.6, "{info:?}");
    assert!(
        sp("noise").unwrap_or(0.0) < sp("has_def").unwrap(),
        "{info:?}"
    );

    // The student folder is a faithful BertForSequenceClassification: scores equal
    // pooler-features · Wᵀ + b computed here from the written tensors.
    let sdir = students.join(code_group);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(sdir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["architectures"],
        json!(["BertForSequenceClassification"])
    );
    assert_eq!(cfg["problem_type"], "regression");
    assert_eq!(
        cfg["id2label"],
        json!({"0": "length", "1": "has_def", "2": "noise"})
    );
    let bytes = std::fs::read(sdir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (w, b) = (f32s("classifier.weight"), f32s("classifier.bias"));
    assert!(st.names().contains(&"bert.pooler.dense.weight"));
    let student = Scorer::load(&sdir, Device::Cpu).unwrap();
    // Its three statements of the input length agree with the length mira scores at: by
    // default the encoder's max_position_embeddings, where transformers' defaults also stop
    // (the encoder's MiniLM files say 128, 512 and 256).
    let json = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(sdir.join(name)).unwrap()).unwrap()
    };
    let n = fx.encoder.max_positions();
    assert_eq!(student.max_tokens(), n);
    assert_eq!(json("tokenizer.json")["truncation"]["max_length"], n);
    assert!(json("tokenizer.json")["padding"].is_null());
    assert_eq!(json("tokenizer_config.json")["model_max_length"], n);
    assert_eq!(json("sentence_bert_config.json")["max_seq_length"], n);
    let texts: Vec<&str> = labels
        .iter()
        .filter(|r| &r.group == code_group)
        .map(|r| r.text.as_deref().unwrap())
        .take(12)
        .collect();
    let got = student.score(&texts).unwrap();
    let feats = fx
        .encoder
        .features_ids(&fx.encoder.tokenize_at(&texts, n).unwrap())
        .unwrap();
    let h = feats.dim;
    let mut worst = 0f64;
    for d in 0..texts.len() {
        for j in 0..3 {
            let e: f64 = b[j] as f64
                + (0..h)
                    .map(|k| w[j * h + k] as f64 * feats.row(d)[k] as f64)
                    .sum::<f64>();
            worst = worst.max((e - got.row(d)[j] as f64).abs());
        }
    }
    assert!(worst < 1e-4, "student vs features·W+b: max abs {worst}");

    // Reliability: every cell masked exactly when a threshold says so.
    let th = Thresholds::default();
    let rel = reliability::mask(&v, &th);
    assert_eq!(rel.cells.len(), v.cells.len());
    for m in &rel.cells {
        let c = &m.cell;
        let should = c.n < th.min_count
            || c.mae.is_none_or(|v| v > th.max_mae)
            || c.spearman.is_none_or(|r| r < th.min_spearman);
        assert_eq!(m.masked, should, "{m:?}");
        assert_eq!(m.masked, !m.reasons.is_empty());
        assert_eq!(rel.unmasked[&c.source].contains(&c.anchor), !m.masked);
    }
    reliability::write(&rel, &fx.dir.join("reliability.json")).unwrap();

    // Select half the tokens per group.
    let files =
        expand_inputs(&[fx.dir.join("part1.jsonl"), fx.dir.join("part2.jsonl.gz")]).unwrap();
    let out = fx.dir.join("selected");
    let opts = SelectOptions {
        device: Device::Cpu,
        ..Default::default()
    };
    let sel = retain::select(&files, g, &students, &rel, &out, &opts).unwrap();
    check_selection(&out, &sel, &fx.rows, Cutoff::Group);

    // A rerun after losing one output and one scores file gives the same bytes.
    let kept1 = std::fs::read(out.join("kept/part2.jsonl.gz")).unwrap();
    std::fs::remove_file(out.join("kept/part2.jsonl.gz")).unwrap();
    std::fs::remove_file(out.join(".mira/done/kept/part2.jsonl.gz.done")).unwrap();
    std::fs::remove_file(out.join("scores/part1.scores.jsonl")).unwrap();
    let again = retain::select(&files, g, &students, &rel, &out, &opts).unwrap();
    assert_eq!(again, sel);
    assert_eq!(
        gunzip(&std::fs::read(out.join("kept/part2.jsonl.gz")).unwrap()),
        gunzip(&kept1)
    );

    // A kept file that would be an input is refused before anything is written: here the
    // input lies in `<out>/kept/`, where its kept records would go.
    {
        let trap = fx.dir.join("trap");
        std::fs::create_dir_all(trap.join("kept")).unwrap();
        let input = trap.join("kept/part1.jsonl");
        std::fs::copy(fx.dir.join("part1.jsonl"), &input).unwrap();
        let before = std::fs::read(&input).unwrap();
        let trap_files = expand_inputs(std::slice::from_ref(&input)).unwrap();
        let e = retain::select(&trap_files, g, &students, &rel, &trap, &opts).unwrap_err();
        assert!(format!("{e:#}").contains("is the input"), "{e:#}");
        assert_eq!(std::fs::read(&input).unwrap(), before);
        assert!(!trap.join("scores").exists(), "nothing written");
    }

    // The same records as one Parquet file: the same records kept, written as Parquet rows.
    {
        use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
        let col = |k: &str| -> ArrayRef {
            Arc::new(StringArray::from(
                fx.rows
                    .iter()
                    .map(|v| v[k].as_str().unwrap().to_string())
                    .collect::<Vec<_>>(),
            ))
        };
        let batch = RecordBatch::try_from_iter(vec![
            ("id", col("id")),
            ("text", col("text")),
            ("source", col("source")),
        ])
        .unwrap();
        let f = std::fs::File::create(fx.dir.join("all.parquet")).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let pq = expand_inputs(&[fx.dir.join("all.parquet")]).unwrap();
        let out_p = fx.dir.join("selected-parquet");
        let sel_p = retain::select(&pq, g, &students, &rel, &out_p, &opts).unwrap();
        assert_eq!(sel_p.groups, sel.groups);
        let file = std::fs::File::open(out_p.join("kept/all.parquet")).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut ids = Vec::new();
        for b in reader {
            let b = b.unwrap();
            assert_eq!(b.num_columns(), 3, "the input's schema");
            let c = b
                .column_by_name("id")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            ids.extend((0..c.len()).map(|i| c.value(i).to_string()));
        }
        let kept_jsonl: Vec<String> = std::fs::read_to_string(out.join("kept/part1.jsonl"))
            .unwrap()
            .lines()
            .chain(gunzip(&std::fs::read(out.join("kept/part2.jsonl.gz")).unwrap()).lines())
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids, kept_jsonl);
    }

    // A global cutoff.
    let out_g = fx.dir.join("selected-global");
    let opts_g = SelectOptions {
        cutoff: Cutoff::Global,
        device: Device::Cpu,
        ..Default::default()
    };
    let sel_g = retain::select(&files, g, &students, &rel, &out_g, &opts_g).unwrap();
    check_selection(&out_g, &sel_g, &fx.rows, Cutoff::Global);

    // Records of a source in no group: an error naming the record, unless let through.
    std::fs::write(
        fx.dir.join("extra.jsonl"),
        "{\"id\":\"x1\",\"text\":\"hello there\",\"source\":\"web\"}\n",
    )
    .unwrap();
    let with_extra =
        expand_inputs(&[fx.dir.join("part1.jsonl"), fx.dir.join("extra.jsonl")]).unwrap();
    let e = retain::select(
        &with_extra,
        g,
        &students,
        &rel,
        &fx.dir.join("sel-x"),
        &opts,
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("extra.jsonl:1: source 'web' is in no group"),
        "{e:#}"
    );
    let keep = SelectOptions {
        unknown: retain::UnknownSource::Keep,
        ..opts.clone()
    };
    let s = retain::select(
        &with_extra,
        g,
        &students,
        &rel,
        &fx.dir.join("sel-k"),
        &keep,
    )
    .unwrap();
    assert_eq!(s.groups["(no group)"].records_kept, 1);

    sharded_selection_keeps_what_one_process_keeps(&fx.dir, &fx.rows, g, &students, &rel);
    students_share_one_encoder_only_when_it_is_the_same(&fx.dir, g, &students, &rel, &sel);
}

/// `mira select` sharded over 48 files, with 3 workers through the library and 7 through the CLI
/// (rank and world size from SLURM's array variables), keeps byte for byte what one process
/// keeps, and reports the same numbers, for every cutoff mode.
fn sharded_selection_keeps_what_one_process_keeps(
    dir: &Path,
    rows: &[Value],
    g: &Groups,
    students: &Path,
    rel: &reliability::Reliability,
) {
    use mira::select::retain::Pass;
    let many = dir.join("many");
    std::fs::create_dir_all(&many).unwrap();
    // Each record twice in a row (the twin under another id): identical texts in one batch score
    // identically, so every bucket's cutoff falls on a tie that input order breaks.
    for i in 0..48 {
        let text: String = rows
            .iter()
            .enumerate()
            .filter(|(j, _)| j % 48 == i)
            .map(|(_, v)| {
                let mut twin = v.clone();
                twin["id"] = json!(format!("{}-twin", v["id"].as_str().unwrap()));
                format!("{}\n{}\n", spaced(v), spaced(&twin))
            })
            .collect();
        std::fs::write(many.join(format!("f{i:02}.jsonl")), text).unwrap();
    }
    std::fs::write(dir.join("groups.json"), serde_json::to_string(g).unwrap()).unwrap();
    let files = expand_inputs(std::slice::from_ref(&many)).unwrap();
    assert_eq!(files.len(), 48);
    for cutoff in [Cutoff::Group, Cutoff::Global, Cutoff::Source] {
        let name = format!("{cutoff:?}").to_lowercase();
        let opts = SelectOptions {
            cutoff,
            device: Device::Cpu,
            ..Default::default()
        };
        let one_out = dir.join(format!("one-{name}"));
        let one = retain::select(&files, g, students, rel, &one_out, &opts).unwrap();
        assert!(one.total.records_kept > 0 && one.total.records_kept < one.total.records);
        let cuts: Value =
            serde_json::from_slice(&std::fs::read(one_out.join("cutoffs.json")).unwrap()).unwrap();
        for (bucket, cut) in cuts["buckets"].as_object().unwrap() {
            let tied = cut["tied_kept"].as_u64().unwrap() + cut["tied_dropped"].as_u64().unwrap();
            assert!(tied >= 2, "{name}: the cutoff of {bucket} is no tie: {cut}");
        }

        let three = dir.join(format!("three-{name}"));
        let run = |pass: Pass, shard: (usize, usize)| {
            let o = SelectOptions {
                shard,
                ..opts.clone()
            };
            retain::run_pass(pass, &files, g, students, rel, &three, &o).unwrap()
        };
        for r in 0..3 {
            assert!(run(Pass::Score, (r, 3)).is_none());
        }
        run(Pass::Cutoff, (0, 1));
        for r in 0..3 {
            run(Pass::Keep, (r, 3));
        }
        let sel3 = run(Pass::Report, (0, 1)).unwrap();
        assert_eq!(sel3, one, "{name}: 3 workers");
        same_kept_files(&files, &one_out, &three);

        let seven = dir.join(format!("seven-{name}"));
        let cli = |pass: &str, task: Option<usize>| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mira"));
            c.args(["select", "--input"]).arg(&many);
            c.arg("--groups").arg(dir.join("groups.json"));
            c.arg("--students").arg(students);
            c.arg("--reliability").arg(dir.join("reliability.json"));
            c.arg("--output-dir").arg(&seven);
            c.args(["--device", "cpu", "--cutoff", &name, "--pass", pass]);
            c.env_remove("SLURM_ARRAY_TASK_ID");
            if let Some(t) = task {
                c.env("SLURM_ARRAY_TASK_ID", (t + 10).to_string());
                c.env("SLURM_ARRAY_TASK_MIN", "10");
                c.env("SLURM_ARRAY_TASK_COUNT", "7");
            }
            let o = c.output().unwrap();
            assert!(
                o.status.success(),
                "{pass}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        for t in 0..7 {
            cli("score", Some(t));
        }
        cli("cutoff", None);
        for t in 0..7 {
            cli("keep", Some(t));
        }
        cli("report", None);
        let sel7: retain::Selection =
            serde_json::from_slice(&std::fs::read(seven.join("selection.json")).unwrap()).unwrap();
        assert_eq!(sel7, one, "{name}: 7 workers");
        same_kept_files(&files, &one_out, &seven);
        if cutoff == Cutoff::Group {
            killed_passes_resume(dir, &many, students, &files, &one_out, &one);
        }
    }
}

/// Each pass killed (SIGKILL) at several moments, then run to its end: the outputs equal an
/// uninterrupted run. At this corpus size only the score pass lasts long enough to be killed
/// mid-way every time; the count of mid-pass kills is asserted for it.
fn killed_passes_resume(
    dir: &Path,
    many: &Path,
    students: &Path,
    files: &[mira::corpus::InputFile],
    one_out: &Path,
    one: &retain::Selection,
) {
    let out = dir.join("killed");
    let cmd = |pass: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mira"));
        c.args(["select", "--input"]).arg(many);
        c.arg("--groups").arg(dir.join("groups.json"));
        c.arg("--students").arg(students);
        c.arg("--reliability").arg(dir.join("reliability.json"));
        c.arg("--output-dir").arg(&out);
        c.args(["--device", "cpu", "--pass", pass]);
        c.env_remove("SLURM_ARRAY_TASK_ID");
        c.stdout(std::process::Stdio::null());
        c.stderr(std::process::Stdio::null());
        c
    };
    for pass in ["score", "cutoff", "keep", "report"] {
        let mut killed = 0;
        for delay_ms in [300, 700, 1200, 2000] {
            let mut child = cmd(pass).spawn().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                killed += 1;
            }
            child.wait().unwrap();
        }
        if pass == "score" {
            assert!(killed > 0, "no score pass was killed before it finished");
        }
        assert!(cmd(pass).status().unwrap().success(), "{pass} after kills");
    }
    let sel: retain::Selection =
        serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
    assert_eq!(&sel, one, "killed and resumed");
    same_kept_files(files, one_out, &out);
}

fn same_kept_files(files: &[mira::corpus::InputFile], a: &Path, b: &Path) {
    for f in files {
        let (x, y) = (a.join("kept").join(&f.rel), b.join("kept").join(&f.rel));
        assert_eq!(
            std::fs::read(&x).unwrap(),
            std::fs::read(&y).unwrap(),
            "{}",
            y.display()
        );
    }
}

/// Students distilled from one encoder load it once; a student whose encoder differs by one
/// weight byte makes them load separately.
fn students_share_one_encoder_only_when_it_is_the_same(
    dir: &Path,
    g: &Groups,
    students: &Path,
    rel: &reliability::Reliability,
    shared_sel: &retain::Selection,
) {
    use mira::select::students::Students;
    let names = g.names();
    let shared = Students::load(students, &names, Device::Cpu, Default::default()).unwrap();
    assert_eq!(shared.encoders_loaded(), 1);
    let foreign = dir.join("students-foreign");
    for n in &names {
        let from = mira::select::distill::student_dir(students, n);
        let to = mira::select::distill::student_dir(&foreign, n);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    // One byte of the first student's word embeddings changes.
    let path = mira::select::distill::student_dir(&foreign, &names[0]).join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let word = st.tensor("bert.embeddings.word_embeddings.weight").unwrap();
    let offset = word.data().as_ptr() as usize - bytes.as_ptr() as usize;
    let mut changed = bytes.clone();
    changed[offset] ^= 1;
    std::fs::write(&path, changed).unwrap();
    let separate = Students::load(&foreign, &names, Device::Cpu, Default::default()).unwrap();
    assert_eq!(separate.encoders_loaded(), names.len());
    // Either way each group has its anchors.
    for n in &names {
        assert_eq!(shared.labels(n), separate.labels(n));
    }
    // Separate students select too: every record scored (one weight bit apart, the scores and
    // so the kept records may differ slightly).
    let files = expand_inputs(&[dir.join("part1.jsonl"), dir.join("part2.jsonl.gz")]).unwrap();
    let opts = SelectOptions {
        device: Device::Cpu,
        ..Default::default()
    };
    let sel = retain::select(&files, g, &foreign, rel, &dir.join("sel-foreign"), &opts).unwrap();
    assert_eq!(sel.total.records, shared_sel.total.records);
    assert_eq!(sel.total.tokens, shared_sel.total.tokens);
    assert!(sel.errors.is_empty(), "{:?}", sel.errors);
}

fn gunzip(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::MultiGzDecoder::new(b)
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// The kept files hold exactly the records marked kept, verbatim and in input order; each
/// bucket keeps its share of tokens within one record; the report and plots exist.
fn check_selection(out: &Path, sel: &retain::Selection, rows: &[Value], cutoff: Cutoff) {
    let read_scores = |name: &str| -> Vec<ScoreRow> {
        std::fs::read_to_string(out.join("scores").join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let scores: Vec<ScoreRow> = [
        read_scores("part1.scores.jsonl"),
        read_scores("part2.scores.jsonl"),
    ]
    .concat();
    assert_eq!(scores.len(), rows.len(), "one score row per input record");
    let kept_text = std::fs::read_to_string(out.join("kept/part1.jsonl")).unwrap()
        + &gunzip(&std::fs::read(out.join("kept/part2.jsonl.gz")).unwrap());
    let kept: Vec<Value> = kept_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kept_ids: Vec<&str> = kept.iter().map(|v| v["id"].as_str().unwrap()).collect();
    // Verbatim records, in input order.
    let by_id: HashMap<&str, &Value> = rows
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v))
        .collect();
    for k in &kept {
        assert_eq!(k, by_id[k["id"].as_str().unwrap()]);
    }
    // Byte for byte: the kept lines are the input's lines.
    for line in kept_text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            line,
            spaced(by_id[v["id"].as_str().unwrap()]),
            "kept verbatim"
        );
    }
    let order: Vec<&str> = rows
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .filter(|id| kept_ids.contains(id))
        .collect();
    assert_eq!(order, kept_ids);
    assert_eq!(sel.total.records_kept as usize, kept.len());
    // Budget per bucket, within one record.
    let mut buckets: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for s in &scores {
        let b = match cutoff {
            Cutoff::Group => s.group.clone().unwrap(),
            Cutoff::Global => "all".into(),
            Cutoff::Source => s.source.clone(),
        };
        let e = buckets.entry(b).or_default();
        e.0 += s.tokens;
        e.2 = e.2.max(s.tokens);
        if kept_ids.contains(&s.id.as_str()) {
            e.1 += s.tokens;
        }
    }
    for (b, (total, kept, max)) in buckets {
        let target = 0.5 * total as f64;
        assert!(
            kept as f64 >= target && (kept as f64) < target + max as f64,
            "{b}: kept {kept} of {total}"
        );
        assert!(sel.thresholds.contains_key(&b));
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| group | records | kept |") && report.contains("| source | records |")
    );
    for g in sel.groups.keys() {
        let svg = std::fs::read_to_string(out.join(format!("report/hist_{g}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("cutoff")
        );
    }
}

#[test]
fn ingest_datatrove_and_score_column_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // datatrove inference output: InferenceResult dicts with the model's reply text.
    let dt = [
        json!({"id": "a", "text": "doc a", "source": "web", "metadata": {"rollout_results": [
            {"text": "The extract is clear. Educational score: 3", "finish_reason": "stop", "usage": {}},
            {"text": "Educational score: 4", "finish_reason": "stop", "usage": {}}]}}),
        json!({"id": "b", "text": "doc b", "source": "web", "metadata": {"rollout_results": [
            {"text": "```json\n{\"clarity\": {\"score\": 7, \"reason\": \"ok\"}, \"depth\": 5}\n```", "finish_reason": "stop", "usage": {}}]}}),
        json!({"id": "c", "text": "doc c", "source": "web", "metadata": {"rollout_results": [6]}}),
    ];
    std::fs::write(
        d.join("dt.jsonl"),
        dt.iter().map(|v| format!("{v}\n")).collect::<String>(),
    )
    .unwrap();
    let rows = label::ingest(
        &expand_inputs(&[d.join("dt.jsonl")]).unwrap(),
        None,
        &IngestOptions::default(),
    )
    .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0].scores,
        json!({"score": 3.5}).as_object().unwrap().clone(),
        "mean of rollouts"
    );
    assert_eq!(rows[1].score("clarity"), Some(7.0));
    assert_eq!(rows[1].score("depth"), Some(5.0));
    assert_eq!(rows[2].score("score"), Some(6.0));
    assert!(rows.iter().all(|r| r.group == "all" && r.text.is_some()));

    // FineWeb-Edu style score columns in Parquet.
    use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
    let batch = RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(StringArray::from(vec!["p1", "p2"])) as ArrayRef,
        ),
        (
            "text",
            Arc::new(StringArray::from(vec!["first", "second"])) as ArrayRef,
        ),
        (
            "score",
            Arc::new(Float64Array::from(vec![2.75, 4.5])) as ArrayRef,
        ),
        (
            "int_score",
            Arc::new(Int64Array::from(vec![3, 5])) as ArrayRef,
        ),
    ])
    .unwrap();
    let f = std::fs::File::create(d.join("edu.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let opts = IngestOptions {
        range: (0.0, 5.0),
        ..Default::default()
    };
    let rows = label::ingest(
        &expand_inputs(&[d.join("edu.parquet")]).unwrap(),
        None,
        &opts,
    )
    .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.score("score").unwrap())
            .collect::<Vec<_>>(),
        vec![2.75, 4.5]
    );
    assert!(
        rows[0].scores.get("int_score").is_none(),
        "first present column only"
    );
    let all = IngestOptions {
        all_columns: true,
        ..opts.clone()
    };
    let rows = label::ingest(
        &expand_inputs(&[d.join("edu.parquet")]).unwrap(),
        None,
        &all,
    )
    .unwrap();
    assert_eq!(rows[1].score("int_score"), Some(5.0));

    // Clear errors: out of range, unparseable, missing, and sources outside groups.json.
    let bad = |name: &str, line: &str, opts: &IngestOptions| -> String {
        std::fs::write(
            d.join(name),
            format!("{{\"id\":\"ok\",\"text\":\"t\",\"score\":1}}\n{line}\n"),
        )
        .unwrap();
        format!(
            "{:#}",
            label::ingest(&expand_inputs(&[d.join(name)]).unwrap(), None, opts).unwrap_err()
        )
    };
    let e = bad(
        "range.jsonl",
        r#"{"id":"x","text":"t","score":12}"#,
        &IngestOptions::default(),
    );
    assert!(
        e.contains("range.jsonl:2") && e.contains("outside the allowed range [0, 10]"),
        "{e}"
    );
    let e = bad(
        "word.jsonl",
        r#"{"id":"x","text":"t","score":"high"}"#,
        &IngestOptions::default(),
    );
    assert!(
        e.contains("word.jsonl:2") && e.contains("not a number"),
        "{e}"
    );
    let e = bad(
        "none.jsonl",
        r#"{"id":"x","text":"t","quality":3}"#,
        &IngestOptions::default(),
    );
    assert!(
        e.contains("none.jsonl:2") && e.contains("none of the label columns"),
        "{e}"
    );
    let e = bad(
        "json.jsonl",
        r#"{"id":"x","text":"t","score":"#,
        &IngestOptions::default(),
    );
    assert!(
        e.contains("json.jsonl:2") && e.contains("malformed JSON"),
        "{e}"
    );
    let e = bad(
        "dt2.jsonl",
        r#"{"id":"x","text":"t","metadata":{"rollout_results":[{"text":"I cannot decide"}]}}"#,
        &IngestOptions::default(),
    );
    assert!(
        e.contains("dt2.jsonl:2") && e.contains("no score found"),
        "{e}"
    );
    let groups = Groups::from_sources(BTreeMap::from([("news".to_string(), "g0".to_string())]));
    std::fs::write(
        d.join("src.jsonl"),
        "{\"id\":\"x\",\"text\":\"t\",\"score\":1,\"source\":\"web\"}\n",
    )
    .unwrap();
    let e = label::ingest(
        &expand_inputs(&[d.join("src.jsonl")]).unwrap(),
        Some(&groups),
        &IngestOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("src.jsonl:1: source 'web' is not in groups.json"),
        "{e:#}"
    );
}

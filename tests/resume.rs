//! Per-file outputs, resume after SIGKILL, and sharding: a killed job reruns to outputs
//! byte-identical to an uninterrupted run, and the ranks of a sharded run together write exactly
//! the single-process outputs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn make_corpus(root: &Path, files: usize, records: usize) {
    for f in 0..files {
        let sub = root.join(format!("part{}", f % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let text: String = (0..records)
            .map(|r| {
                format!(
                    "{{\"id\":\"f{f}r{r}\",\"text\":\"file {f} record {r}: {}\"}}\n",
                    "some words here ".repeat(r % 7)
                )
            })
            .collect();
        std::fs::write(sub.join(format!("doc{f:02}.jsonl")), text).unwrap();
    }
}

fn score(input: &Path, out: &Path, extra: &[&str]) -> Command {
    let model = fixture_model("bert-cls-regression");
    let mut c = Command::new(env!("CARGO_BIN_EXE_mira"));
    c.args([
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ])
    .args(["--output-dir", out.to_str().unwrap(), "--device", "cpu"])
    .args(extra)
    .env_remove("SLURM_ARRAY_TASK_ID")
    .env_remove("SLURM_ARRAY_TASK_COUNT")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// Every file below `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

#[test]
fn outputs_mirror_inputs_and_a_rerun_skips_finished_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("in"), tmp.path().join("out"));
    make_corpus(&input, 4, 20);
    let o = score(&input, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snap = snapshot(&out);
    for f in 0..4 {
        let rel = PathBuf::from(format!("part{}/doc{f:02}.jsonl", f % 3));
        let lines = String::from_utf8(snap[&rel].clone()).unwrap();
        assert_eq!(lines.lines().count(), 20, "{}", rel.display());
        assert!(lines.starts_with(&format!("{{\"id\":\"f{f}r0\"")));
        // Done markers live apart from the data (docs/RELIABILITY.md).
        assert!(snap.contains_key(&PathBuf::from(format!(".mira/done/{}.done", rel.display()))));
        assert!(!snap.contains_key(&PathBuf::from(format!("{}.done", rel.display()))));
    }
    let stats = tmp.path().join("stats.json");
    let o = score(&input, &out, &["--stats", stats.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(
        (
            s["files"].as_u64(),
            s["files_skipped"].as_u64(),
            s["records"].as_u64()
        ),
        (Some(4), Some(4), Some(0))
    );
    assert_eq!(
        snapshot(&out),
        snap,
        "a rerun must not touch finished outputs"
    );
}

#[test]
fn killed_runs_resume_to_byte_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    make_corpus(&input, 12, 3000);
    let reference = tmp.path().join("reference");
    let o = score(&input, &reference, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = snapshot(&reference);

    let out = tmp.path().join("out");
    let mut killed_mid_run = 0;
    for delay_ms in [150, 400, 700, 1000, 1400] {
        let mut child = score(&input, &out, &[]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed_mid_run += 1;
        }
        child.wait().unwrap();
    }
    assert!(killed_mid_run > 0, "no run was killed before it finished");
    let o = score(&input, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        snapshot(&out).keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "same files, no temporaries left"
    );
    for (rel, bytes) in &want {
        if rel.extension().is_some_and(|e| e == "jsonl") {
            assert!(
                snapshot(&out)[rel] == *bytes,
                "{} differs from the uninterrupted run",
                rel.display()
            );
        }
    }
}

#[test]
fn shards_partition_the_files_and_together_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    make_corpus(&input, 7, 5);
    let single = tmp.path().join("single");
    assert!(score(&input, &single, &[]).status().unwrap().success());
    let sharded = tmp.path().join("sharded");
    let mut per_rank = Vec::new();
    for rank in 0..3 {
        // Rank from the SLURM array variables for rank 2, from flags otherwise.
        let mut c = score(&input, &sharded, &[]);
        if rank == 2 {
            c.env("SLURM_ARRAY_TASK_ID", "3")
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_COUNT", "3");
        } else {
            c.args(["--rank", &rank.to_string(), "--world-size", "3"]);
        }
        let before = snapshot(&sharded).len();
        assert!(c.status().unwrap().success());
        per_rank.push(snapshot(&sharded).len() - before);
    }
    assert_eq!(
        per_rank,
        vec![6, 4, 4],
        "files[rank::3] of 7 files, output + marker each"
    );
    let (a, b) = (snapshot(&single), snapshot(&sharded));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (rel, bytes) in &a {
        if rel.extension().is_some_and(|e| e == "jsonl") {
            assert!(b[rel] == *bytes, "{}", rel.display());
        }
    }
    let o = score(&input, &sharded, &["--rank", "3", "--world-size", "3"])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--rank 3"));
}

#[test]
fn dolma_attributes_mirror_the_documents_files() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("dataset/documents/web");
    std::fs::create_dir_all(&docs).unwrap();
    let rows = "{\"id\":\"a\",\"text\":\"h\u{e9}llo \u{4e16}\u{754c}\",\"source\":\"web\",\"metadata\":{}}\n\
                {\"id\":\"b\"}\n\
                {\"id\":\"c\",\"text\":\"plain ascii text\",\"source\":\"web\"}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(rows.as_bytes()).unwrap();
    std::fs::write(docs.join("0000.json.gz"), gz.finish().unwrap()).unwrap();
    let root = tmp.path().join("dataset");
    let o = score(
        &root.join("documents"),
        &root,
        &["--format", "dolma", "--experiment", "quality"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Same relative path, name and compression as the documents file.
    let attr = root.join("attributes/quality/web/0000.json.gz");
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&attr).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let got: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = got.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"], "same rows in the same order");
    assert_eq!(got[0]["source"], "web");
    let attrs = got[0]["attributes"].as_object().unwrap();
    assert_eq!(attrs.len(), 12);
    let span = &attrs["quality__bert-cls-regression__clarity"];
    // "héllo 世界" is 8 code points (12 bytes).
    assert_eq!(
        (span[0][0].as_u64(), span[0][1].as_u64()),
        (Some(0), Some(8))
    );
    assert!(span[0][2].is_f64() && span.as_array().unwrap().len() == 1);
    assert_eq!(
        got[2]["attributes"]["quality__bert-cls-regression__clarity"][0][1],
        16
    );
    assert!(got[1]["attributes"].as_object().unwrap().is_empty() && got[1]["error"].is_string());
    // The scores are the model's scores.
    let scorer =
        mira::Scorer::load(fixture_model("bert-cls-regression"), mira::Device::Cpu).unwrap();
    let s = scorer
        .score(&["h\u{e9}llo \u{4e16}\u{754c}", "plain ascii text"])
        .unwrap();
    let clarity = s.labels.iter().position(|l| l == "clarity").unwrap();
    assert_eq!(span[0][2].as_f64().unwrap() as f32, s.row(0)[clarity]);
}

#[test]
fn chunk_size_does_not_change_outputs_and_empty_files_get_empty_outputs() {
    use mira::corpus::{expand_inputs, FieldNames};
    use mira::pipeline::{run_job, Format, JobOptions, Output, Task};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    make_corpus(&input, 3, 50);
    std::fs::write(input.join("part0/empty.jsonl"), b"").unwrap();
    let scorer =
        mira::Scorer::load(fixture_model("bert-cls-regression"), mira::Device::Cpu).unwrap();
    let files = expand_inputs(std::slice::from_ref(&input)).unwrap();
    let run = |chunk_records: usize, out: &Path| {
        let opts = JobOptions {
            format: Format::Jsonl,
            fields: FieldNames::default(),
            strict: false,
            chunk_records,
            progress: false,
            ..JobOptions::default()
        };
        run_job(
            &scorer,
            Task::Score,
            &files,
            &Output::PerFile(out.to_path_buf()),
            &opts,
        )
        .unwrap()
    };
    let (big, small) = (tmp.path().join("big"), tmp.path().join("small"));
    let s1 = run(4096, &big);
    let s2 = run(7, &small);
    assert_eq!(
        (s1.records, s2.records, s2.ok, s2.files),
        (150, 150, 150, 4)
    );
    // Same files, rows, ids and order; scores equal up to batch-composition float noise.
    let (a, b) = (snapshot(&big), snapshot(&small));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (rel, bytes) in &a {
        if rel.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let parse = |x: &[u8]| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(x)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (ra, rb) = (parse(bytes), parse(&b[rel]));
        assert_eq!(ra.len(), rb.len(), "{}", rel.display());
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x["id"], y["id"]);
            for (label, v) in x["scores"].as_object().unwrap() {
                let (v, w) = (v.as_f64().unwrap(), y["scores"][label].as_f64().unwrap());
                assert!(
                    (v - w).abs() <= 1e-5 * (1.0 + v.abs()),
                    "{} {label}: {v} vs {w}",
                    x["id"]
                );
            }
        }
    }
    assert_eq!(snapshot(&small)[&PathBuf::from("part0/empty.jsonl")], b"");
    assert!(small.join(".mira/done/part0/empty.jsonl.done").exists());
}

#[test]
fn unreadable_files_enormous_and_empty_documents_keep_row_accounting() {
    use mira::corpus::{FieldNames, InputFile};
    use mira::pipeline::{run_job, Format, JobOptions, Output, Task};
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.jsonl");
    let huge = "word ".repeat(1_000_000); // 5 MB on one line
    std::fs::write(
        &good,
        format!("{{\"id\":\"big\",\"text\":\"{huge}\"}}\n{{\"id\":\"empty\",\"text\":\"\"}}\n{{\"id\":\"blank\",\"text\":\" \\n\\t \"}}\n{{\"id\":\"ok\",\"text\":\"fine\"}}\n"),
    )
    .unwrap();
    // Vanished between listing and reading (root can read any file, so use a missing one).
    let gone = InputFile {
        path: tmp.path().join("gone.jsonl"),
        rel: "gone.jsonl".into(),
    };
    let files = vec![
        gone,
        InputFile {
            path: good.clone(),
            rel: "good.jsonl".into(),
        },
    ];
    let scorer =
        mira::Scorer::load(fixture_model("bert-cls-regression"), mira::Device::Cpu).unwrap();
    let out = tmp.path().join("out");
    let opts = JobOptions {
        format: Format::Jsonl,
        fields: FieldNames::default(),
        strict: false,
        chunk_records: 4096,
        progress: false,
        ..JobOptions::default()
    };
    let s = run_job(
        &scorer,
        Task::Score,
        &files,
        &Output::PerFile(out.clone()),
        &opts,
    )
    .unwrap();
    assert_eq!((s.records, s.ok), (5, 2));
    assert_eq!((s.errors["read_error"], s.errors["empty_text"]), (1, 2));
    let gone_rows = std::fs::read_to_string(out.join("gone.jsonl")).unwrap();
    assert!(
        gone_rows.contains("read_error") && gone_rows.contains("gone.jsonl"),
        "{gone_rows}"
    );
    assert!(
        !out.join(".mira/done/gone.jsonl.done").exists(),
        "an unreadable file is retried on the next run"
    );
    assert!(out.join(".mira/done/good.jsonl.done").exists());
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("good.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["big", "empty", "blank", "ok"]);
    assert!(
        rows[0]["scores"].is_object(),
        "an enormous document is truncated and scored"
    );
    assert!(rows[1]["error"].as_str().unwrap().starts_with("empty_text"));
}

/// A scored corpus large enough that `mira select`'s cutoff and keep passes take seconds: the
/// score files (as the score pass writes them, with their done markers) are made directly, so
/// no model runs. Scores fall on a 0.25 grid, so every cutoff lands on a tie.
fn make_scored_corpus(root: &Path, files: usize, records: usize) -> (PathBuf, PathBuf) {
    use mira::select::selection::ScoreRow;
    let input = root.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut rows_of = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        let mut rows = Vec::new();
        for r in 0..records {
            let source = format!("s{}", next() % 5);
            let id = format!("f{f}r{r}");
            text.push_str(&format!(
                "{{\"id\":\"{id}\",\"source\":\"{source}\",\"text\":\"record {r} of file {f}\",\"n\":{r}}}\n"
            ));
            rows.push(ScoreRow {
                id,
                group: Some(if source.as_str() < "s3" { "g0" } else { "g1" }.to_string()),
                source,
                tokens: 10 + next() % 200,
                score: Some((next() % 41) as f64 / 4.0),
                error: None,
            });
        }
        std::fs::write(input.join(format!("doc{f:03}.jsonl")), text).unwrap();
        rows_of.push(rows);
    }
    let meta = root.join("meta");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(
        meta.join("groups.json"),
        r#"{"groups":{"s0":"g0","s1":"g0","s2":"g0","s3":"g1","s4":"g1"},"members":{"g0":["s0","s1","s2"],"g1":["s3","s4"]}}"#,
    )
    .unwrap();
    std::fs::write(
        meta.join("reliability.json"),
        r#"{"thresholds":{"max_mae":2.0,"min_spearman":0.3,"min_count":5},"cells":[],"unmasked":{}}"#,
    )
    .unwrap();
    let files_of = mira::corpus::expand_inputs(std::slice::from_ref(&input)).unwrap();
    assert_eq!(files_of.len(), files);
    // The score files are written into a template output folder, copied per run.
    let template = root.join("scored");
    for (f, rows) in files_of.iter().zip(rows_of) {
        let path = mira::select::reduce::scores_path(&template, f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(&path, text).unwrap();
        mira::corpus::mark_done(&mira::select::reduce::scores_root(&template), &path, b"{}")
            .unwrap();
    }
    (input, meta)
}

fn select_pass(input: &Path, meta: &Path, out: &Path, pass: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mira"));
    c.args(["select", "--input"]).arg(input);
    c.arg("--groups").arg(meta.join("groups.json"));
    c.arg("--reliability").arg(meta.join("reliability.json"));
    // The cutoff, keep and report passes run no student.
    c.arg("--students").arg(meta.join("no-students"));
    c.arg("--output-dir").arg(out);
    c.args(["--device", "cpu", "--pass", pass]);
    c.env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// `mira select`'s cutoff, keep and report passes, each killed with SIGKILL part-way through its
/// measured running time, then rerun: the outputs equal an uninterrupted selection's byte for
/// byte, with no temporaries left. The cutoff and keep passes must really be killed before they
/// finish; the report pass (a reduce over the kept files' tallies, milliseconds) is killed when
/// the timing allows.
#[test]
fn select_passes_killed_midway_resume_to_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, meta) = make_scored_corpus(tmp.path(), 150, 3000);
    let template = tmp.path().join("scored");
    let reference = tmp.path().join("reference");
    let out = tmp.path().join("out");
    copy_dir(&template, &reference);
    copy_dir(&template, &out);
    let mut took = BTreeMap::new();
    for pass in ["cutoff", "keep", "report"] {
        let t = std::time::Instant::now();
        let o = select_pass(&input, &meta, &reference, pass)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{pass}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        took.insert(pass, t.elapsed());
    }
    eprintln!("uninterrupted passes took {took:?}");
    let want = snapshot(&reference);
    assert!(want.keys().any(|k| k.starts_with("kept")), "something kept");

    for pass in ["cutoff", "keep", "report"] {
        let mut killed_mid_pass = 0;
        for share in [0.5, 0.25, 0.75, 0.1] {
            let mut child = select_pass(&input, &meta, &out, pass).spawn().unwrap();
            std::thread::sleep(took[pass].mul_f64(share));
            let running = child.try_wait().unwrap().is_none();
            if running {
                child.kill().unwrap(); // SIGKILL
                killed_mid_pass += 1;
            }
            child.wait().unwrap();
            if pass == "keep" && running {
                let kept = snapshot(&out.join("kept"))
                    .keys()
                    .filter(|k| !k.to_string_lossy().starts_with('.'))
                    .count();
                assert!(kept < 150, "a killed keep pass had finished every file");
            }
        }
        eprintln!("{pass}: killed {killed_mid_pass} of 4 runs before they finished");
        if pass != "report" {
            assert!(
                killed_mid_pass > 0,
                "no {pass} pass was killed before it finished (it took {:?})",
                took[pass]
            );
        }
        let o = select_pass(&input, &meta, &out, pass).output().unwrap();
        assert!(
            o.status.success(),
            "{pass} after kills: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let got = snapshot(&out);
    let only = |a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>| {
        a.keys()
            .filter(|k| !b.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (only(&got, &want), only(&want, &got)),
        (vec![], vec![]),
        "same files, no temporaries left (files only after the kills, only uninterrupted)"
    );
    for (rel, bytes) in &want {
        assert!(
            got[rel] == *bytes,
            "{} differs from the uninterrupted run",
            rel.display()
        );
    }
}

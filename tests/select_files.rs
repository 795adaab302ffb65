//! Bad selection files get clear errors naming the file and line: rubrics, labels, groups and
//! run configs.

use mira::select::label::read_labels;
use mira::select::run::RunConfig;
use mira::select::{read_rubric, Groups};

fn err(name: &str, text: &str, read: impl Fn(&std::path::Path) -> anyhow::Result<()>) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, text).unwrap();
    format!("{:#}", read(&p).unwrap_err())
}

#[test]
fn bad_rubrics() {
    let rubric = |p: &std::path::Path| read_rubric(p).map(|_| ());
    let a = r#"{"name":"clarity","definition":"clear"}"#;
    let e = err("g0.jsonl", &format!("{a}\n{a}\n"), rubric);
    assert!(
        e.contains("g0.jsonl:2") && e.contains("duplicate anchor name 'clarity'"),
        "{e}"
    );
    let e = err("g0.jsonl", &format!("{a}\n{{\"definition\": 3}}\n"), rubric);
    assert!(
        e.contains("g0.jsonl:2") && e.contains("not a rubric anchor"),
        "{e}"
    );
    let e = err("g0.jsonl", r#"{"name":" ","definition":"x"}"#, rubric);
    assert!(e.contains("g0.jsonl:1") && e.contains("empty name"), "{e}");
    let e = err("g0.jsonl", "\n", rubric);
    assert!(e.contains("no anchors"), "{e}");
}

#[test]
fn bad_labels() {
    let labels = |p: &std::path::Path| read_labels(p).map(|_| ());
    let row = r#"{"id":"a","source":"s","group":"g0","split":"train","scores":{"x":1}}"#;
    let e = err(
        "labels.jsonl",
        &format!("{row}\n{}\n", row.replace("train", "test")),
        labels,
    );
    assert!(
        e.contains("labels.jsonl:2") && e.contains("neither train nor validation"),
        "{e}"
    );
    let e = err(
        "labels.jsonl",
        &format!("{row}\n{}\n", row.replace("\"x\":1", "\"x\":\"high\"")),
        labels,
    );
    assert!(
        e.contains("labels.jsonl:2") && e.contains("not a finite number"),
        "{e}"
    );
    let e = err("labels.jsonl", &format!("{row}\n{{\"id\": \n"), labels);
    assert!(
        e.contains("labels.jsonl:2") && e.contains("not a label row"),
        "{e}"
    );
}

#[test]
fn bad_groups_and_configs() {
    let groups = |p: &std::path::Path| Groups::load(p).map(|_| ());
    let e = err(
        "groups.json",
        r#"{"groups":{"a":"g0"},"members":{"g1":["a"]}}"#,
        groups,
    );
    assert!(
        e.contains("groups.json") && e.contains("source 'a' maps to group 'g0'"),
        "{e}"
    );
    let config = |p: &std::path::Path| RunConfig::load(p).map(|_| ());
    let base = "work_dir = \"w\"\ninputs = [\"c.jsonl\"]\nencoder = \"m\"\n";
    let e = err(
        "run.toml",
        &format!("{base}[select]\nbudjet = 0.3\n"),
        config,
    );
    assert!(e.contains("run.toml") && e.contains("budjet"), "{e}");
    let e = err("run.toml", "work_dir = \"w\"\n", config);
    assert!(e.contains("run.toml") && e.contains("inputs"), "{e}");
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ok.toml"), base).unwrap();
    let ok = RunConfig::load(&d.path().join("ok.toml")).unwrap();
    assert_eq!(
        ok.work_dir,
        d.path().join("w"),
        "paths are relative to the config file"
    );
}

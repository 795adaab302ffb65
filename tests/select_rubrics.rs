//! `mira discover`'s judgment-point validation: junk of each kind is rejected and counted by
//! reason, format variants of one name are one dimension, and a group with too few valid points
//! gets fewer anchors and a warning, never junk anchors (discover against a local mock teacher
//! with the real all-MiniLM-L6-v2 as the point encoder).

mod common;

use std::collections::BTreeMap;

use mira::select::discover::{self, judge_example, DiscoverOptions, Judgment};
use mira::select::points::{self, canonical_name, Checked, REASONS};
use mira::select::teacher::{Teacher, TeacherConfig};
use mira::select::Groups;
use serde_json::json;

fn point(name: &str, definition: &str, reason: &str) -> Judgment {
    Judgment {
        name: name.into(),
        definition: definition.into(),
        score: Some(5.0),
        reason: reason.into(),
    }
}

const DOC: &str = "def token_normalize_func(x):\n    \"\"\"Normalize a token for the Pallets \
                   serializer.\"\"\"\n    return x.lower()";

#[test]
fn junk_points_of_each_kind_are_rejected_and_counted() {
    let good = "The text explains each step so that a reader can follow it.";
    let example = judge_example();
    let cases: Vec<(Judgment, Option<&str>)> = vec![
        (point("score", good, "ok"), Some("schema_word")),
        (point("Reason", good, "ok"), Some("schema_word")),
        (point("why", good, "ok"), Some("schema_word")),
        (point("value2", good, "ok"), Some("schema_word")),
        (point("quality dimension", good, "ok"), Some("schema_word")),
        (
            point("step clarity", &example.points[0].definition, "ok"),
            Some("example_copy"),
        ),
        (
            point("exactness", good, &example.points[1].reason),
            Some("example_copy"),
        ),
        (
            point(
                "intro",
                "A user can act on the text without looking elsewhere.",
                "ok",
            ),
            Some("example_copy"),
        ),
        (
            point("ingredients listed", good, "ok"),
            Some("example_copy"),
        ),
        (
            point(
                "usefulness",
                "The second step is to prepare the ingredients.",
                "ok",
            ),
            Some("example_copy"),
        ),
        (point("step clarity", good, "The steps are clear."), None),
        (
            point("token_normalize_func", good, "ok"),
            Some("identifier_name"),
        ),
        (point("tokenNormalize", good, "ok"), Some("identifier_name")),
        (point("click.echo", good, "ok"), Some("identifier_name")),
        (point("version 2", good, "ok"), Some("identifier_name")),
        (point("Pallets", good, "ok"), Some("copied_from_document")),
        (
            point("serializer", good, "ok"),
            Some("copied_from_document"),
        ),
        (
            point("very long name of a dimension here", good, "ok"),
            Some("long_name"),
        ),
        (point("clarity", "Clear.", "ok"), Some("short_definition")),
        (point("clarity", "", "worst"), Some("short_definition")),
        (
            point("precision", &"1.0.".repeat(30), "ok"),
            Some("repeated_text"),
        ),
        (
            point(
                "coverage",
                "The version of the version of the version of the version of it.",
                "ok",
            ),
            Some("repeated_text"),
        ),
        (
            point("accuracy", "Aaaaaaaaaaah this is all wrong here.", "ok"),
            Some("repeated_text"),
        ),
        (point("code clarity", good, "The names are clear."), None),
        (point("self-containedness", good, ""), None),
    ];
    for (p, want) in &cases {
        assert_eq!(
            points::rejection(p, DOC, &example),
            *want,
            "point {:?} / {:?}",
            p.name,
            p.definition
        );
    }
    // One reply with all of them, plus format variants of one valid name: the variants are
    // one dimension, so the second and third are rejected as repeats within the reply.
    let mut reply: Vec<Judgment> = cases.iter().map(|(p, _)| p.clone()).collect();
    reply.push(point("Code Clarity", good, "again"));
    reply.push(point("code-clarity", good, "again"));
    let mut checked = Checked::default();
    checked.add_reply(&reply, DOC, &example);
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for (_, w) in &cases {
        if let Some(w) = w {
            *want.entry(w.to_string()).or_default() += 1;
        }
    }
    want.insert("repeated_in_reply".into(), 2);
    assert_eq!(checked.rejected, want);
    for r in checked.rejected.keys() {
        assert!(REASONS.contains(&r.as_str()), "{r} is a listed reason");
    }
    let kept: Vec<&str> = checked.kept.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(kept, ["step clarity", "code clarity", "self-containedness"]);
    assert_eq!(
        canonical_name("Code Clarity"),
        canonical_name("code_clarity")
    );
    assert_eq!(canonical_name("code-clarity"), "code_clarity");
}

#[test]
fn anchors_are_bounded_by_the_valid_points() {
    let mut c = Checked::default();
    assert_eq!(c.anchors_supported(15), 0);
    let names = ["code clarity", "test coverage", "naming", "error handling"];
    let pts: Vec<Judgment> = (0..7)
        .map(|i| {
            point(
                names[i % 4],
                &format!(
                    "A good document does thing number {} well.",
                    ["one", "two", "three", "four"][i % 4]
                ),
                "ok",
            )
        })
        .collect();
    for p in &pts {
        c.add_reply(std::slice::from_ref(p), "", &Default::default());
    }
    // 7 valid points, 3 per anchor: 2 anchors, however many were asked for.
    assert_eq!(c.anchors_supported(15), 2);
    assert_eq!(c.anchors_supported(1), 1);
}

/// The mock teacher's replies: group `junk`'s records get junk and one valid dimension; group
/// `good`'s get four valid ones.
fn reply_for(user: &str) -> String {
    let dims = if user.contains("junk-doc") {
        json!([
            {"name": "score", "definition": "The score of the document is high.", "reason": "It is.", "score": 3},
            {"name": "why", "definition": "why", "reason": "why", "score": 3},
            {"name": "junk_doc_id", "definition": "An identifier copied from the text.", "reason": "x", "score": 2},
            {"name": "test coverage", "definition": "Tests exercise the behaviour the text describes.", "reason": "Few tests.", "score": 4}
        ])
    } else {
        json!([
            {"name": "code clarity", "definition": "Names and structure make the intent plain to a reader.", "reason": "Clear.", "score": 7},
            {"name": "error handling", "definition": "Failures are caught and reported with useful messages.", "reason": "Some.", "score": 5},
            {"name": "documentation depth", "definition": "Every public function says what it does and returns.", "reason": "Thin.", "score": 4},
            {"name": "runnable examples", "definition": "Examples run as written and show typical use.", "reason": "Good.", "score": 8}
        ])
    };
    json!({"dimensions": dims}).to_string()
}

#[test]
fn a_group_with_few_valid_points_gets_fewer_anchors_and_a_warning() {
    let server = common::mock_teacher::MockTeacher::start(|req| {
        reply_for(common::mock_teacher::last_user(req))
    });
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let mut lines = String::new();
    for i in 0..6 {
        lines.push_str(&json!({"id": format!("j{i}"), "source": "junk", "text": format!("junk-doc number {i}: a short text about nothing much at all.")}).to_string());
        lines.push('\n');
        lines.push_str(&json!({"id": format!("g{i}"), "source": "good", "text": format!("A tutorial page {i} about writing command line tools in Python.")}).to_string());
        lines.push('\n');
    }
    std::fs::write(&corpus, lines).unwrap();
    let files = mira::corpus::expand_inputs(&[corpus]).unwrap();
    let groups = Groups::from_sources(
        [
            ("junk".to_string(), "gj".to_string()),
            ("good".to_string(), "gg".to_string()),
        ]
        .into_iter()
        .collect(),
    );
    let scorer = common::load(&common::minilm_dir(), 128);
    let mut cfg = TeacherConfig::new(&server.url, "mock");
    cfg.concurrency = 4;
    let teacher = Teacher::new(cfg).unwrap();
    let out = dir.path().join("rubrics");
    let opts = DiscoverOptions {
        records_per_group: 6,
        anchors: 5,
        ..Default::default()
    };
    let s = discover::discover(&teacher, &scorer, &files, &groups, &out, &opts).unwrap();
    // gj: 6 replies x 4 points; 6 valid (all one dimension), 18 rejected.
    assert_eq!(s.points["gj"], 24);
    assert_eq!(s.valid_points["gj"], 6);
    let rej = &s.rejected["gj"];
    assert_eq!(rej["schema_word"], 12, "{rej:?}");
    assert_eq!(rej["identifier_name"], 6, "{rej:?}");
    assert_eq!(rej.values().sum::<usize>(), 18);
    let gj = mira::select::read_rubric(&out.join("gj.jsonl")).unwrap();
    let names: Vec<&str> = gj.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["test_coverage"]);
    assert_eq!(gj[0].cluster_size, 6);
    assert!(
        s.warnings
            .iter()
            .any(|w| w.starts_with("group gj: 1 anchors, not 5")),
        "{:?}",
        s.warnings
    );
    // gg: 24 valid points of 4 distinct dimensions: 4 anchors, each named once.
    let gg = mira::select::read_rubric(&out.join("gg.jsonl")).unwrap();
    let mut names: Vec<&str> = gg.iter().map(|a| a.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "code_clarity",
            "documentation_depth",
            "error_handling",
            "runnable_examples"
        ]
    );
    assert!(gg.iter().all(|a| a.cluster_size == 6));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| gj | 6 | 0 | 24 | 6 | 1 |"), "{report}");
    assert!(
        report.contains("| gj | 12 | 0 | 6 | 0 | 0 | 0 | 0 | 0 |"),
        "{report}"
    );
    assert!(
        report.contains("| test_coverage | 6 | Tests exercise the behaviour the text describes. |"),
        "{report}"
    );
    assert!(report.contains("warning: group gj"), "{report}");
    assert_eq!(server.answered(), 12);
}

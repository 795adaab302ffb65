//! Input formats and input lists: plain, multi-member gzip and zstd JSON Lines, directories and
//! globs, and truncated compressed streams (an error row, never a silent loss).

use std::io::Write;
use std::path::Path;

use mira::corpus::{self, FieldNames, Record};

const LINES: &str = "{\"id\":\"a\",\"text\":\"one\"}\n{\"id\":\"b\",\"text\":\"two\"}\n{\"id\":\"c\",\"text\":\"three\"}\n{\"id\":\"d\",\"text\":\"four\"}\n";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn read(path: &Path) -> Vec<Record> {
    corpus::open_input(path, &FieldNames::default())
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn ids(recs: &[Record]) -> Vec<&str> {
    recs.iter().map(|r| r.id.as_str()).collect()
}

#[test]
fn plain_gzip_multi_member_and_zstd_read_the_same_records() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("a.jsonl");
    std::fs::write(&plain, LINES).unwrap();
    // dolma writes gzip files as several concatenated members.
    let (first, second) = LINES.split_at(LINES.find("{\"id\":\"c\"").unwrap());
    let gz = tmp.path().join("a.jsonl.gz");
    std::fs::write(
        &gz,
        [gzip(first.as_bytes()), gzip(second.as_bytes())].concat(),
    )
    .unwrap();
    let zst = tmp.path().join("a.json.zst");
    std::fs::write(&zst, zstd::encode_all(LINES.as_bytes(), 3).unwrap()).unwrap();
    for p in [&plain, &gz, &zst] {
        let recs = read(p);
        assert_eq!(ids(&recs), ["a", "b", "c", "d"], "{}", p.display());
        assert_eq!(recs[3].text, Ok("four".to_string()));
    }
}

#[test]
fn truncated_compressed_streams_end_in_one_error_row() {
    let tmp = tempfile::tempdir().unwrap();
    let big: String = (0..20000)
        .map(|i| format!("{{\"id\":\"r{i}\",\"text\":\"record number {i} with some text\"}}\n"))
        .collect();
    let gz_bytes = gzip(big.as_bytes());
    let zst_bytes = zstd::encode_all(big.as_bytes(), 3).unwrap();
    for (name, bytes) in [("t.jsonl.gz", gz_bytes), ("t.jsonl.zst", zst_bytes)] {
        let path = tmp.path().join(name);
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let recs = read(&path);
        let (last, good) = recs.split_last().unwrap();
        assert!(
            !good.is_empty() && good.len() < 20000,
            "{name}: {} good rows",
            good.len()
        );
        for (i, r) in good.iter().enumerate() {
            assert_eq!(
                r.id,
                format!("r{i}"),
                "{name}: rows before the damage are intact"
            );
        }
        let err = last.text.as_ref().unwrap_err();
        assert_eq!(err.kind(), "read_error", "{name}");
        assert!(
            last.id.contains(name) && err.to_string().contains(name),
            "{name}: {err}"
        );
    }
}

#[test]
fn directories_and_globs_expand_in_sorted_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("corpus");
    std::fs::create_dir_all(root.join("b/nested")).unwrap();
    std::fs::create_dir_all(root.join("a")).unwrap();
    for f in [
        "b/nested/z.jsonl.zst",
        "b/y.json.gz",
        "a/x.jsonl",
        "a/notes.txt",
        "top.ndjson",
    ] {
        std::fs::write(root.join(f), b"").unwrap();
    }
    let files = corpus::expand_inputs(std::slice::from_ref(&root)).unwrap();
    let rel: Vec<String> = files.iter().map(|f| f.rel.display().to_string()).collect();
    assert_eq!(
        rel,
        [
            "a/x.jsonl",
            "b/nested/z.jsonl.zst",
            "b/y.json.gz",
            "top.ndjson"
        ]
    );
    assert!(files.iter().all(|f| f.path == root.join(&f.rel)));
    let outs: Vec<String> = files
        .iter()
        .map(|f| corpus::output_name(&f.rel, "jsonl").display().to_string())
        .collect();
    assert_eq!(
        outs,
        ["a/x.jsonl", "b/nested/z.jsonl", "b/y.jsonl", "top.jsonl"]
    );
    let pattern = root.join("*/*.js*");
    let globbed = corpus::expand_inputs(&[pattern, root.join("a/x.jsonl")]).unwrap();
    let rel: Vec<String> = globbed
        .iter()
        .map(|f| f.path.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert_eq!(
        rel,
        ["a/x.jsonl", "b/y.json.gz"],
        "sorted, duplicates dropped"
    );
    // Two inputs with the same name would collide in an output directory.
    std::fs::write(root.join("b/x.jsonl"), b"").unwrap();
    let clash = corpus::expand_inputs(&[root.join("a/x.jsonl"), root.join("b/x.jsonl")]);
    let clash = clash.unwrap_err().to_string();
    assert!(clash.contains("share the output name"), "{clash}");
    let missing = corpus::expand_inputs(&[root.join("nope.jsonl")])
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.jsonl"), "{missing}");
    let nothing = corpus::expand_inputs(&[root.join("*.parquet")])
        .unwrap_err()
        .to_string();
    assert!(nothing.contains("no input files match"), "{nothing}");
    let parquet = tmp.path().join("x.parquet");
    std::fs::write(&parquet, b"PAR1 but not really").unwrap();
    let err = corpus::open_input(&parquet, &FieldNames::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Parquet") && err.contains("x.parquet"),
        "{err}"
    );
}

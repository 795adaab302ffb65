//! The command-line contract: `mira embed` / `mira score` write one JSON line per input record, in
//! input order, and unusable records appear with an `error` field.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn mira(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(args)
        .output()
        .unwrap()
}

/// `mira CMD --model MODEL --input INPUTS... --output OUT EXTRA...`
fn job(
    cmd: &str,
    model: &Path,
    inputs: &[&Path],
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![cmd, "--model", model.to_str().unwrap(), "--input"];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--output", out.to_str().unwrap()]);
    args.extend(extra);
    mira(&args)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const MIXED: &[u8] = b"{\"id\":\"a\",\"text\":\"A short document.\",\"source\":\"web\"}\n\
{\"text\":\"no id here\"}\n\
{this is not json}\n\
\n\
{\"id\":\"no-text\"}\n\
{\"id\":\"bad-utf8\",\"text\":\"caf\xe9\"}\n\
{\"id\":\"num\",\"text\":42}\n\
{\"id\":\"z\",\"text\":\"\"}\n";

#[test]
fn score_writes_every_record_in_order_with_errors_inline() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, MIXED).unwrap();
    let out = tmp.path().join("out.jsonl");
    let stats = tmp.path().join("stats.json");
    let model = fixture_model("bert-cls-regression");
    let o = job(
        "score",
        &model,
        &[&input],
        &out,
        &["--device", "cpu", "--stats", stats.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&out);
    let input_name = input.display().to_string();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    // Unparseable lines (malformed JSON, invalid UTF-8) fall back to `<file>:<line>`.
    let (l2, l3, l6) = (
        format!("{input_name}:2"),
        format!("{input_name}:3"),
        format!("{input_name}:6"),
    );
    assert_eq!(ids, vec!["a", &l2, &l3, "no-text", &l6, "num", "z"]);
    assert_eq!(rows[0]["source"], "web");
    assert_eq!(rows[0]["scores"].as_object().unwrap().len(), 12);
    assert!(rows[1]["scores"].is_object());
    for (i, kind) in [
        (2, "malformed_json"),
        (3, "missing_text"),
        (4, "invalid_utf8"),
        (5, "text_not_string"),
        (6, "empty_text"),
    ] {
        let err = rows[i]["error"].as_str().unwrap();
        assert!(
            err.starts_with(kind) && err.contains(&input_name),
            "row {i}: {err}"
        );
        assert!(rows[i].get("scores").is_none());
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(
        (s["records"].as_u64(), s["ok"].as_u64()),
        (Some(7), Some(2))
    );
    assert_eq!(s["errors"]["malformed_json"], 1);
    // The library, given the same usable documents, gives the same scores as the CLI.
    let scorer = mira::Scorer::load(&model, mira::Device::Cpu).unwrap();
    let lib = scorer.score(&["A short document.", "no id here"]).unwrap();
    for (i, row) in [0, 1].into_iter().enumerate() {
        let cli: Vec<f32> = lib
            .labels
            .iter()
            .map(|l| rows[row]["scores"][l].as_f64().unwrap() as f32)
            .collect();
        assert_eq!(cli, lib.row(i), "row {row}");
    }
}

#[test]
fn strict_mode_fails_fast_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, MIXED).unwrap();
    let out = tmp.path().join("out.jsonl");
    let model = fixture_model("bert-cls-regression");
    let o = job("score", &model, &[&input], &out, &["--strict"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:3", input.display())) && err.contains("malformed_json"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a failed job must not leave a partial output in place"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("in.jsonl")],
        "temporary files left behind"
    );
}

#[test]
fn embed_matches_library_and_missing_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    std::fs::write(&a, "{\"id\":\"1\",\"text\":\"first file\"}\n").unwrap();
    std::fs::write(
        &b,
        "{\"id\":\"2\",\"body\":\"second file\"}\n{\"id\":\"3\",\"body\":\"more\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("emb.jsonl");
    let model = fixture_model("bert-base-bf16");
    let o = job("embed", &model, &[&b], &out, &["--text-field", "body"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&out);
    assert_eq!(rows.len(), 2);
    let scorer = mira::Scorer::load(&model, mira::Device::Cpu).unwrap();
    let lib = scorer.embed(&["second file", "more"]).unwrap();
    for (i, r) in rows.iter().enumerate() {
        let got: Vec<f32> = r["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, lib.row(i));
    }
    let missing = tmp.path().join("missing.jsonl");
    let o = job("embed", &model, &[&a, &missing], &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.jsonl"));
}

#[test]
fn devices_and_unavailable_backends() {
    let o = mira(&["devices"]);
    assert!(o.status.success());
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    let cpu = listing.lines().find(|l| l.starts_with("cpu")).unwrap();
    // The CPU line says which vector features and which int8 kernel this machine has.
    assert!(
        cpu.contains("cpu features:") && cpu.contains("int8 kernel:"),
        "{cpu}"
    );
    let model = fixture_model("bert-base-bf16");
    let o = mira(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cuda:4096",
        "--docs",
        "4",
    ]);
    // No machine has 4,097 GPUs (cuda:1 exists on a two-GPU machine).
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cuda:4096"));
    // Every backend has a line, CUDA included (devices or why there are none).
    let o = mira(&["devices"]);
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(listing.lines().any(|l| l.starts_with("cuda")), "{listing}");
    if mira::engine::backend::cuda::device::unavailable_reason(None).is_some() {
        let o = mira(&[
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cuda:all",
            "--docs",
            "4",
        ]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("'cuda:all' is not available"), "{err}");
    }
}

/// `mira bench --precision int8 --against f32`: both throughputs and the fidelity report; exit
/// status 1 with the missed threshold when the guard fails; asking bf16 of the CPU says whether it
/// runs bf16 products or is emulated, and int8 of a GPU backend is refused.
#[test]
fn bench_against_reports_fidelity_and_fails_a_missed_guard() {
    let model = fixture_model("bert-cls-regression");
    let model = model.to_str().unwrap();
    let base = [
        "bench", "--model", model, "--device", "cpu", "--docs", "40", "--repeat", "1",
    ];
    let run = |extra: &[&str]| mira(&[&base[..], extra].concat());
    let o = run(&[
        "--precision",
        "int8",
        "--against",
        "f32",
        "--json",
        "--min-cosine",
        "0.9",
        "--max-label-error",
        "0.5",
        "--min-overlap",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("precision int8 on the cpu"), "{err}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["bench"]["device"].as_str().unwrap().contains("int8"),
        "{r}"
    );
    assert!(
        !r["against"]["device"].as_str().unwrap().contains("int8"),
        "{r}"
    );
    let f = &r["fidelity"];
    assert_eq!(
        (f["precision"].as_str(), f["against"].as_str()),
        (Some("int8"), Some("f32"))
    );
    assert_eq!(f["docs"], 40);
    let cos = f["embedding"]["cosine_min"].as_f64().unwrap();
    assert!(
        cos > 0.9 && cos < 1.0,
        "int8 changes the numbers, a little: {cos}"
    );
    let labels = f["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 12);
    assert!(
        labels.iter().all(|l| l["spearman"].as_f64().unwrap() > 0.9),
        "{f}"
    );
    assert!(f["failures"].as_array().unwrap().is_empty(), "{f}");
    // A cosine floor of 1 cannot be met by int8: the guard fails, naming the threshold.
    let o = run(&[
        "--precision",
        "int8",
        "--against",
        "f32",
        "--min-cosine",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("precision int8 misses the fidelity guard against f32: embedding cosine"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("guard      FAILED"));
    // bf16 on the CPU says what it runs: bf16 products where the CPU has AVX512_BF16, else
    // emulated.
    let o = run(&["--precision", "bf16"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let want = match mira::engine::backend::cpu::bf16::Kernel::vector() {
        Some(_) => "precision bf16 on the cpu: encoder linear layers use bf16 weights",
        None => "precision bf16 on the cpu is emulated",
    };
    assert!(err.contains(want), "{err}");
    // Guard thresholds without --against are a usage error, not ignored.
    assert!(!run(&["--min-cosine", "0.5"]).status.success());
}

#[test]
fn bench_reports_json_throughput() {
    let model = fixture_model("bert-cls-regression");
    let o = mira(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--docs",
        "50",
        "--repeat",
        "1",
        "--json",
        "--cuda-graphs",
        "256",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A CUDA-only option on another device is said to do nothing, not silently dropped.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--cuda-graphs applies to CUDA only; it has no effect on cpu"),
        "{err}"
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["docs"], 50);
    assert!(r["cuda_graphs"].is_null(), "no graphs on the CPU: {r}");
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["batch_p99_ms"].as_f64().unwrap() >= r["batch_p50_ms"].as_f64().unwrap());
    assert!(r["model_flops_per_token"].as_f64().unwrap() > 0.0);
    assert!(r["tflops_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn token_outside_the_model_vocabulary_fails_only_its_record() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture_model("bert-cls-regression"), &model);
    // A tokenizer with an added token the checkpoint was never resized for.
    let tok_path = model.join("tokenizer.json");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap().len();
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": vocab, "content": "<extra>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false
        }));
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"ok\",\"text\":\"fine text\"}\n{\"id\":\"bad\",\"text\":\"has <extra> in it\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = job("score", &model, &[&input], &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&out);
    assert!(rows[0]["scores"].is_object());
    let err = rows[1]["error"].as_str().unwrap();
    assert!(
        err.contains("in.jsonl:2") && err.contains("vocabulary"),
        "{err}"
    );
}

#[test]
fn directory_of_compressed_inputs_keeps_every_row_and_counts_read_errors() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let rows = |prefix: &str, n: usize| -> String {
        (0..n)
            .map(|i| format!("{{\"id\":\"{prefix}{i}\",\"text\":\"text {i}\"}}\n"))
            .collect()
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(rows("g", 3).as_bytes()).unwrap();
    std::fs::write(dir.join("1.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        dir.join("2.jsonl.zst"),
        zstd::encode_all(rows("z", 2).as_bytes(), 3).unwrap(),
    )
    .unwrap();
    let broken = zstd::encode_all(rows("x", 4).as_bytes(), 3).unwrap();
    std::fs::write(dir.join("3.jsonl.zst"), &broken[..broken.len() - 8]).unwrap();
    let out = tmp.path().join("out.jsonl");
    let stats = tmp.path().join("stats.json");
    let model = fixture_model("bert-cls-regression");
    let o = job(
        "score",
        &model,
        &[&dir],
        &out,
        &["--stats", stats.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = lines(&out);
    let ids: Vec<&str> = got.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..5], ["g0", "g1", "g2", "z0", "z1"]);
    assert_eq!(got.len(), 6, "the truncated file is one error row: {ids:?}");
    assert!(got[5]["error"].as_str().unwrap().starts_with("read_error"));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(
        (s["records"].as_u64(), s["ok"].as_u64(), s["files"].as_u64()),
        (Some(6), Some(5), Some(3))
    );
    assert_eq!(s["errors"]["read_error"], 1);
}

#[test]
fn keep_input_copies_each_record_into_its_row() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"text\":\"hello there\",\"metadata\":{\"url\":\"u\"},\"n\":3}\n{\"text\":\"\",\"lang\":\"en\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let model = fixture_model("bert-cls-regression");
    let o = job("score", &model, &[&input], &out, &["--keep-input"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&out);
    assert_eq!(rows[0]["text"], "hello there");
    assert_eq!(
        (rows[0]["metadata"]["url"].as_str(), rows[0]["n"].as_u64()),
        (Some("u"), Some(3))
    );
    assert!(rows[0]["scores"].is_object());
    assert_eq!(rows[1]["lang"], "en");
    assert!(
        rows[1]["id"].as_str().unwrap().ends_with("in.jsonl:2") && rows[1]["error"].is_string()
    );
    let o = job(
        "score",
        &model,
        &[&input],
        &tmp.path().join("o.parquet"),
        &["--keep-input", "--format", "parquet"],
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--keep-input"));
}

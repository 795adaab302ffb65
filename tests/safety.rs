//! Safe with files, pipes and plain mistakes: outputs never replace inputs or special files,
//! nothing is read twice, bad numbers and bad records are clear errors or error rows (never a
//! panic, an abort or a lost job). Each test here failed before its fix; docs/RELIABILITY.md
//! lists them by fault.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn mira(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(args)
        .output()
        .unwrap()
}

fn model() -> PathBuf {
    fixture_model("bert-cls-regression")
}

fn score(input: &str, output: &[&str], extra: &[&str]) -> std::process::Output {
    score_with(&model(), input, output, extra)
}

/// `mira score --model MODEL --device cpu --input INPUT OUTPUT... EXTRA...`
fn score_with(m: &Path, input: &str, output: &[&str], extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "score",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "cpu",
        "--input",
        input,
    ];
    args.extend(output);
    args.extend(extra);
    mira(&args)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const DOCS: &str = "{\"id\":\"a\",\"text\":\"A short document about rivers.\"}\n\
{\"id\":\"b\",\"text\":\"Another one, on mountains and snow.\"}\n";

/// `DIR/in.jsonl` holding [`DOCS`].
fn docs_file(dir: &Path) -> PathBuf {
    let input = dir.join("in.jsonl");
    write(&input, DOCS);
    input
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        path.display()
    );
}

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let input = docs_file(tmp.path());
    let i = input.to_str().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let other_spellings = [
        i.to_string(),
        format!("{}/./in.jsonl", tmp.path().display()),
        format!("{}/sub/../in.jsonl", tmp.path().display()),
    ];
    for out in other_spellings {
        let o = score(i, &["--output", &out], &[]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("is the input") && e.contains("in.jsonl"), "{e}");
        assert_eq!(std::fs::read_to_string(&input).unwrap(), DOCS);
    }
    // A symlink to the input is the input.
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let o = score(i, &["--output", link.to_str().unwrap()], &[]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&input).unwrap(), DOCS);
}

#[test]
fn an_output_dir_that_is_the_input_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    write(&dir.join("a.jsonl"), DOCS);
    let d = dir.to_str().unwrap();
    let o = score(d, &["--output-dir", d], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("is (or contains) the input folder"), "{e}");
    assert_eq!(std::fs::read_to_string(dir.join("a.jsonl")).unwrap(), DOCS);
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "nothing written into the corpus");
}

#[test]
fn an_output_dir_inside_the_input_folder_is_never_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    write(&dir.join("a.jsonl"), DOCS);
    let out = dir.join("scores");
    for run in 0..2 {
        // Each run adds a file to the corpus, so the second run has work to do.
        write(&dir.join(format!("new{run}.jsonl")), DOCS);
        let o = score(
            dir.to_str().unwrap(),
            &["--output-dir", out.to_str().unwrap()],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let mut names: Vec<String> = walk(&out)
        .into_iter()
        .map(|p| p.strip_prefix(&out).unwrap().display().to_string())
        .filter(|n| !n.ends_with(".done"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a.jsonl", "new0.jsonl", "new1.jsonl"],
        "outputs were not scored as inputs"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A FIFO stays a FIFO and its reader gets every row; a character device stays a device.
#[cfg(unix)]
#[test]
fn special_files_are_written_in_place_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let input = docs_file(tmp.path());
    let fifo = tmp.path().join("out.fifo");
    mkfifo(&fifo);
    let f = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::read_to_string(f).unwrap());
    let o = score(
        input.to_str().unwrap(),
        &["--output", fifo.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = reader.join().unwrap();
    assert_eq!(got.lines().count(), 2, "{got}");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());

    // A character device: a private one made with mknod when we are root (a regression then
    // cannot touch the machine's /dev/null), else /dev/null itself, which a non-root user
    // cannot rename over anyway.
    // SAFETY: plain libc calls on valid, NUL-terminated paths.
    let null = if unsafe { libc::geteuid() } == 0 {
        let p = tmp.path().join("null");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let dev = libc::makedev(1, 3);
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, dev) };
        assert_eq!(rc, 0, "mknod as root");
        eprintln!("character device made with mknod at {}", p.display());
        p
    } else {
        eprintln!("not root: cannot mknod a character device; writing to /dev/null itself");
        PathBuf::from("/dev/null")
    };
    let o = score(
        input.to_str().unwrap(),
        &["--output", null.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::metadata(&null)
        .unwrap()
        .file_type()
        .is_char_device());
    let o = score(
        input.to_str().unwrap(),
        &["--output", null.to_str().unwrap()],
        &["--format", "parquet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::metadata(&null)
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn parquet_streams_to_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    docs_file(tmp.path());
    let m = model();
    let o = Command::new(env!("CARGO_BIN_EXE_mira"))
        .current_dir(tmp.path())
        .args([
            "score",
            "--model",
            m.to_str().unwrap(),
            "--device",
            "cpu",
            "--input",
            "in.jsonl",
        ])
        .args(["--output", "-", "--format", "parquet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.starts_with(b"PAR1") && o.stdout.ends_with(b"PAR1"),
        "{} bytes",
        o.stdout.len()
    );
    assert!(!tmp.path().join("-").exists(), "no file named '-'");
    let copy = tmp.path().join("copy.parquet");
    std::fs::write(&copy, &o.stdout).unwrap();
    let file = std::fs::File::open(&copy).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 2);
}

/// `mira embed ... --output - | head -1`: status 0, no "Broken pipe" error.
#[test]
fn a_closed_pipe_ends_the_job_quietly() {
    let docs: String = (0..3000)
        .map(|i| format!("{{\"id\":\"{i}\",\"text\":\"document number {i} about rivers\"}}\n"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    write(&input, &docs);
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["embed", "--model", m.to_str().unwrap(), "--device", "cpu"])
        .args(["--input", input.to_str().unwrap(), "--output", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"id\":\"0\""), "{first}");
    // The reader is gone (dropped above); mira's next writes get EPIPE.
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.to_lowercase().contains("broken pipe"), "{err}");
}

#[test]
fn standard_input_is_an_input() {
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args([
            "score",
            "--model",
            m.to_str().unwrap(),
            "--device",
            "cpu",
            "--input",
            "-",
            "--output",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(DOCS.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["id"], "b");
    assert!(rows[1]["scores"]["clarity"].is_number());
}

#[test]
fn a_symlink_loop_is_followed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    write(&dir.join("a.jsonl"), DOCS);
    std::os::unix::fs::symlink(&dir, dir.join("loop")).unwrap();
    std::os::unix::fs::symlink(dir.join("a.jsonl"), dir.join("again.jsonl")).unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = score(
        dir.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lines(&out).len(), 2, "each real file once");
}

#[cfg(unix)]
#[test]
fn a_fifo_inside_an_input_folder_is_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    write(&dir.join("a.jsonl"), DOCS);
    mkfifo(&dir.join("b.jsonl"));
    let out = tmp.path().join("out.jsonl");
    let o = score(
        dir.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("b.jsonl: not a regular file"),
        "{}",
        stderr(&o)
    );
    assert_eq!(lines(&out).len(), 2);
}

#[test]
fn glob_inputs_keep_their_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("documents");
    write(&docs.join("a/x.jsonl"), DOCS);
    write(&docs.join("b/x.jsonl"), DOCS);
    let out = tmp.path().join("out");
    let pattern = format!("{}/*/*.jsonl", docs.display());
    let o = score(&pattern, &["--output-dir", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lines(&out.join("a/x.jsonl")).len(), 2);
    assert_eq!(lines(&out.join("b/x.jsonl")).len(), 2);
}

#[test]
fn unsupported_compressions_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let named = tmp.path().join("x.jsonl.bz2");
    std::fs::write(&named, b"BZh91AY&SY....").unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = score(
        named.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("x.jsonl.bz2")
            && stderr(&o).contains(".bz2 compression is not supported"),
        "{}",
        stderr(&o)
    );
    // xz data under a plain name: one read error row naming the file and the format, not rows
    // of invalid UTF-8.
    let hidden = tmp.path().join("y.jsonl");
    std::fs::write(
        &hidden,
        b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46 and more bytes\n\xff\xfe\n",
    )
    .unwrap();
    let o = score(
        hidden.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let e = rows[0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("read_error") && e.contains("y.jsonl") && e.contains("xz compressed"),
        "{e}"
    );
}

/// One document whose output is not finite is an error row of its own; the rest of its batch
/// is scored, and the job succeeds.
#[test]
fn a_non_finite_output_is_one_error_row() {
    let src = model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&src, &dir);
    let texts = [
        "rivers and lakes of the north",
        "mountains",
        "snow on the hills",
    ];
    let scorer = mira::Scorer::load(&dir, mira::Device::Cpu).unwrap();
    let ids = scorer.tokenize(&texts).unwrap();
    let poison = *ids[0][1..ids[0].len() - 1]
        .iter()
        .find(|t| !ids[1].contains(t) && !ids[2].contains(t))
        .expect("a token only the first text has");
    drop(scorer);
    // That token's embedding becomes infinite: only documents containing it overflow.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let mut data = t.data().to_vec();
            if name.ends_with("word_embeddings.weight") {
                let width = t.shape()[1] * 4;
                let row = poison as usize * width;
                for c in data[row..row + width].chunks_exact_mut(4) {
                    c.copy_from_slice(&f32::INFINITY.to_le_bytes());
                }
            }
            (name, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    let views = tensors.iter().map(|(name, dtype, shape, data)| {
        (
            name.clone(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

    let input = tmp.path().join("in.jsonl");
    let docs: String = texts
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"id\":\"d{i}\",\"text\":\"{t}\"}}\n"))
        .collect();
    write(&input, &docs);
    let out = tmp.path().join("out.jsonl");
    let o = score_with(
        &dir,
        input.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&out);
    assert_eq!(rows.len(), 3);
    let e = rows[0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("non_finite_output") && e.contains("in.jsonl:1"),
        "{e}"
    );
    for r in &rows[1..] {
        assert!(r.get("error").is_none_or(Value::is_null), "{r}");
        assert!(r["scores"]["clarity"].as_f64().unwrap().is_finite());
    }
    assert!(
        stderr(&o).contains("non_finite_output: 1"),
        "{}",
        stderr(&o)
    );
}

/// Duplicate labels and labels named like output columns get unique, safe names at load, so
/// the Parquet file has one column per label and pyarrow/polars can read it.
#[test]
fn label_names_are_unique_and_never_a_column() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&fixture_model("bert-cls-f16-sharded"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["id2label"] = serde_json::json!({"0": "text", "1": "text", "2": "id"});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let scorer = mira::Scorer::load(&dir, mira::Device::Cpu).unwrap();
    assert_eq!(
        scorer.head().unwrap().labels,
        ["text_score", "text_score_2", "id_score"]
    );

    let input = docs_file(tmp.path());
    let out = tmp.path().join("out.parquet");
    let o = score_with(
        &dir,
        input.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &["--format", "parquet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let file = std::fs::File::open(&out).unwrap();
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "source",
            "error",
            "text_score",
            "text_score_2",
            "id_score"
        ]
    );
}

/// Damaged metadata: sizes of zero or 2^62, a shard index leaving the folder, `config.json`
/// pointing at `/dev/zero`: each a clear error naming what is wrong, never a panic or an
/// endless read.
#[test]
fn damaged_metadata_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let load_err = |dir: &Path| -> String {
        match mira::Scorer::load(dir, mira::Device::Cpu) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    };
    for (field, value) in [
        ("hidden_size", 0u64),
        ("intermediate_size", 0),
        ("type_vocab_size", 0),
        ("num_hidden_layers", 1 << 62),
        ("vocab_size", 1 << 62),
    ] {
        let dir = tmp.path().join(format!("{field}-{value}"));
        copy_dir(&model(), &dir);
        let p = dir.join("config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[field] = value.into();
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(&format!("{field} is {value}")), "{field}: {e}");
    }
    {
        let dir = tmp.path().join("mb-layers");
        copy_dir(&fixture_model("modernbert-cls-mean"), &dir);
        let p = dir.join("config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], "modernbert");
        cfg["num_hidden_layers"] = (1u64 << 62).into();
        cfg.as_object_mut().unwrap().remove("layer_types");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("num_hidden_layers is 4611686018427387904"),
            "{e}"
        );
    }
    // A shard index naming a file outside the folder.
    let dir = tmp.path().join("escape");
    copy_dir(&fixture_model("bert-cls-f16-sharded"), &dir);
    let idx = dir.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    let first = v["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    v["weight_map"][&first] = "../../../etc/passwd".into();
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("shard '../../../etc/passwd' is not a file inside the checkpoint folder"),
        "{e}"
    );
    // config.json and tokenizer.json that are devices.
    for file in ["config.json", "tokenizer.json"] {
        let dir = tmp.path().join(format!("dev-{file}"));
        copy_dir(&model(), &dir);
        std::fs::remove_file(dir.join(file)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(file)).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("is not a regular file"), "{file}: {e}");
    }
}

/// `mira run` checks every step's settings before it touches any output: a `budget = nan`
/// (or a negative time-out) used to delete the previous `selected/` first.
#[test]
fn an_invalid_run_config_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let kept = work.join("selected/kept/a.jsonl");
    write(&kept, DOCS);
    write(
        &work.join("steps/select.json"),
        "{\"fingerprint\": \"older\"}",
    );
    let corpus = tmp.path().join("corpus.jsonl");
    write(&corpus, DOCS);
    for (bad, what) in [
        ("[select]\nbudget = nan\n", "the budget is NaN"),
        ("[select]\nbudget = 0.0\n", "the budget is 0"),
        ("[select]\ntrim = 0.7\n", "the trim is 0.7"),
        (
            "[label]\nvalidation_fraction = 1.5\n",
            "[label] validation_fraction is 1.5",
        ),
        (
            "[teacher]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\ntimeout_s = -1.0\n",
            "[teacher] timeout_s is -1",
        ),
    ] {
        let cfg_path = tmp.path().join("run.toml");
        let cfg = format!(
            "work_dir = \"work\"\ninputs = [\"corpus.jsonl\"]\nencoder = \"{}\"\n{bad}",
            model().display()
        );
        std::fs::write(&cfg_path, cfg).unwrap();
        let o = mira(&["run", cfg_path.to_str().unwrap()]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(what), "{what}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), DOCS, "{bad}");
    }
}

/// Group names become file names by one rule (`mira::names::file_name`): `../../x` stays in
/// its folder.
#[test]
fn group_names_cannot_leave_their_folder() {
    let root = Path::new("/work/out/students");
    for name in ["../../x", "/etc", "a/../../b", "..", ""] {
        let p = mira::select::distill::student_dir(root, name);
        assert_eq!(p.parent(), Some(root), "{name} -> {}", p.display());
        let r = mira::select::rubric_path(root, name);
        assert_eq!(r.parent(), Some(root), "{name} -> {}", r.display());
    }
}

/// The output format follows `--output`'s extension when `--format` is absent.
#[test]
fn a_parquet_output_name_gets_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let input = docs_file(tmp.path());
    let out = tmp.path().join("scores.parquet");
    let o = score(
        input.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).unwrap().starts_with(b"PAR1"));
}

/// JSON Lines rows name every column, `null` when absent, so schema inference sees `error`.
#[test]
fn jsonl_rows_have_every_column() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    write(
        &input,
        "{\"id\":\"a\",\"text\":\"fine\"}\n{\"id\":\"b\",\"text\":\"\"}\n",
    );
    let out = tmp.path().join("out.jsonl");
    let o = score(
        input.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&out);
    assert!(rows[0]["source"].is_null() && rows[0]["error"].is_null());
    assert!(rows[0].as_object().unwrap().contains_key("error"));
    assert!(rows[1]["error"].is_string());
}

/// Two jobs on one output folder: the second leaves the file the first is writing alone (it
/// used to delete the first job's live temporary file), and the first finishes it whole.
#[test]
fn a_second_job_leaves_a_live_jobs_output_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    let docs: String = (0..40_000)
        .map(|i| format!("{{\"id\":\"{i}\",\"text\":\"document {i} about rivers and snow\"}}\n"))
        .collect();
    write(&dir.join("big.jsonl"), &docs);
    let out = tmp.path().join("out");
    let m = model();
    let job = || {
        Command::new(env!("CARGO_BIN_EXE_mira"))
            .args(["score", "--model", m.to_str().unwrap(), "--device", "cpu"])
            .args([
                "--input",
                dir.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = job();
    let started = std::time::Instant::now();
    let temp_exists = || {
        std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false)
    };
    while !temp_exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first job never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = job().wait_with_output().unwrap();
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    // Unless the first job finished before the second looked, the second said it left the file.
    let e = stderr(&second);
    assert!(
        e.contains("being written by another job") || e.contains("already done"),
        "{e}"
    );
    assert_eq!(lines(&out.join("big.jsonl")).len(), 40_000);
}

/// `--output-dir` keeps each input's compression unless told otherwise.
#[test]
fn per_file_outputs_keep_the_inputs_compression() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(DOCS.as_bytes()).unwrap();
    std::fs::write(dir.join("a.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        dir.join("b.json.zst"),
        zstd::encode_all(DOCS.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    write(&dir.join("c.jsonl"), DOCS);
    let out = tmp.path().join("out");
    let o = score(
        dir.to_str().unwrap(),
        &["--output-dir", out.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let gz = std::fs::read(out.join("a.jsonl.gz")).unwrap();
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text.lines().count(), 2);
    let zst = zstd::decode_all(&std::fs::read(out.join("b.jsonl.zst")).unwrap()[..]).unwrap();
    assert_eq!(String::from_utf8(zst).unwrap().lines().count(), 2);
    assert_eq!(lines(&out.join("c.jsonl")).len(), 2);
    let plain = tmp.path().join("plain");
    let o = score(
        dir.to_str().unwrap(),
        &["--output-dir", plain.to_str().unwrap()],
        &["--compression", "none"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lines(&plain.join("a.jsonl")).len(), 2);
}

/// Parquet as data tools write it: dictionary-encoded (categorical) strings, integer ids, a
/// struct column addressed by a dotted path, and `--keep-input`.
#[test]
fn parquet_inputs_as_data_tools_write_them() {
    use arrow_array::types::Int32Type;
    use arrow_array::{
        ArrayRef, DictionaryArray, Int64Array, RecordBatch, StringArray, StructArray,
    };
    use arrow_schema::{DataType, Field};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let text: DictionaryArray<Int32Type> = vec![
        "A short document about rivers.",
        "Another one, on snow.",
        "A short document about rivers.",
    ]
    .into_iter()
    .collect();
    let content: ArrayRef = Arc::new(StringArray::from(vec![
        "nested one",
        "nested two",
        "nested three",
    ]));
    let meta = StructArray::from(vec![(
        Arc::new(Field::new("content", DataType::Utf8, true)),
        content,
    )]);
    let batch = RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from(vec![12345, 7, 8])) as ArrayRef,
        ),
        ("text", Arc::new(text) as ArrayRef),
        ("meta", Arc::new(meta) as ArrayRef),
    ])
    .unwrap();
    let input = tmp.path().join("in.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&input).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let i = input.to_str().unwrap();

    let out = tmp.path().join("out.jsonl");
    let o = score(i, &["--output", out.to_str().unwrap()], &["--keep-input"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&out);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], 12345, "an integer id stays an integer");
    assert!(rows[0]["error"].is_null(), "{}", rows[0]);
    assert_eq!(
        rows[0]["scores"], rows[2]["scores"],
        "the same category, the same text"
    );
    assert_eq!(
        rows[1]["meta"]["content"], "nested two",
        "--keep-input copies Parquet rows"
    );

    let nested = tmp.path().join("nested.jsonl");
    let o = score(
        i,
        &["--output", nested.to_str().unwrap()],
        &["--text-field", "meta.content"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&nested);
    assert!(
        rows.iter().all(|r| r["scores"]["clarity"].is_number()),
        "{rows:?}"
    );
    assert_ne!(rows[0]["scores"], rows[2]["scores"]);
}

/// JSON Lines: a dotted `--text-field`, and integer ids kept as integers in JSONL and dolma
/// outputs (dolma's mix compares them with the documents' ids).
#[test]
fn jsonl_nested_fields_and_integer_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dolma");
    let docs = root.join("documents");
    write(
        &docs.join("a.jsonl"),
        "{\"id\":12345,\"text\":\"top\",\"metadata\":{\"content\":\"A short document about rivers.\"}}\n",
    );
    let out = tmp.path().join("out.jsonl");
    let o = score(
        docs.to_str().unwrap(),
        &["--output", out.to_str().unwrap()],
        &["--text-field", "metadata.content"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&out);
    assert_eq!(rows[0]["id"], 12345);
    let direct = tmp.path().join("direct.jsonl");
    write(
        &direct,
        "{\"id\":\"x\",\"text\":\"A short document about rivers.\"}\n",
    );
    let d = tmp.path().join("direct-out.jsonl");
    assert!(score(
        direct.to_str().unwrap(),
        &["--output", d.to_str().unwrap()],
        &[]
    )
    .status
    .success());
    assert_eq!(
        rows[0]["scores"],
        lines(&d)[0]["scores"],
        "the nested text was scored"
    );

    let o = score(
        docs.to_str().unwrap(),
        &["--output-dir", root.to_str().unwrap()],
        &[
            "--format",
            "dolma",
            "--experiment",
            "exp",
            "--model-name",
            "edu v1.5",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = lines(&root.join("attributes/exp/a.jsonl"));
    assert_eq!(rows[0]["id"], 12345);
    let keys: Vec<&String> = rows[0]["attributes"].as_object().unwrap().keys().collect();
    assert!(
        keys.iter().all(|k| k.starts_with("exp__edu_v1_5__")),
        "{keys:?}"
    );
}

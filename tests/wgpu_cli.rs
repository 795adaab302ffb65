//! The wgpu backend through the command line: `mira devices` lists the adapters, `mira score
//! --device wgpu` writes the same rows as the CPU backend (errors included) with scores within
//! tolerance, a missing adapter number is a clear error, and `mira bench` runs on wgpu.

mod common;
mod gpu;

use std::process::Command;

use common::fixture_model;
use gpu::have_adapter;
use serde_json::Value;

fn mira(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(args)
        .output()
        .unwrap()
}

/// `mira bench` on the random classifier with `args`, which must fail: its stderr.
fn bench_error(args: &[&str]) -> String {
    let model = fixture_model("bert-cls-regression");
    let base = ["bench", "--model", model.to_str().unwrap(), "--docs", "3"];
    let o = mira(&[&base[..], args].concat());
    assert!(!o.status.success(), "mira bench {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn devices_lists_the_adapter_and_bad_ordinals_are_named() {
    if !have_adapter() {
        return;
    }
    let o = mira(&["devices"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("wgpu:0"))
        .unwrap_or_else(|| panic!("no wgpu:0 line in\n{out}"));
    assert!(
        line.contains("max storage binding") && line.contains("f16"),
        "{line}"
    );
    let err = bench_error(&["--device", "wgpu:99"]);
    assert!(err.contains("wgpu:99 does not exist"), "{err}");
}

#[test]
fn score_on_wgpu_matches_cpu_row_for_row() {
    if !have_adapter() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let mut text = String::new();
    for i in 0..40 {
        let words = "token ".repeat(1 + (i * 7) % 60);
        text += &format!("{{\"id\":\"d{i}\",\"text\":\"{words} number {i}\"}}\n");
        if i % 13 == 5 {
            text += "{broken json\n";
        }
    }
    std::fs::write(&input, text).unwrap();
    let model = fixture_model("bert-cls-regression");
    let run = |device: &str, precision: &str| -> Vec<Value> {
        let out = tmp.path().join(format!("{device}-{precision}.jsonl"));
        let o = mira(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--device",
            device,
            "--precision",
            precision,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let cpu = run("cpu", "auto");
    let scores = |rows: &[Value]| -> Vec<Option<Vec<f64>>> {
        rows.iter()
            .map(|r| {
                r["scores"]
                    .as_object()
                    .map(|m| m.values().map(|v| v.as_f64().unwrap()).collect())
            })
            .collect()
    };
    let want = scores(&cpu);
    let all: Vec<f64> = want.iter().flatten().flatten().copied().collect();
    let range =
        all.iter().cloned().fold(f64::MIN, f64::max) - all.iter().cloned().fold(f64::MAX, f64::min);
    for (precision, share) in [("f32", 1e-3), ("auto", 1e-2)] {
        let gpu = run("wgpu", precision);
        assert_eq!(gpu.len(), cpu.len(), "{precision}: row count");
        let mut worst = 0f64;
        for ((g, c), (gs, cs)) in gpu.iter().zip(&cpu).zip(scores(&gpu).iter().zip(&want)) {
            assert_eq!(g["id"], c["id"]);
            assert_eq!(g["error"], c["error"]);
            assert_eq!(gs.is_some(), cs.is_some(), "{}", c["id"]);
            if let (Some(gs), Some(cs)) = (gs, cs) {
                for (gv, cv) in gs.iter().zip(cs) {
                    worst = worst.max((gv - cv).abs());
                }
            }
        }
        assert!(
            worst <= share * range,
            "{precision}: scores differ by up to {worst:e}, more than {share} of the range {range:e}"
        );
    }
}

#[test]
fn bench_runs_on_wgpu() {
    if !have_adapter() {
        return;
    }
    let model = fixture_model("bert-cls-regression");
    let o = mira(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "wgpu",
        "--precision",
        "f32",
        "--docs",
        "30",
        "--repeat",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["docs"], 30);
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    let device = r["device"].as_str().unwrap();
    assert!(
        device.starts_with("wgpu") && device.contains("f32 storage"),
        "{device}"
    );
    // int8 is the CPU's: asking it of wgpu is an error, not f32 in disguise.
    let err = bench_error(&["--device", "wgpu", "--precision", "int8"]);
    assert!(err.contains("int8 runs on the cpu only"), "{err}");
}

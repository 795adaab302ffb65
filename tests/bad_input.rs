//! Bad input gets a clear error naming the file, line or tensor, never a panic.

mod common;

use std::path::Path;

use common::*;
use mira::{Device, Scorer};

fn load_err(dir: &Path) -> String {
    match Scorer::load(dir, Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A copy of the small regression checkpoint that a test may damage.
fn scratch_model() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&fixture_model("bert-cls-regression"), &dir);
    (tmp, dir)
}

#[test]
fn missing_folder_and_files_are_named() {
    let msg = load_err(Path::new("/nonexistent/model"));
    assert!(
        msg.contains("/nonexistent/model") && msg.contains("does not exist"),
        "{msg}"
    );
    let (_t, dir) = scratch_model();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("tokenizer.json"), "{msg}");
    let (_t, dir) = scratch_model();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("no weights"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors_is_reported_with_its_path() {
    let (_t, dir) = scratch_model();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let (_t, dir) = scratch_model();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
    // Shorter than the 8-byte header length.
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
}

#[test]
fn tensor_of_wrong_shape_is_named() {
    use safetensors::tensor::{SafeTensors, TensorView};
    let (_t, dir) = scratch_model();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let target = "bert.encoder.layer.1.intermediate.dense.weight";
    let mut tensors: Vec<(String, TensorView)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == target {
            let shape = view.shape().to_vec(); // [I, H] -> drop one row
            let row = shape[1] * (view.dtype().bitsize() / 8);
            let data = &view.data()[..view.data().len() - row];
            tensors.push((
                name,
                TensorView::new(view.dtype(), vec![shape[0] - 1, shape[1]], data).unwrap(),
            ));
        } else {
            tensors.push((name, view));
        }
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(&path, out).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains(target) && msg.contains("shape") && msg.contains("expected"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    use safetensors::tensor::SafeTensors;
    let (_t, dir) = scratch_model();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("layer.0.output.LayerNorm.bias"))
        .collect();
    std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("encoder.layer.0.output.LayerNorm.bias") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture_and_bad_config_are_reported() {
    let (_t, dir) = scratch_model();
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut gpt = cfg.clone();
    gpt["model_type"] = "gpt2".into();
    gpt["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg_path, gpt.to_string()).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("GPT2LMHeadModel"),
        "{msg}"
    );
    let mut masked = cfg.clone();
    masked["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    std::fs::write(&cfg_path, masked.to_string()).unwrap();
    assert!(load_err(&dir).contains("BertForMaskedLM"));
    std::fs::write(&cfg_path, "{\"model_type\": \"bert\", ").unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

#[test]
fn label_count_mismatch_is_reported() {
    let (_t, dir) = scratch_model();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["id2label"] = serde_json::json!({"0": "a", "1": "b"});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("12 outputs") && msg.contains("2 labels"),
        "{msg}"
    );
}

#[test]
fn max_tokens_beyond_positions_or_below_specials_is_refused() {
    let dir = fixture_model("bert-cls-regression");
    for n in [10_000, 2, 1] {
        let opts = mira::LoadOptions {
            max_tokens: Some(n),
            ..Default::default()
        };
        let err = Scorer::load_with(&dir, Device::Cpu, opts)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            err.as_deref().is_some_and(|m| m.contains("max_tokens")),
            "{n}: {err:?}"
        );
    }
}

#[test]
fn scoring_with_an_embedding_model_is_refused() {
    let scorer = Scorer::load(fixture_model("bert-base-bf16"), Device::Cpu).unwrap();
    let msg = format!("{:#}", scorer.score(&["x"]).unwrap_err());
    assert!(msg.contains("no classification head"), "{msg}");
}

//! Where a checkpoint's parts live: its config, tokenizer, weights and sentence-transformers
//! files. A Hugging Face folder holds them all. A `PyTorchModelHubMixin` folder, the format of
//! NeMo Curator's classifiers, holds only the weights (`model.*`, the backbone, and `fc.*`) and a
//! `config.json` with `base_model`, `fc_dropout` and `id2label`: the backbone's config and
//! tokenizer live with the base model, found by [`resolve_base_model`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::{HeadLayout, ModelConfig, ProblemType};
use super::st::SentenceConfig;
use super::weights::Weights;
use crate::checked;

/// A checkpoint's parts, each read from where it lives.
pub struct Checkpoint {
    /// The folder the user named (weights, sentence-transformers files).
    pub dir: PathBuf,
    /// The folder of the config and tokenizer: `dir`, or a mixin's base model.
    pub base: PathBuf,
    pub config: ModelConfig,
    pub sentence: SentenceConfig,
    pub weights: Weights,
}

/// `config.json` of a `PyTorchModelHubMixin` classifier (NeMo Curator's `HFDeberta` and kin).
#[derive(serde::Deserialize)]
struct MixinConfig {
    base_model: String,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
}

impl Checkpoint {
    /// Open `dir`; `base_model` overrides where a mixin's base model is looked for.
    pub fn open(dir: &Path, base_model: Option<&Path>) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            bail!("model folder {} has no config.json", dir.display());
        }
        let text = checked::read_metadata(&config_path)?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "invalid model config {}: not valid JSON",
                config_path.display()
            )
        })?;
        let is_mixin = value.get("model_type").is_none() && value.get("base_model").is_some();
        let (base, config) = if is_mixin {
            let mixin: MixinConfig = serde_json::from_value(value).with_context(|| {
                format!(
                    "{}: not a PyTorchModelHubMixin config",
                    config_path.display()
                )
            })?;
            let base = resolve_base_model(dir, &mixin.base_model, base_model)?;
            let mut config = ModelConfig::from_file(&base.join("config.json"))?;
            config.head = HeadLayout::MixinFc;
            config.architecture = "PyTorchModelHubMixin".into();
            config.problem_type = Some(ProblemType::SingleLabel);
            config.declared_labels = match &mixin.id2label {
                Some(map) => Some(
                    super::config::labels_from_id2label(map)
                        .with_context(|| format!("{}: id2label", config_path.display()))?,
                ),
                None => None,
            };
            (base, config)
        } else {
            if base_model.is_some() {
                bail!(
                    "--base-model is for PyTorchModelHubMixin checkpoints (config.json with base_model); {} is a Hugging Face checkpoint",
                    dir.display()
                );
            }
            let config = ModelConfig::from_json(&text)
                .with_context(|| format!("invalid model config {}", config_path.display()))?;
            (dir.to_path_buf(), config)
        };
        let tokenizer = base.join("tokenizer.json");
        if !dir.join("tokenizer.json").exists() && !tokenizer.exists() {
            bail!(
                "model folder {} has no tokenizer.json{}",
                base.display(),
                if is_mixin {
                    " (a base model saved by transformers has one: AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR))"
                } else {
                    ""
                }
            );
        }
        Ok(Checkpoint {
            sentence: SentenceConfig::load(dir)?,
            weights: Weights::open(dir)?,
            dir: dir.to_path_buf(),
            base,
            config,
        })
    }

    /// `tokenizer.json`: the checkpoint's own, else its base model's.
    pub fn tokenizer(&self) -> PathBuf {
        let own = self.dir.join("tokenizer.json");
        if own.exists() {
            own
        } else {
            self.base.join("tokenizer.json")
        }
    }
}

/// Find a mixin's base model folder: `--base-model DIR` when given; else `base_model` as a local
/// path (absolute, or relative to the checkpoint folder); else a hub id in the local Hugging Face
/// cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`, snapshot of
/// `refs/main`, or the only snapshot). Nothing is downloaded; the error says what was looked for.
pub fn resolve_base_model(dir: &Path, base_model: &str, given: Option<&Path>) -> Result<PathBuf> {
    let has_config = |p: &Path| p.join("config.json").is_file();
    if let Some(p) = given {
        if has_config(p) {
            return Ok(p.to_path_buf());
        }
        bail!(
            "--base-model {}: no config.json there (the base model's folder, e.g. one saved by transformers' save_pretrained)",
            p.display()
        );
    }
    let mut looked = Vec::new();
    let local = dir.join(base_model); // an absolute base_model replaces dir
    if has_config(&local) {
        return Ok(local);
    }
    looked.push(format!("{} (a local folder)", local.display()));
    for cache in hub_caches() {
        let repo = cache.join(format!("models--{}", base_model.replace('/', "--")));
        if let Some(snapshot) = hub_snapshot(&repo).filter(|s| has_config(s)) {
            return Ok(snapshot);
        }
        looked.push(format!("{} (the Hugging Face cache)", repo.display()));
    }
    bail!(
        "{}: base model '{base_model}' not found; looked in {}. Pass --base-model DIR (a folder with its config.json and tokenizer.json)",
        dir.display(),
        looked.join(", ")
    )
}

/// The local Hugging Face hub caches, in the order `huggingface_hub` uses them.
fn hub_caches() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(c) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return vec![c];
    }
    if let Some(h) = var("HF_HOME") {
        return vec![h.join("hub")];
    }
    let xdg = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")));
    xdg.map(|c| vec![c.join("huggingface").join("hub")])
        .unwrap_or_default()
}

/// The snapshot a hub cache entry points at: `refs/main`'s revision, else its only snapshot.
fn hub_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let rev = rev.trim();
        // A revision is a commit hash: never a path.
        if !rev.is_empty() && rev.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Some(snapshots.join(rev));
        }
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    (all.len() == 1).then(|| all.remove(0))
}

//! Memory-mapped safetensors weights: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Tensors are looked up by their checkpoint name with an optional
//! prefix (`bert.`, `model.`), checked against the shape the model expects, and converted to f32 on
//! request, or read in place where the file stores them in f32 (`HostF32`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use crate::engine::HostF32;

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
    header_len: usize,
    meta: Metadata,
}

/// All tensors of a checkpoint folder, memory-mapped.
pub struct Weights {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
    /// Prefix in front of every encoder tensor name (`""`, `"bert."` or `"model."`).
    prefix: String,
}

/// One tensor as stored: its dtype, shape and raw little-endian bytes.
pub struct TensorRef<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    /// The mapped file `bytes` lie in, and where they start in it.
    map: &'a Arc<Mmap>,
    start: usize,
}

impl TensorRef<'_> {
    /// As f32 values read in place from the mapped file where they are stored in f32 and aligned
    /// (`HostF32::mapped`), else converted ([`to_f32`](Self::to_f32)).
    pub fn to_host_f32(&self) -> Result<HostF32> {
        let end = self.start + self.bytes.len();
        match (self.dtype == Dtype::F32)
            .then(|| HostF32::mapped(self.map, self.start, end))
            .flatten()
        {
            Some(values) => Ok(values),
            None => self.to_f32().map(HostF32::from),
        }
    }

    /// Convert to f32 (f32, f16 and bf16 storage).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "tensor '{}' has dtype {other:?}; supported: F32, F16, BF16",
                self.name
            ),
        })
    }
}

/// A shard named by the index, which must be a file inside the checkpoint folder: a plain
/// relative path without `..` (an index naming `../../../etc/passwd` or `/dev/zero` is refused).
fn shard_path(dir: &Path, index_path: &Path, file: &str) -> Result<std::path::PathBuf> {
    use std::path::Component;
    let rel = Path::new(file);
    let inside = !file.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        bail!(
            "{}: shard '{file}' is not a file inside the checkpoint folder",
            index_path.display()
        );
    }
    Ok(dir.join(rel))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Weights {
    /// Open `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open(dir: &Path) -> Result<Weights> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if single.exists() {
            let shard = open_shard(&single)?;
            for name in shard.meta.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else if index_path.exists() {
            let text = crate::checked::read_metadata(&index_path)?;
            let idx: ShardIndex = serde_json::from_str(&text)
                .with_context(|| format!("invalid shard index {}", index_path.display()))?;
            let mut files: Vec<&String> = idx.weight_map.values().collect();
            files.sort();
            files.dedup();
            for (i, file) in files.iter().enumerate() {
                let shard = open_shard(&shard_path(dir, &index_path, file)?)?;
                for name in shard.meta.tensors().keys() {
                    index.insert(name.clone(), i);
                }
                shards.push(shard);
            }
            for (name, file) in &idx.weight_map {
                if !index.contains_key(name) {
                    bail!("{}: tensor '{name}' is listed in {file} but that shard does not contain it",
                        index_path.display());
                }
            }
        } else {
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        }
        // Task models nest the encoder under `bert.` (BERT), `roberta.` (RoBERTa, XLM-R),
        // `deberta.` (DeBERTa), `new.` (GTE) or `model.` (ModernBERT, and mixin classifiers'
        // backbones).
        let prefix = ["bert.", "roberta.", "deberta.", "new.", "model."]
            .into_iter()
            .find(|p| {
                index
                    .keys()
                    .any(|k| k.starts_with(&format!("{p}embeddings.")))
            })
            .unwrap_or("")
            .to_string();
        Ok(Weights {
            shards,
            index,
            prefix,
        })
    }

    /// The encoder prefix detected in tensor names (`""`, `"bert."`, `"roberta."`, `"deberta."`,
    /// `"new."` or `"model."`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Look up a tensor by its full name (no prefix added).
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let &s = self
            .index
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' not found in {}", self.describe_files()))?;
        let shard = &self.shards[s];
        let info: &TensorInfo = shard.meta.info(name).expect("indexed tensor");
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        Ok(TensorRef {
            name: name.to_string(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &shard.mmap[start..end],
            map: &shard.mmap,
            start,
        })
    }

    /// Fetch a tensor, require `shape`, and convert it to f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.shaped(name, shape)?.to_f32()
    }

    /// Fetch a tensor and require `shape`, as f32 values read in place from the mapped file
    /// where it is stored in f32 and aligned (`HostF32::mapped`), else converted.
    pub fn host_f32(&self, name: &str, shape: &[usize]) -> Result<HostF32> {
        self.shaped(name, shape)?.to_host_f32()
    }

    /// Fetch a tensor and require `shape`.
    fn shaped(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {:?}",
                self.file_of(name),
                t.shape,
                shape
            );
        }
        Ok(t)
    }

    fn file_of(&self, name: &str) -> String {
        self.index
            .get(name)
            .map(|&i| self.shards[i].path.display().to_string())
            .unwrap_or_else(|| self.describe_files())
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        names.join(", ")
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    // SAFETY: the file is opened read-only and mapped read-only; like every mmap-based loader we
    // assume nobody truncates the checkpoint while it is being served.
    let mmap =
        unsafe { Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
    let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file (corrupt or truncated): {e}",
            path.display()
        )
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap: Arc::new(mmap),
        header_len,
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    #[test]
    fn f32_tensors_are_read_in_place_and_others_converted() {
        let dir = tempfile::tempdir().unwrap();
        let values = [0.5f32, -1.25, 3.0, 0.125, -7.5, 2.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let tensors = vec![
            (
                "a",
                TensorView::new(Dtype::F32, vec![2, 3], &f32_bytes).unwrap(),
            ),
            (
                "b",
                TensorView::new(Dtype::F16, vec![2, 3], &f16_bytes).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors"))
            .unwrap();
        let w = Weights::open(dir.path()).unwrap();
        let a = w.host_f32("a", &[2, 3]).unwrap();
        assert!(a.is_mapped(), "an f32 tensor is read in place");
        assert_eq!(&a[..], &values);
        let b = w.host_f32("b", &[2, 3]).unwrap();
        assert!(!b.is_mapped(), "an f16 tensor is converted");
        assert_eq!(&b[..], &values, "these values are exact in f16");
        let err = w.host_f32("a", &[3, 2]).unwrap_err().to_string();
        assert!(
            err.contains("'a'") && err.contains("expected [3, 2]"),
            "{err}"
        );
    }
}

//! Step 1, `mira group`: sources with similar content share a rubric and a student.
//!
//! Sample records per source, embed them with the encoder, average per source, normalise, and
//! cluster the source means with k-means (squared Euclidean on unit vectors = 2 - 2·cosine).
//! k is given, or chosen by the best mean silhouette over 2..=max_k.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};

use super::{sample_records, source_of, stats, Groups};
use crate::corpus::{FieldNames, InputFile};
use crate::Scorer;

#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Number of groups; `None` chooses by silhouette.
    pub k: Option<usize>,
    /// Largest k tried when choosing.
    pub max_k: usize,
    /// Records embedded per source.
    pub per_source: usize,
    pub seed: u64,
    pub fields: FieldNames,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            k: None,
            max_k: 8,
            per_source: 64,
            seed: 1,
            fields: FieldNames::default(),
        }
    }
}

/// Sources (sorted by name), their unit-length mean embeddings `[n, dim]`, records sampled.
pub struct SourceMeans {
    pub names: Vec<String>,
    pub means: Vec<f32>,
    pub sampled: BTreeMap<String, usize>,
}

/// Per-source mean embeddings (unit length), sources sorted by name.
pub fn source_means(
    scorer: &Scorer,
    files: &[InputFile],
    opts: &GroupOptions,
) -> Result<SourceMeans> {
    let samples = sample_records(files, &opts.fields, opts.per_source, opts.seed, |r| {
        Some(source_of(r))
    })?;
    if samples.is_empty() {
        bail!("no readable records in the inputs: nothing to group");
    }
    let dim = scorer.embedding_dim();
    let mut names = Vec::new();
    let mut means = Vec::new();
    let mut counts = BTreeMap::new();
    for (source, recs) in &samples {
        let texts: Vec<&str> = recs.iter().map(|r| r.text.as_deref().unwrap()).collect();
        let emb = scorer.embed(&texts)?;
        let mut mean = vec![0f64; dim];
        for d in 0..emb.n_docs() {
            for (m, v) in mean.iter_mut().zip(emb.row(d)) {
                *m += *v as f64;
            }
        }
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        means.extend(mean.iter().map(|v| (v / norm) as f32));
        names.push(source.clone());
        counts.insert(source.clone(), recs.len());
    }
    Ok(SourceMeans {
        names,
        means,
        sampled: counts,
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Cluster sources into groups.
// Long: sample, embed, choose k and name the groups, over the same per-source tables.
pub fn group_sources(scorer: &Scorer, files: &[InputFile], opts: &GroupOptions) -> Result<Groups> {
    let SourceMeans {
        names,
        means,
        sampled,
    } = source_means(scorer, files, opts)?;
    let dim = scorer.embedding_dim();
    let n = names.len();
    let mut silhouette = BTreeMap::new();
    let assignment = match opts.k {
        Some(k) if k == 0 || k > n => {
            bail!("--k {k}: must be between 1 and the number of sources ({n})")
        }
        Some(k) => stats::kmeans(&means, dim, k, opts.seed, 8).assignment,
        None if n <= 2 => vec![0; n], // silhouette needs 2 <= k <= n - 1
        None => {
            let mut best: Option<(f64, Vec<usize>)> = None;
            for k in 2..=opts.max_k.min(n - 1) {
                let km = stats::kmeans(&means, dim, k, opts.seed, 8);
                let s = stats::silhouette(&means, dim, &km.assignment).unwrap_or(f64::NEG_INFINITY);
                silhouette.insert(k.to_string(), s);
                if best.as_ref().is_none_or(|(b, _)| s > *b) {
                    best = Some((s, km.assignment));
                }
            }
            best.map(|b| b.1).unwrap_or_else(|| vec![0; n])
        }
    };
    // Name groups g0, g1, ... in order of their first (alphabetical) source.
    let mut order: Vec<usize> = Vec::new();
    for &c in &assignment {
        if !order.contains(&c) {
            order.push(c);
        }
    }
    let name_of = |c: usize| format!("g{}", order.iter().position(|&o| o == c).unwrap());
    let mut groups = BTreeMap::new();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (s, &c) in names.iter().zip(&assignment) {
        groups.insert(s.clone(), name_of(c));
        members.entry(name_of(c)).or_default().push(s.clone());
    }
    let row = |i: usize| &means[i * dim..(i + 1) * dim];
    let mut intra = BTreeMap::new();
    let mut inter = BTreeMap::new();
    for (g, srcs) in &members {
        let idx: Vec<usize> = srcs
            .iter()
            .map(|s| names.iter().position(|n| n == s).unwrap())
            .collect();
        let mut sum = 0.0;
        let mut cnt = 0;
        for (a, &i) in idx.iter().enumerate() {
            for &j in &idx[a + 1..] {
                sum += cosine(row(i), row(j));
                cnt += 1;
            }
        }
        intra.insert(g.clone(), if cnt == 0 { 1.0 } else { sum / cnt as f64 });
        for (h, others) in members.range::<String, _>((
            std::ops::Bound::Excluded(g.clone()),
            std::ops::Bound::Unbounded,
        )) {
            let mut sum = 0.0;
            let mut cnt = 0;
            for &i in &idx {
                for o in others {
                    let j = names.iter().position(|n| n == o).unwrap();
                    sum += cosine(row(i), row(j));
                    cnt += 1;
                }
            }
            inter.insert(format!("{g}|{h}"), sum / cnt.max(1) as f64);
        }
    }
    Ok(Groups {
        k: members.len(),
        groups,
        members,
        encoder: scorer.model_dir().display().to_string(),
        silhouette,
        sampled,
        intra_similarity: intra,
        inter_similarity: inter,
    })
}

/// `groups.md`: the grouping and the similarities behind it, for a person to check.
pub fn report(groups: &Groups) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Source groups\n");
    let _ = writeln!(s, "Encoder: `{}`; k = {}.\n", groups.encoder, groups.k);
    if !groups.silhouette.is_empty() {
        let _ = writeln!(
            s,
            "k chosen by mean silhouette:\n\n| k | silhouette |\n|---|---|"
        );
        for (k, v) in &groups.silhouette {
            let _ = writeln!(s, "| {k} | {v:.3} |");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "| group | sources (records sampled) | intra-group cosine |\n|---|---|---|"
    );
    for (g, srcs) in &groups.members {
        let list: Vec<String> = srcs
            .iter()
            .map(|x| format!("{x} ({})", groups.sampled.get(x).copied().unwrap_or(0)))
            .collect();
        let _ = writeln!(
            s,
            "| {g} | {} | {:.3} |",
            list.join(", "),
            groups.intra_similarity[g]
        );
    }
    if !groups.inter_similarity.is_empty() {
        let _ = writeln!(s, "\n| groups | inter-group cosine |\n|---|---|");
        for (pair, v) in &groups.inter_similarity {
            let _ = writeln!(s, "| {pair} | {v:.3} |");
        }
    }
    s
}

/// Write `groups.json` and `groups.md` beside it.
pub fn write(groups: &Groups, path: &Path) -> Result<()> {
    crate::corpus::write_atomic(path, serde_json::to_string_pretty(groups)?.as_bytes())?;
    crate::corpus::write_atomic(&path.with_extension("md"), report(groups).as_bytes())
}

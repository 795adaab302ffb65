//! The small numerical kit of the selection method: k-means (k-means++ seeding, restarts),
//! silhouette, Spearman rank correlation, MAE, trimmed mean and ridge regression along a path
//! of penalties (one eigendecomposition, then every penalty is a diagonal rescale).

use nalgebra::{DMatrix, SymmetricEigen};

/// Deterministic 64-bit generator (splitmix64): seeds, sampling and k-means++ draws.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A stable hash of `(seed, key)`: order-independent sampling picks the smallest values.
pub fn keyed_hash(seed: u64, key: &str) -> u64 {
    // FNV-1a over the key, then one splitmix round with the seed: stable across platforms and
    // releases (unlike std's SipHash keys).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix(h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x - *y) as f64;
            d * d
        })
        .sum()
}

/// A k-means solution over row-major points `[n, dim]`.
#[derive(Debug, Clone)]
pub struct KMeans {
    pub k: usize,
    pub dim: usize,
    /// `[k, dim]`
    pub centroids: Vec<f32>,
    /// Cluster of each point.
    pub assignment: Vec<usize>,
    /// Sum of squared distances to the assigned centroids.
    pub inertia: f64,
}

impl KMeans {
    pub fn centroid(&self, c: usize) -> &[f32] {
        &self.centroids[c * self.dim..(c + 1) * self.dim]
    }
    /// Index of the point nearest each centroid (the cluster's medoid-like representative).
    pub fn nearest_points(&self, points: &[f32]) -> Vec<usize> {
        (0..self.k)
            .map(|c| {
                (0..self.assignment.len())
                    .filter(|&i| self.assignment[i] == c)
                    .min_by(|&a, &b| {
                        let da =
                            sq_dist(&points[a * self.dim..(a + 1) * self.dim], self.centroid(c));
                        let db =
                            sq_dist(&points[b * self.dim..(b + 1) * self.dim], self.centroid(c));
                        da.total_cmp(&db).then(a.cmp(&b))
                    })
                    .expect("k-means leaves no cluster empty")
            })
            .collect()
    }
}

/// Lloyd's k-means with k-means++ seeding; the best of `restarts` runs by inertia. Squared
/// Euclidean distance: on unit vectors that is 2 - 2·cosine. Needs `1 <= k <= n`; no cluster
/// is left empty (an emptied cluster takes the point farthest from its centroid).
pub fn kmeans(points: &[f32], dim: usize, k: usize, seed: u64, restarts: usize) -> KMeans {
    let n = points.len() / dim;
    assert!(
        dim > 0 && k >= 1 && k <= n,
        "kmeans needs 1 <= k ({k}) <= n ({n})"
    );
    let mut best: Option<KMeans> = None;
    for r in 0..restarts.max(1) {
        let run = kmeans_once(points, dim, k, seed.wrapping_add(r as u64 * 7919));
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    best.unwrap()
}

// Long: k-means++ seeding then Lloyd iterations over the same buffers, as the algorithm is usually
// written.
fn kmeans_once(points: &[f32], dim: usize, k: usize, seed: u64) -> KMeans {
    let n = points.len() / dim;
    let pt = |i: usize| &points[i * dim..(i + 1) * dim];
    let mut rng = SplitMix(seed);
    // k-means++: each next seed drawn with probability proportional to D(x)^2.
    let mut chosen = vec![(rng.next_u64() % n as u64) as usize];
    let mut d2: Vec<f64> = (0..n).map(|i| sq_dist(pt(i), pt(chosen[0]))).collect();
    while chosen.len() < k {
        let total: f64 = d2.iter().sum();
        let next = if total <= 0.0 {
            (0..n).find(|i| !chosen.contains(i)).unwrap()
        } else {
            let mut target = rng.next_f64() * total;
            let mut pick = n - 1;
            for (i, d) in d2.iter().enumerate() {
                if target < *d {
                    pick = i;
                    break;
                }
                target -= d;
            }
            pick
        };
        chosen.push(next);
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(sq_dist(pt(i), pt(next)));
        }
    }
    let mut centroids: Vec<f32> = chosen.iter().flat_map(|&i| pt(i).to_vec()).collect();
    let mut assignment = vec![usize::MAX; n];
    for _iter in 0..300 {
        let mut changed = false;
        for (i, slot) in assignment.iter_mut().enumerate() {
            let c = (0..k)
                .min_by(|&a, &b| {
                    sq_dist(pt(i), &centroids[a * dim..(a + 1) * dim])
                        .total_cmp(&sq_dist(pt(i), &centroids[b * dim..(b + 1) * dim]))
                })
                .unwrap();
            if *slot != c {
                *slot = c;
                changed = true;
            }
        }
        // Refill empty clusters with the point farthest from its centroid.
        for c in 0..k {
            if !assignment.contains(&c) {
                let far = (0..n)
                    .filter(|&i| assignment.iter().filter(|&&a| a == assignment[i]).count() > 1)
                    .max_by(|&a, &b| {
                        let ca = assignment[a];
                        let cb = assignment[b];
                        sq_dist(pt(a), &centroids[ca * dim..(ca + 1) * dim])
                            .total_cmp(&sq_dist(pt(b), &centroids[cb * dim..(cb + 1) * dim]))
                    })
                    .unwrap();
                assignment[far] = c;
                changed = true;
            }
        }
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &c) in assignment.iter().enumerate() {
            counts[c] += 1;
            for (s, v) in sums[c * dim..(c + 1) * dim].iter_mut().zip(pt(i)) {
                *s += *v as f64;
            }
        }
        for c in 0..k {
            for j in 0..dim {
                centroids[c * dim + j] = (sums[c * dim + j] / counts[c] as f64) as f32;
            }
        }
        if !changed {
            break;
        }
    }
    let inertia = (0..n)
        .map(|i| {
            let c = assignment[i];
            sq_dist(pt(i), &centroids[c * dim..(c + 1) * dim])
        })
        .sum();
    KMeans {
        k,
        dim,
        centroids,
        assignment,
        inertia,
    }
}

/// Mean silhouette coefficient (Euclidean distances) of a clustering; points alone in their
/// cluster count 0, as in scikit-learn. `None` unless 2 <= clusters <= n - 1.
pub fn silhouette(points: &[f32], dim: usize, assignment: &[usize]) -> Option<f64> {
    let n = assignment.len();
    let k = assignment.iter().max().map_or(0, |m| m + 1);
    if k < 2 || k > n.saturating_sub(1) {
        return None;
    }
    let pt = |i: usize| &points[i * dim..(i + 1) * dim];
    let mut total = 0.0;
    for i in 0..n {
        let mut sum = vec![0f64; k];
        let mut cnt = vec![0usize; k];
        for j in 0..n {
            if j != i {
                sum[assignment[j]] += sq_dist(pt(i), pt(j)).sqrt();
                cnt[assignment[j]] += 1;
            }
        }
        let own = assignment[i];
        if cnt[own] == 0 {
            continue; // singleton: s = 0
        }
        let a = sum[own] / cnt[own] as f64;
        let b = (0..k)
            .filter(|&c| c != own && cnt[c] > 0)
            .map(|c| sum[c] / cnt[c] as f64)
            .fold(f64::INFINITY, f64::min);
        let m = a.max(b);
        total += if m > 0.0 { (b - a) / m } else { 0.0 };
    }
    Some(total / n as f64)
}

/// Average ranks (1-based), ties sharing the mean of their positions.
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && values[idx[j + 1]] == values[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &t in &idx[i..=j] {
            out[t] = r;
        }
        i = j + 1;
    }
    out
}

/// Pearson correlation; `None` when either side is constant or there are fewer than 2 points.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len();
    if n < 2 || n != b.len() {
        return None;
    }
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return None;
    }
    Some(sab / (saa * sbb).sqrt())
}

/// Spearman rank correlation (Pearson on average ranks); `None` when a side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    pearson(&ranks(a), &ranks(b))
}

/// Mean absolute error; `None` for no points.
pub fn mae(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() {
        return None;
    }
    Some(a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64)
}

/// Mean after dropping `floor(n * trim)` values from each end (at least one value stays).
/// `trim` in [0, 0.5). `None` for no values.
pub fn trimmed_mean(values: &[f64], trim: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let cut = ((n as f64 * trim).floor() as usize).min((n - 1) / 2);
    let kept = &v[cut..n - cut];
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
}

/// Ridge regression fitted once per penalty: minimises ||Y - XW - 1b||² + λ||W||² with an
/// unpenalised intercept (centred data), for several outputs at once.
pub struct RidgePath {
    dim: usize,
    x_mean: Vec<f64>,
    y_mean: Vec<f64>,
    /// Eigenvectors of Xcᵀ Xc (`[dim, dim]`) and eigenvalues.
    vecs: DMatrix<f64>,
    vals: Vec<f64>,
    /// Vᵀ Xcᵀ Yc: `[dim, outputs]`.
    vt_xty: DMatrix<f64>,
}

impl RidgePath {
    /// `x`: row-major `[n, dim]`; `y`: row-major `[n, outputs]`.
    pub fn new(x: &[f64], y: &[f64], dim: usize, outputs: usize) -> RidgePath {
        let n = x.len() / dim;
        assert_eq!(y.len(), n * outputs);
        let mut x_mean = vec![0.0; dim];
        let mut y_mean = vec![0.0; outputs];
        for i in 0..n {
            for j in 0..dim {
                x_mean[j] += x[i * dim + j] / n as f64;
            }
            for j in 0..outputs {
                y_mean[j] += y[i * outputs + j] / n as f64;
            }
        }
        let xc = DMatrix::from_fn(n, dim, |i, j| x[i * dim + j] - x_mean[j]);
        let yc = DMatrix::from_fn(n, outputs, |i, j| y[i * outputs + j] - y_mean[j]);
        let gram = xc.transpose() * &xc;
        let eig = SymmetricEigen::new(gram);
        let vt_xty = eig.eigenvectors.transpose() * (xc.transpose() * yc);
        RidgePath {
            dim,
            x_mean,
            y_mean,
            vals: eig.eigenvalues.iter().map(|v| v.max(0.0)).collect(),
            vecs: eig.eigenvectors,
            vt_xty,
        }
    }

    /// Weights `[outputs, dim]` (row-major, one row per output) and biases for penalty `lambda`.
    pub fn solve(&self, lambda: f64) -> (Vec<f64>, Vec<f64>) {
        let outputs = self.y_mean.len();
        let mut scaled = self.vt_xty.clone();
        for (r, v) in self.vals.iter().enumerate() {
            let s = 1.0 / (v + lambda);
            for c in 0..outputs {
                scaled[(r, c)] *= s;
            }
        }
        let w = &self.vecs * scaled; // [dim, outputs]
        let mut weights = vec![0.0; outputs * self.dim];
        let mut bias = self.y_mean.clone();
        for o in 0..outputs {
            for j in 0..self.dim {
                weights[o * self.dim + j] = w[(j, o)];
                bias[o] -= w[(j, o)] * self.x_mean[j];
            }
        }
        (weights, bias)
    }
}

/// Predictions `x · Wᵀ + b` for row-major `x [n, dim]`, `w [outputs, dim]`: `[n, outputs]`.
pub fn predict(x: &[f64], dim: usize, w: &[f64], b: &[f64]) -> Vec<f64> {
    let outputs = b.len();
    let n = x.len() / dim;
    let mut out = vec![0.0; n * outputs];
    for i in 0..n {
        for o in 0..outputs {
            let row = &x[i * dim..(i + 1) * dim];
            let wr = &w[o * dim..(o + 1) * dim];
            out[i * outputs + o] = b[o] + row.iter().zip(wr).map(|(a, c)| a * c).sum::<f64>();
        }
    }
    out
}

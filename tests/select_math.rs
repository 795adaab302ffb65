//! Known-answer tests of the selection method's numerics: k-means and silhouette on
//! constructed data, ridge regression against an independent closed-form solve, Spearman and
//! trimmed mean against hand-computed values, and budget selection within one record.

use mira::select::cutoff;
use mira::select::retain::budget_keep;
use mira::select::stats::{self, kmeans, silhouette, spearman, trimmed_mean, RidgePath, SplitMix};

/// Three tight, well-separated 2-D blobs of 10 points each, interleaved in input order.
fn blobs() -> (Vec<f32>, Vec<usize>) {
    let centres = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)];
    let mut rng = SplitMix(42);
    let mut pts = Vec::new();
    let mut truth = Vec::new();
    for i in 0..30 {
        let c = i % 3;
        let dx = (rng.next_f64() as f32 - 0.5) * 0.6;
        let dy = (rng.next_f64() as f32 - 0.5) * 0.6;
        pts.extend([centres[c].0 + dx, centres[c].1 + dy]);
        truth.push(c);
    }
    (pts, truth)
}

#[test]
fn kmeans_recovers_constructed_clusters_and_their_inertia() {
    let (pts, truth) = blobs();
    let km = kmeans(&pts, 2, 3, 7, 4);
    // Same partition as the truth (up to renaming).
    for i in 0..30 {
        for j in 0..30 {
            assert_eq!(
                truth[i] == truth[j],
                km.assignment[i] == km.assignment[j],
                "points {i}, {j}"
            );
        }
    }
    // Inertia equals the within-blob sum of squares computed directly from the truth.
    let mut expect = 0.0f64;
    for c in 0..3 {
        let members: Vec<usize> = (0..30).filter(|&i| truth[i] == c).collect();
        let mx = members.iter().map(|&i| pts[2 * i] as f64).sum::<f64>() / members.len() as f64;
        let my = members.iter().map(|&i| pts[2 * i + 1] as f64).sum::<f64>() / members.len() as f64;
        expect += members
            .iter()
            .map(|&i| (pts[2 * i] as f64 - mx).powi(2) + (pts[2 * i + 1] as f64 - my).powi(2))
            .sum::<f64>();
    }
    assert!(
        (km.inertia - expect).abs() < 1e-4 * expect.max(1.0),
        "{} vs {expect}",
        km.inertia
    );
    // The representative of each cluster is one of its members.
    for (c, &p) in km.nearest_points(&pts).iter().enumerate() {
        assert_eq!(km.assignment[p], c);
    }
}

#[test]
fn silhouette_matches_hand_computation_and_picks_the_true_k() {
    // 1-D points 0, 1 | 10, 11. Point 0: a = 1, b = (10 + 11) / 2 = 10.5 -> 9.5 / 10.5;
    // point 1: a = 1, b = 9.5 -> 8.5 / 9.5; points 10 and 11 mirror them.
    let pts = [0.0f32, 1.0, 10.0, 11.0];
    let s = silhouette(&pts, 1, &[0, 0, 1, 1]).unwrap();
    let expect = (9.5 / 10.5 + 8.5 / 9.5) / 2.0;
    assert!((s - expect).abs() < 1e-9, "{s} vs {expect}");
    // Undefined for one cluster or for as many clusters as points.
    assert!(silhouette(&pts, 1, &[0, 0, 0, 0]).is_none());
    assert!(silhouette(&pts, 1, &[0, 1, 2, 3]).is_none());
    // Choosing k by silhouette on the blobs finds 3.
    let (pts, _) = blobs();
    let best = (2..=6)
        .max_by(|&a, &b| {
            let sa = silhouette(&pts, 2, &kmeans(&pts, 2, a, 1, 4).assignment).unwrap();
            let sb = silhouette(&pts, 2, &kmeans(&pts, 2, b, 1, 4).assignment).unwrap();
            sa.total_cmp(&sb)
        })
        .unwrap();
    assert_eq!(best, 3);
}

#[test]
fn spearman_matches_hand_computed_values() {
    // b's ranks with ties: [1, 2, 3.5, 5, 3.5]; deviations from 3: a [-2,-1,0,1,2],
    // b [-2,-1,0.5,2,0.5]; cov 8, var 10 and 9.5 -> 8 / sqrt(95).
    let a = [1.0, 2.0, 3.0, 4.0, 5.0];
    let b = [5.0, 6.0, 7.0, 8.0, 7.0];
    let r = spearman(&a, &b).unwrap();
    assert!((r - 8.0 / 95f64.sqrt()).abs() < 1e-12, "{r}");
    assert_eq!(stats::ranks(&b), vec![1.0, 2.0, 3.5, 5.0, 3.5]);
    // Monotone transforms do not matter; reversal gives -1; a constant side is undefined.
    let c: Vec<f64> = a.iter().map(|v: &f64| v.powi(3) + 100.0).collect();
    assert!((spearman(&a, &c).unwrap() - 1.0).abs() < 1e-12);
    let d: Vec<f64> = a.iter().rev().cloned().collect();
    assert!((spearman(&a, &d).unwrap() + 1.0).abs() < 1e-12);
    assert!(spearman(&a, &[3.0; 5]).is_none());
    assert_eq!(
        stats::mae(&[1.0, 2.0, 4.0], &[2.0, 2.0, 1.0]),
        Some(4.0 / 3.0)
    );
}

#[test]
fn trimmed_mean_matches_hand_computed_values() {
    let v = [4.0, 100.0, 1.0, 3.0, 2.0];
    // 20% of 5 = 1 from each end: mean(2, 3, 4) = 3.
    assert_eq!(trimmed_mean(&v, 0.2), Some(3.0));
    // 10% of 5 floors to 0: the plain mean 22.
    assert_eq!(trimmed_mean(&v, 0.1), Some(22.0));
    // 40% of 5 = 2 from each end: the median.
    assert_eq!(trimmed_mean(&v, 0.4), Some(3.0));
    // Never trims everything: 2 values at 49% keep both.
    assert_eq!(trimmed_mean(&[1.0, 2.0], 0.49), Some(1.5));
    assert_eq!(trimmed_mean(&[], 0.1), None);
}

/// Solve A x = b by Gaussian elimination with partial pivoting (an independent path).
#[allow(clippy::needless_range_loop)] // textbook elimination reads best with indices
fn gauss_solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..n {
            let f = a[r][col] / a[col][col];
            for c in col..n {
                a[r][c] -= f * a[col][c];
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x
}

#[test]
fn ridge_matches_the_closed_form_solution() {
    // Hand case: x = [1,2,3], y = [2,4,6]. Centred: x [-1,0,1], y [-2,0,2];
    // w = Σxy / (Σx² + λ) = 4 / (2 + λ); λ = 2 -> w = 1, b = ȳ - w·x̄ = 4 - 2 = 2.
    let path = RidgePath::new(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0], 1, 1);
    let (w, b) = path.solve(2.0);
    assert!(
        (w[0] - 1.0).abs() < 1e-12 && (b[0] - 2.0).abs() < 1e-12,
        "{w:?} {b:?}"
    );

    // Random case, 2 outputs: against (XcᵀXc + λI) w = Xcᵀ yc solved by elimination.
    let (n, d, o) = (40, 6, 2);
    let mut rng = SplitMix(9);
    let x: Vec<f64> = (0..n * d).map(|_| rng.next_f64() * 4.0 - 2.0).collect();
    let y: Vec<f64> = (0..n * o).map(|_| rng.next_f64() * 10.0).collect();
    let path = RidgePath::new(&x, &y, d, o);
    for lambda in [1e-3, 0.5, 30.0] {
        let (w, b) = path.solve(lambda);
        let xm: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64)
            .collect();
        for out in 0..o {
            let ym = (0..n).map(|i| y[i * o + out]).sum::<f64>() / n as f64;
            let mut a = vec![vec![0.0; d]; d];
            let mut rhs = vec![0.0; d];
            for i in 0..n {
                for p in 0..d {
                    for q in 0..d {
                        a[p][q] += (x[i * d + p] - xm[p]) * (x[i * d + q] - xm[q]);
                    }
                    rhs[p] += (x[i * d + p] - xm[p]) * (y[i * o + out] - ym);
                }
            }
            for (p, row) in a.iter_mut().enumerate() {
                row[p] += lambda;
            }
            let expect = gauss_solve(a, rhs);
            let bias = ym - expect.iter().zip(&xm).map(|(w, m)| w * m).sum::<f64>();
            for p in 0..d {
                assert!(
                    (w[out * d + p] - expect[p]).abs() < 1e-9,
                    "λ={lambda} out {out} w[{p}]"
                );
            }
            assert!((b[out] - bias).abs() < 1e-9, "λ={lambda} bias {out}");
        }
    }
}

#[test]
fn budget_keeps_the_requested_share_within_one_record() {
    let mut rng = SplitMix(5);
    for trial in 0..50 {
        let n = 1 + (rng.next_u64() % 200) as usize;
        let scores: Vec<f64> = (0..n).map(|_| (rng.next_u64() % 20) as f64 / 2.0).collect();
        let tokens: Vec<u64> = (0..n).map(|_| 1 + rng.next_u64() % 900).collect();
        let budget = [0.1, 0.25, 0.5, 0.9, 1.0][trial % 5];
        let (keep, cutoff) = budget_keep(&scores, &tokens, budget);
        let total: u64 = tokens.iter().sum();
        let kept: u64 = tokens
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| t)
            .sum();
        let max_record = *tokens.iter().max().unwrap();
        let target = budget * total as f64;
        assert!(
            kept as f64 >= target,
            "trial {trial}: kept {kept} < target {target}"
        );
        assert!(
            (kept as f64) < target + max_record as f64,
            "trial {trial}: overshoot beyond one record"
        );
        // Every kept record scores at least the cutoff, every dropped one at most.
        let c = cutoff.unwrap();
        for i in 0..n {
            if keep[i] {
                assert!(scores[i] >= c);
            } else {
                assert!(scores[i] <= c);
            }
        }
    }
    // Ties break by input order.
    let (keep, _) = budget_keep(&[1.0, 1.0, 1.0, 1.0], &[10, 10, 10, 10], 0.5);
    assert_eq!(keep, vec![true, true, false, false]);
}

/// Entries of `n_buckets` buckets over `files` files, with scores from `distinct` values (so
/// ties abound, some spanning files), zero-token records among them, and negative scores.
fn cutoff_entries(rng: &mut SplitMix, n_buckets: usize, distinct: u64) -> Vec<cutoff::Entry> {
    let files = 1 + rng.next_u64() % 6;
    let mut out = Vec::new();
    for f in 0..files {
        for i in 0..rng.next_u64() % 120 {
            let tokens = if rng.next_u64().is_multiple_of(7) {
                0
            } else {
                1 + rng.next_u64() % 500
            };
            out.push(cutoff::Entry {
                bucket: (rng.next_u64() % n_buckets as u64) as usize,
                score: (rng.next_u64() % distinct) as f64 * 0.37 - 2.0,
                tokens,
                pos: (f as u32, i),
            });
        }
    }
    out
}

#[test]
fn bounded_memory_cutoffs_keep_exactly_what_the_in_memory_sort_keeps() {
    let mut rng = SplitMix(11);
    for trial in 0..300 {
        let n_buckets = 1 + trial % 4;
        let distinct = [1, 2, 5, 40, 1 << 40][trial % 5];
        let entries = cutoff_entries(&mut rng, n_buckets, distinct);
        let budget = [0.05, 0.3, 0.5, 0.77, 1.0][(trial / 5) % 5];
        // Tiny limits force every mode: histogram refinement, the single-score walk, collect.
        let limits = cutoff::Limits {
            bins: 2 + trial % 5,
            collect: [1, 3, 17, 1000][trial % 4],
        };
        let mut passes = 0;
        let mut scan = |f: &mut dyn FnMut(cutoff::Entry)| -> anyhow::Result<()> {
            passes += 1;
            entries.iter().for_each(|e| f(*e));
            Ok(())
        };
        let mut stats = cutoff::bucket_stats(&mut scan).unwrap();
        stats.resize(n_buckets, Default::default());
        let cuts = cutoff::find_cuts(&stats, budget, limits, &mut scan).unwrap();
        for (b, cut) in cuts.iter().enumerate() {
            let members: Vec<&cutoff::Entry> = entries.iter().filter(|e| e.bucket == b).collect();
            let scores: Vec<f64> = members.iter().map(|e| e.score).collect();
            let tokens: Vec<u64> = members.iter().map(|e| e.tokens).collect();
            let (keep, lowest) = budget_keep(&scores, &tokens, budget);
            assert_eq!(cut.map(|c| c.score), lowest, "trial {trial} bucket {b}");
            for (e, k) in members.iter().zip(&keep) {
                let kept = cut.is_some_and(|c| c.keeps(e.score, e.pos));
                assert_eq!(kept, *k, "trial {trial} bucket {b} entry {e:?}");
            }
            if let Some(c) = cut {
                let tied = scores.iter().filter(|s| **s == c.score).count() as u64;
                assert_eq!(c.tied_kept + c.tied_dropped, tied, "trial {trial}");
            }
        }
        assert!(passes >= 1, "trial {trial}");
    }
}

#[test]
fn score_keys_order_as_total_cmp() {
    let xs = [
        -f64::INFINITY,
        -3.5,
        -0.0,
        0.0,
        1e-300,
        2.0,
        9.75,
        f64::INFINITY,
    ];
    for w in xs.windows(2) {
        assert!(cutoff::key(w[0]) < cutoff::key(w[1]), "{} < {}", w[0], w[1]);
    }
}

//! Exact token-budget cutoffs in memory bounded independently of the corpus size.
//!
//! The rule is `budget_keep`'s: in each bucket, records ranked by score (highest first, ties in
//! input order) are kept while the tokens kept so far are below `budget` of the bucket's tokens.
//! The kept records are therefore a prefix of that order, ending at one record `r*` (the last
//! whose preceding tokens are below the target); every record is kept iff its score is above
//! `r*`'s, or equal to it and not after `r*` in input order. This module finds `r*` per bucket
//! without holding the scores:
//!
//! 1. one pass counts each bucket's records and tokens and its lowest and highest score;
//! 2. each further pass histograms the scores still in question (a key range per bucket) and
//!    narrows the range to the one bin that holds `r*`, knowing the tokens above it;
//! 3. once a bucket's range holds at most `collect` records, one pass collects them and sorts
//!    them exactly; if instead the range shrinks to a single score shared by more records (a
//!    huge tie), one pass walks those records in input order.
//!
//! A pass is a call of `scan`, which must deliver every entry in input order (file, then record)
//! each time. Memory: `bins` histogram cells per unresolved bucket and at most `collect`
//! collected entries in all.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One scored record, as the cutoff sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub bucket: usize,
    pub score: f64,
    pub tokens: u64,
    /// Position in input order: (file index in the whole corpus, record index in the file).
    pub pos: (u32, u64),
}

/// Where one bucket's kept records end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketCut {
    /// The lowest kept score.
    pub score: f64,
    /// The last kept record among those scoring exactly `score`, in input order.
    pub last_kept: (u32, u64),
    /// Records scoring exactly `score`: kept, and dropped (input order decided between them).
    pub tied_kept: u64,
    pub tied_dropped: u64,
}

impl BucketCut {
    /// Whether a record of this bucket is kept.
    pub fn keeps(&self, score: f64, pos: (u32, u64)) -> bool {
        match key(score).cmp(&key(self.score)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => pos <= self.last_kept,
            std::cmp::Ordering::Less => false,
        }
    }
}

/// Per bucket: records, tokens, lowest and highest score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BucketStats {
    pub records: u64,
    pub tokens: u64,
    pub min: f64,
    pub max: f64,
}

/// How much memory the search may use: histogram cells per unresolved bucket, and entries
/// collected for the exact sort (all buckets together).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub bins: usize,
    pub collect: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 4,096 cells of 32 bytes (128 KiB) per bucket; 4M entries of 24 bytes (96 MiB).
        Limits {
            bins: 4096,
            collect: 4 << 20,
        }
    }
}

/// The order `f64::total_cmp` defines, as an unsigned integer.
pub fn key(score: f64) -> u64 {
    let bits = score.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn unkey(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// What is still to be found in one bucket.
#[derive(Debug, Clone)]
enum State {
    Resolved(Option<BucketCut>),
    /// `r*` scores within keys `lo..=hi`, which hold `count` records; `above` tokens score higher.
    Range {
        lo: u64,
        hi: u64,
        above: u64,
        count: u64,
    },
}

/// What one pass does for one bucket.
enum Work {
    Skip,
    Histogram {
        lo: u64,
        range: u128,
        cells: Vec<Cell>,
    },
    Collect {
        lo: u64,
        hi: u64,
        entries: Vec<(u64, (u32, u64), u64)>,
    },
    Walk {
        key: u64,
        target: f64,
        /// Tokens ranked before the next record of the walk.
        preceding: u64,
        last: Option<(u32, u64)>,
        kept: u64,
        dropped: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    count: u64,
    tokens: u64,
    min: u64,
    max: u64,
}

/// A pass over every entry, in input order.
pub type Scan<'a> = dyn FnMut(&mut dyn FnMut(Entry)) -> Result<()> + 'a;

/// Stats of each bucket, indexed by `Entry::bucket` (one pass; buckets never seen are empty).
pub fn bucket_stats(scan: &mut Scan) -> Result<Vec<BucketStats>> {
    let mut stats: Vec<BucketStats> = Vec::new();
    scan(&mut |e: Entry| {
        if e.bucket >= stats.len() {
            stats.resize(e.bucket + 1, BucketStats::default());
        }
        let s = &mut stats[e.bucket];
        if s.records == 0 || key(e.score) < key(s.min) {
            s.min = e.score;
        }
        if s.records == 0 || key(e.score) > key(s.max) {
            s.max = e.score;
        }
        s.records += 1;
        s.tokens += e.tokens;
    })?;
    Ok(stats)
}

/// The cut of every bucket for `budget` (a share of tokens in (0, 1]), given the buckets'
/// stats: as many passes of `scan` as the scores need (typically two or three).
pub fn find_cuts(
    stats: &[BucketStats],
    budget: f64,
    limits: Limits,
    scan: &mut Scan,
) -> Result<Vec<Option<BucketCut>>> {
    if limits.bins < 2 || limits.collect < 1 {
        bail!("cutoff search limits need at least 2 bins and 1 collected entry");
    }
    let target = |b: usize| budget * stats[b].tokens as f64;
    let mut states: Vec<State> = stats
        .iter()
        .enumerate()
        .map(|(b, s)| {
            if s.records == 0 || 0.0 >= target(b) {
                State::Resolved(None)
            } else {
                State::Range {
                    lo: key(s.min),
                    hi: key(s.max),
                    above: 0,
                    count: s.records,
                }
            }
        })
        .collect();
    while states.iter().any(|s| matches!(s, State::Range { .. })) {
        let mut work = plan_pass(&states, limits, &target);
        scan(&mut |e: Entry| observe(&mut work[e.bucket], e))?;
        for (b, w) in work.into_iter().enumerate() {
            let State::Range { above, .. } = states[b] else {
                continue;
            };
            states[b] = settle(w, above, target(b));
        }
    }
    Ok(states
        .into_iter()
        .map(|s| match s {
            State::Resolved(c) => c,
            State::Range { .. } => unreachable!("the loop resolves every bucket"),
        })
        .collect())
}

/// This pass's work per bucket: collect the smallest ranges while the collect budget lasts, walk
/// single-score ranges, histogram the rest.
fn plan_pass(states: &[State], limits: Limits, target: &dyn Fn(usize) -> f64) -> Vec<Work> {
    let mut budget = limits.collect as u64;
    let mut order: Vec<usize> = (0..states.len()).collect();
    order.sort_by_key(|&b| match states[b] {
        State::Range { count, .. } => count,
        State::Resolved(_) => u64::MAX,
    });
    let mut work: Vec<Work> = states.iter().map(|_| Work::Skip).collect();
    for b in order {
        let State::Range {
            lo,
            hi,
            above,
            count,
        } = states[b]
        else {
            continue;
        };
        work[b] = if count <= budget {
            budget -= count;
            Work::Collect {
                lo,
                hi,
                entries: Vec::with_capacity(count as usize),
            }
        } else if lo == hi {
            Work::Walk {
                key: lo,
                target: target(b),
                preceding: above,
                last: None,
                kept: 0,
                dropped: 0,
            }
        } else {
            let range = (hi - lo) as u128 + 1;
            let bins = (limits.bins as u128).min(range) as usize;
            Work::Histogram {
                lo,
                range,
                cells: vec![
                    Cell {
                        count: 0,
                        tokens: 0,
                        min: u64::MAX,
                        max: 0,
                    };
                    bins
                ],
            }
        };
    }
    work
}

fn observe(w: &mut Work, e: Entry) {
    let k = key(e.score);
    match w {
        Work::Skip => {}
        Work::Histogram { lo, range, cells } => {
            if k < *lo || (k - *lo) as u128 >= *range {
                return;
            }
            let bin = ((k - *lo) as u128 * cells.len() as u128 / *range) as usize;
            let c = &mut cells[bin];
            c.count += 1;
            c.tokens += e.tokens;
            c.min = c.min.min(k);
            c.max = c.max.max(k);
        }
        Work::Collect { lo, hi, entries } => {
            if (*lo..=*hi).contains(&k) {
                entries.push((k, e.pos, e.tokens));
            }
        }
        Work::Walk {
            key,
            target,
            preceding,
            last,
            kept,
            dropped,
        } => {
            if k != *key {
                return;
            }
            if (*preceding as f64) < *target {
                *last = Some(e.pos);
                *preceding += e.tokens;
                *kept += 1;
            } else {
                *dropped += 1;
            }
        }
    }
}

/// The bucket's state after a pass.
fn settle(w: Work, above: u64, target: f64) -> State {
    match w {
        Work::Skip => unreachable!("a bucket in range always has work"),
        Work::Histogram { cells, .. } => {
            // Walk the cells from the highest score down: `r*` is in the lowest non-empty cell
            // whose preceding tokens are below the target.
            let mut preceding = above;
            let mut found = None;
            for c in cells.iter().rev() {
                if c.count == 0 {
                    continue;
                }
                if (preceding as f64) < target {
                    found = Some((c, preceding));
                }
                preceding += c.tokens;
            }
            match found {
                Some((c, above)) => State::Range {
                    lo: c.min,
                    hi: c.max,
                    above,
                    count: c.count,
                },
                None => State::Resolved(None),
            }
        }
        Work::Collect { mut entries, .. } => {
            entries.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut preceding = above;
            let mut last = None;
            for &(k, pos, tokens) in &entries {
                if (preceding as f64) >= target {
                    break;
                }
                last = Some((k, pos));
                preceding += tokens;
            }
            State::Resolved(last.map(|(k, pos)| {
                let tied = entries.iter().filter(|e| e.0 == k);
                let tied_kept = tied.clone().filter(|e| e.1 <= pos).count() as u64;
                BucketCut {
                    score: unkey(k),
                    last_kept: pos,
                    tied_kept,
                    tied_dropped: tied.count() as u64 - tied_kept,
                }
            }))
        }
        Work::Walk {
            key,
            last,
            kept,
            dropped,
            ..
        } => State::Resolved(last.map(|pos| BucketCut {
            score: unkey(key),
            last_kept: pos,
            tied_kept: kept,
            tied_dropped: dropped,
        })),
    }
}

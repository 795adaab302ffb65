//! The cutoff pass's search at scale, without the files: N synthetic (score, tokens) records in
//! B buckets, regenerated identically on every pass (as the score files would be re-read), then
//! `bucket_stats` + `find_cuts` with the default limits. Prints wall time, passes and peak RSS.
//!
//! `cargo run --release --example cutoff_scale -- 100000000 16`

use std::time::Instant;

use mira::select::cutoff::{self, Entry};
use mira::select::stats::SplitMix;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(Ok(100_000_000), |s| s.parse())?;
    let buckets: u64 = args.get(2).map_or(Ok(16), |s| s.parse())?;
    // 1,000 files in corpus order.
    let per_file = n.div_ceil(1000).max(1);
    let start = Instant::now();
    let mut passes = 0;
    let mut scan = |each: &mut dyn FnMut(Entry)| -> anyhow::Result<()> {
        passes += 1;
        let mut rng = SplitMix(7);
        for i in 0..n {
            // Scores as a student's trimmed means give them: 0-10, f32 outputs averaged.
            let score = ((rng.next_f64() * 10.0) as f32 as f64 * 3.0 + rng.next_f64()) / 4.0;
            each(Entry {
                bucket: (rng.next_u64() % buckets) as usize,
                score,
                tokens: 50 + rng.next_u64() % 2000,
                pos: ((i / per_file) as u32, i % per_file),
            });
        }
        Ok(())
    };
    let stats = cutoff::bucket_stats(&mut scan)?;
    let cuts = cutoff::find_cuts(&stats, 0.5, cutoff::Limits::default(), &mut scan)?;
    let secs = start.elapsed().as_secs_f64();
    let resolved = cuts.iter().filter(|c| c.is_some()).count();
    println!(
        "{n} records, {buckets} buckets: {passes} passes in {secs:.1}s ({:.1}M records/s per pass), peak RSS {:.0} MiB, {resolved} cutoffs",
        n as f64 * passes as f64 / secs / 1e6,
        peak_rss_mib()
    );
    Ok(())
}

//! The cutoff pass's search at scale, without the files: N synthetic (score, tokens) records in
//! B buckets, regenerated identically on every pass (as the score files would be re-read), then
//! `bucket_stats` + `find_cuts` with the default limits. Prints wall time, passes and peak RSS.
//!
//! `cargo run --release --example cutoff_scale -- 100000000 16`
//!
//! With `--write DIR`, it writes the same records as the score files of a finished score pass
//! instead (`DIR/out/scores/`, with done markers, over 1,000 empty inputs in `DIR/in/`, one group
//! per bucket), for timing `mira select --pass cutoff` on the files; it prints that command.

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

/// One pass over the synthetic records, handing each to the callback.
type Scan<'a> = dyn FnMut(&mut dyn FnMut(Entry)) -> anyhow::Result<()> + 'a;

/// The score files of a finished score pass over `per_file`-record inputs, as `scan` generates.
fn write_score_files(
    dir: &std::path::Path,
    n: u64,
    buckets: u64,
    per_file: u64,
    scan: &mut Scan,
) -> anyhow::Result<()> {
    use mira::select::reduce::{scores_path, scores_root};
    use mira::select::selection::ScoreRow;
    use std::io::Write;
    let input = dir.join("in");
    std::fs::create_dir_all(&input)?;
    let files = n.div_ceil(per_file);
    for i in 0..files {
        std::fs::write(input.join(format!("part{i:04}.jsonl")), b"")?;
    }
    let inputs = mira::corpus::expand_inputs(&[input])?;
    let out = dir.join("out");
    std::fs::create_dir_all(scores_root(&out))?;
    let mut file: Option<(u32, std::io::BufWriter<std::fs::File>)> = None;
    let finish = |file: Option<(u32, std::io::BufWriter<std::fs::File>)>| -> anyhow::Result<()> {
        if let Some((fi, mut w)) = file {
            w.flush()?;
            let path = scores_path(&out, &inputs[fi as usize]);
            mira::corpus::mark_done(&scores_root(&out), &path, b"{}")?;
        }
        Ok(())
    };
    let mut failed = None;
    scan(&mut |e: Entry| {
        if failed.is_some() {
            return;
        }
        let mut step = || -> anyhow::Result<()> {
            if file.as_ref().map(|f| f.0) != Some(e.pos.0) {
                finish(file.take())?;
                let path = scores_path(&out, &inputs[e.pos.0 as usize]);
                file = Some((
                    e.pos.0,
                    std::io::BufWriter::new(std::fs::File::create(path)?),
                ));
            }
            let row = ScoreRow {
                id: format!("r{}-{}", e.pos.0, e.pos.1),
                source: format!("s{}", e.bucket),
                group: Some(format!("g{}", e.bucket)),
                tokens: e.tokens,
                score: Some(e.score),
                error: None,
            };
            let w = &mut file.as_mut().expect("opened above").1;
            serde_json::to_writer(&mut *w, &row)?;
            w.write_all(b"\n")?;
            Ok(())
        };
        if let Err(err) = step() {
            failed = Some(err);
        }
    })?;
    if let Some(err) = failed {
        return Err(err);
    }
    finish(file.take())?;
    let sources: Vec<String> = (0..buckets).map(|b| format!("\"s{b}\":\"g{b}\"")).collect();
    let members: Vec<String> = (0..buckets)
        .map(|b| format!("\"g{b}\":[\"s{b}\"]"))
        .collect();
    std::fs::write(
        dir.join("groups.json"),
        format!(
            "{{\"groups\":{{{}}},\"members\":{{{}}}}}",
            sources.join(","),
            members.join(",")
        ),
    )?;
    std::fs::write(
        dir.join("reliability.json"),
        r#"{"thresholds":{"max_mae":2.0,"min_spearman":0.3,"min_count":5},"cells":[],"unmasked":{}}"#,
    )?;
    let d = dir.display();
    println!("wrote {n} score rows in {files} files; time the cutoff pass with:");
    println!("/usr/bin/time -v mira select --pass cutoff --input {d}/in --output-dir {d}/out --groups {d}/groups.json --reliability {d}/reliability.json --students {d}/none");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let write_to = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let args: Vec<String> = args.into_iter().take_while(|a| a != "--write").collect();
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
    if let Some(dir) = write_to {
        return write_score_files(&dir, n, buckets, per_file, &mut scan);
    }
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

//! The selection report: `report.md` with per-group and per-source tables, one SVG histogram
//! per group (all records vs kept, with the cutoff), and `selection.json` with every number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::selection::{ScoreHistogram, Selection, Tally, HIST_BINS};
use crate::corpus::write_once;

/// A histogram of a group's scores with the kept ones overlaid and the cutoff marked, as SVG.
// Long: one SVG document written element by element; split, its coordinates would travel between
// functions.
pub fn histogram_svg(title: &str, hist: &ScoreHistogram, cutoff: Option<f64>) -> String {
    const W: f64 = 640.0;
    const H: f64 = 320.0;
    const L: f64 = 56.0; // left margin
    const B: f64 = 40.0; // bottom margin
    const T: f64 = 36.0; // top margin
    const BINS: usize = HIST_BINS;
    let (lo, hi) = (hist.lo, hist.hi);
    let (h_all, h_kept) = (&hist.all, &hist.kept);
    let max = (*h_all.iter().max().unwrap()).max(1) as f64;
    let pw = W - L - 16.0;
    let ph = H - T - B;
    let x = |v: f64| L + (v - lo) / (hi - lo) * pw;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let bw = pw / BINS as f64;
    for (i, (&a, &k)) in h_all.iter().zip(h_kept).enumerate() {
        let bx = L + i as f64 * bw;
        let ha = a as f64 / max * ph;
        let hk = k as f64 / max * ph;
        let _ = writeln!(
            s,
            r##"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{ha:.1}" fill="#c8c8c8"/>"##,
            T + ph - ha,
            bw - 1.0
        );
        if k > 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{hk:.1}" fill="#3b6fb6"/>"##,
                T + ph - hk,
                bw - 1.0
            );
        }
    }
    // Axes and ticks.
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        T + ph,
        L + pw,
        T + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="black"/>"#,
        T + ph
    );
    for t in 0..=5 {
        let v = lo + (hi - lo) * t as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            T + ph + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="{:.1}" text-anchor="end" dx="-4">{}</text>"#,
        T + 4.0,
        max as usize
    );
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="{:.1}" text-anchor="end" dx="-4">0</text>"#,
        T + ph
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">score (trimmed mean of unmasked anchors)</text>"#,
        L + pw / 2.0,
        H - 6.0
    );
    if let Some(c) = cutoff {
        let cx = x(c.clamp(lo, hi));
        let _ = writeln!(
            s,
            r##"<line x1="{cx:.1}" y1="{T}" x2="{cx:.1}" y2="{:.1}" stroke="#d0342c" stroke-dasharray="4 3" stroke-width="2"/>"##,
            T + ph
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#d0342c">cutoff {c:.3}</text>"##,
            cx + 4.0,
            T + 12.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="8" width="10" height="10" fill="#c8c8c8"/><text x="{:.1}" y="17">all ({})</text>"##,
        W - 200.0,
        W - 186.0,
        h_all.iter().sum::<u64>()
    );
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="8" width="10" height="10" fill="#3b6fb6"/><text x="{:.1}" y="17">kept ({})</text>"##,
        W - 110.0,
        W - 96.0,
        h_kept.iter().sum::<u64>()
    );
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn pct(a: u64, b: u64) -> String {
    if b == 0 {
        "–".into()
    } else {
        format!("{:.1}%", 100.0 * a as f64 / b as f64)
    }
}

fn table(s: &mut String, title: &str, rows: &BTreeMap<String, Tally>) {
    let _ = writeln!(s, "| {title} | records | kept | tokens | tokens kept | share kept | lowest kept score |\n|---|---|---|---|---|---|---|");
    for (k, t) in rows {
        let _ = writeln!(
            s,
            "| {k} | {} | {} | {} | {} | {} | {} |",
            t.records,
            t.records_kept,
            t.tokens,
            t.tokens_kept,
            pct(t.tokens_kept, t.tokens),
            t.threshold.map_or("–".into(), |v| format!("{v:.3}"))
        );
    }
    s.push('\n');
}

/// File name of a bucket's histogram.
fn svg_name(bucket: &str) -> String {
    let safe: String = bucket
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("hist_{safe}.svg")
}

/// Write `report.md`, `report/hist_<group>.svg` and `selection.json` under `out`.
// Long: report.md written section by section, in the order it reads.
pub fn write(out: &Path, sel: &Selection, hists: &BTreeMap<String, ScoreHistogram>) -> Result<()> {
    let dir = out.join("report");
    std::fs::create_dir_all(&dir)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Selection report\n\nBudget {:.0}% of tokens, cutoff per {}, anchors averaged with a {:.0}% trimmed mean.\n",
        sel.budget * 100.0,
        sel.cutoff,
        sel.trim * 100.0
    );
    let t = &sel.total;
    let _ = writeln!(
        s,
        "Kept {} of {} records and {} of {} tokens ({}).\n",
        t.records_kept,
        t.records,
        t.tokens_kept,
        t.tokens,
        pct(t.tokens_kept, t.tokens)
    );
    if !sel.thresholds.is_empty() {
        let _ = writeln!(
            s,
            "Cutoffs: {}.\n",
            sel.thresholds
                .iter()
                .map(|(k, v)| format!("{k} ≥ {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(s, "## Groups\n");
    table(&mut s, "group", &sel.groups);
    let _ = writeln!(s, "## Sources\n");
    table(&mut s, "source", &sel.sources);
    if !sel.errors.is_empty() {
        let _ = writeln!(
            s,
            "## Records not scored (not kept)\n\n| source | records |\n|---|---|"
        );
        for (k, n) in &sel.errors {
            let _ = writeln!(s, "| {k} | {n} |");
        }
        s.push('\n');
    }
    if !sel.anchors.is_empty() {
        let _ = writeln!(
            s,
            "## Anchors\n\nA record's score is the trimmed mean of its source's unmasked anchors.\n\n\
             | group | anchor | used for | masked for |\n|---|---|---|---|"
        );
        for (g, anchors) in &sel.anchors {
            for a in anchors {
                let _ = writeln!(
                    s,
                    "| {g} | {} | {} | {} |",
                    a.anchor.replace('|', "\\|"),
                    a.used_for.join(", ").replace('|', "\\|"),
                    a.masked_for.join(", ").replace('|', "\\|")
                );
            }
        }
        s.push('\n');
    }
    if !sel.warnings.is_empty() {
        let _ = writeln!(s, "## Warnings\n");
        for w in &sel.warnings {
            let _ = writeln!(s, "- {w}");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Score histograms\n");
    for (g, hist) in hists {
        let cutoff = sel
            .thresholds
            .get(g)
            .copied()
            .or(sel.groups.get(g).and_then(|t| t.threshold));
        let name = svg_name(g);
        write_once(
            &dir.join(&name),
            histogram_svg(&format!("group {g}"), hist, cutoff).as_bytes(),
        )?;
        let _ = writeln!(s, "![group {g}](report/{name})\n");
    }
    write_once(&out.join("report.md"), s.as_bytes())?;
    write_once(
        &out.join("selection.json"),
        serde_json::to_string_pretty(sel)?.as_bytes(),
    )
}

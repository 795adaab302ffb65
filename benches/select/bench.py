#!/usr/bin/env python3
"""mira select at scale, measured (issue #22): the score pass's throughput against `mira score`
with the same student on the same corpus, and peak RSS of the score pass with 1, 4 and 16 groups
(students sharing one encoder, as `mira distill` writes them).

Needs a finished `mira run configs/sample-run.toml` (its students, groups.json,
reliability.json). The corpus is the sample corpus copied --copies times, each copy's sources
renamed `<source>#<k>` so that there are enough sources for 16 groups. Every run is repeated
--repeat times, alternating the tools; the best of each is reported, with the ratio.

    python3 benches/select/bench.py --mira target/release/mira --copies 8 --repeat 3
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_timed(cmd):
    """Wall seconds and peak RSS (MiB) of one command, through GNU time."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return secs, rss / 1024.0, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mira", default=str(REPO / "target/release/mira"))
    ap.add_argument("--run-dir", default=str(REPO / ".data/sample-run"))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    run = Path(a.run_dir)
    tmp = Path(tempfile.mkdtemp(prefix="mira-select-bench-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    records = [json.loads(l) for l in open(REPO / ".data/sample/corpus.jsonl")]
    sources = sorted({r["source"] for r in records})
    for k in range(a.copies):
        with open(corpus / f"part{k:02}.jsonl", "w") as f:
            for r in records:
                r = dict(r, id=f"{r['id']}#{k}", source=f"{r['source']}#{k % 4}")
                f.write(json.dumps(r) + "\n")
    all_sources = [f"{s}#{k}" for s in sources for k in range(min(4, a.copies))]
    groups = json.load(open(run / "groups.json"))
    first_group = sorted(groups["members"])[0]
    student = run / "students" / first_group
    rel = json.load(open(run / "reliability.json"))
    rel_path = tmp / "reliability.json"
    json.dump({"thresholds": rel["thresholds"], "cells": [], "unmasked": {}}, open(rel_path, "w"))

    def setup(n_groups):
        d = tmp / f"g{n_groups}"
        if d.exists():
            return d
        (d / "students").mkdir(parents=True)
        members = {f"g{i:02}": [] for i in range(n_groups)}
        mapping = {}
        for i, s in enumerate(all_sources):
            g = f"g{i % n_groups:02}"
            members[g].append(s)
            mapping[s] = g
        for g in members:
            shutil.copytree(student, d / "students" / g)
        doc = dict(groups, groups=mapping, members=members, k=n_groups)
        json.dump(doc, open(d / "groups.json", "w"))
        return d

    def select(n_groups):
        d = setup(n_groups)
        out = tmp / f"sel-{n_groups}-{time.monotonic_ns()}"
        return run_timed([a.mira, "select", "--input", str(corpus), "--groups", str(d / "groups.json"),
                          "--students", str(d / "students"), "--reliability", str(rel_path),
                          "--output-dir", str(out), "--device", "cpu", "--threads", str(a.threads),
                          "--pass", "score"])

    def score():
        out = tmp / f"score-{time.monotonic_ns()}"
        return run_timed([a.mira, "score", "--model", str(student), "--input", str(corpus),
                          "--output-dir", str(out), "--device", "cpu", "--threads", str(a.threads)])

    n_records = len(records) * a.copies
    best = {}
    for rep in range(a.repeat):
        order = [("score", score), ("select-4", lambda: select(4))]
        if rep % 2:
            order.reverse()
        order += [("select-1", lambda: select(1)), ("select-16", lambda: select(16))]
        for name, fn in order:
            secs, rss, _ = fn()
            print(f"  rep {rep} {name}: {secs:.2f}s, {n_records / secs:.1f} docs/s, peak RSS {rss:.0f} MiB",
                  flush=True)
            b = best.get(name)
            if b is None or secs < b[0]:
                best[name] = (secs, rss)
            else:
                best[name] = (b[0], max(b[1], rss))
    s = best["score"][0]
    print(f"\n{n_records} records ({a.copies} copies of the sample corpus), {a.threads} threads, best of {a.repeat}:")
    print(f"  mira score (one student):     {s:.2f}s  {n_records / s:7.1f} docs/s  peak RSS {best['score'][1]:.0f} MiB")
    for g in (1, 4, 16):
        t, rss = best[f"select-{g}"]
        print(f"  mira select --pass score, {g:2} groups: {t:.2f}s  {n_records / t:7.1f} docs/s  "
              f"({s / t:.1%} of score)  peak RSS {rss:.0f} MiB")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

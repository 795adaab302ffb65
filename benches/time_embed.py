#!/usr/bin/env python3
"""Time `mira embed` as a user runs it: the whole process (load, read JSONL, tokenize, forward,
write JSONL), best of --repeat runs, and print one JSON line with tokens/s and docs/s from the
job's own --stats. Used by benches/compare_cpu.sh and benches/precision_cpu.sh.

usage: benches/time_embed.py MIRA MODEL CORPUS [--threads 2] [--max-tokens 256]
       [--precision auto] [--repeat 3]
"""

import argparse
import json
import subprocess
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mira")
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--max-tokens", default="256")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = f"{tmp}/stats.json"
        cmd = [a.mira, "embed", "--model", a.model, "--input", a.corpus, "--output",
               f"{tmp}/out.jsonl", "--device", "cpu", "--threads", a.threads, "--max-tokens",
               a.max_tokens, "--precision", a.precision, "--stats", stats_path]
        runs = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            runs.append(time.perf_counter() - t)
        stats = json.load(open(stats_path))
    best = min(runs)
    print(json.dumps({"engine": f"mira embed {a.precision} (whole job, process wall time)",
                      "model": a.model, "wall_s": round(best, 3),
                      "runs_s": [round(r, 3) for r in runs], "docs": stats["records"],
                      "tokens": stats["tokens"], "tokens_per_s": round(stats["tokens"] / best, 1),
                      "docs_per_s": round(stats["records"] / best, 2)}), flush=True)


if __name__ == "__main__":
    main()

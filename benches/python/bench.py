"""Throughput of the Python package against the command line on the same texts and threads
(BENCHMARKS.md, "Python package"). Not a test: it times, it asserts nothing.

    python benches/python/bench.py --model .data/models/all-MiniLM-L6-v2 \
        --corpus .data/sample/corpus.jsonl --threads 2 --repeat 3 [--ray]

Prints one JSON object: `mira bench` (the engine alone, pre-tokenized), `mira embed|score` (the
whole CLI job), `Scorer.embed|score` (tokenization and engine, in memory), and with --ray Ray Data
with 2 actors x 1 thread against the CLI with 2 threads. Best of --repeat runs each.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best_of(repeat, fn):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def progress(out, key):
    """Each figure on stderr as soon as it is measured (a long run that is cut short keeps them)."""
    print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mira-bin", default=os.environ.get("MIRA_BIN", "target/release/mira"))
    p.add_argument("--ray", action="store_true")
    a = p.parse_args()

    import mira

    texts = [json.loads(l)["text"] for l in Path(a.corpus).read_text().splitlines() if l.strip()]
    scorer = mira.Scorer(a.model, device="cpu", threads=a.threads)
    task = "score" if scorer.labels else "embed"
    run = scorer.score if task == "score" else scorer.embed
    out = {"model": a.model, "docs": len(texts), "threads": a.threads, "task": task}

    bench = json.loads(subprocess.run(
        [a.mira_bin, "bench", "--model", a.model, "--input", a.corpus, "--device", "cpu",
         "--threads", str(a.threads), "--repeat", str(a.repeat), "--json"],
        check=True, capture_output=True, text=True).stdout)
    tokens = bench["tokens"]
    out["mira_bench"] = {"docs_per_s": bench["docs_per_s"], "tokens_per_s": bench["tokens_per_s"]}
    progress(out, "mira_bench")

    with tempfile.TemporaryDirectory() as tmp:
        cli = [a.mira_bin, task, "--model", a.model, "--input", a.corpus, "--device", "cpu",
               "--threads", str(a.threads), "--output", f"{tmp}/out.jsonl"]
        s = best_of(a.repeat, lambda: subprocess.run(cli, check=True, capture_output=True))
    out["cli_job"] = {"seconds": s, "docs_per_s": len(texts) / s, "tokens_per_s": tokens / s}
    progress(out, "cli_job")

    run(texts[:8])  # warm-up
    s = best_of(a.repeat, lambda: run(texts))
    out["python_scorer"] = {"seconds": s, "docs_per_s": len(texts) / s, "tokens_per_s": tokens / s}
    progress(out, "python_scorer")
    out["python_vs_mira_bench"] = out["python_scorer"]["docs_per_s"] / bench["docs_per_s"]
    out["python_vs_cli_job"] = out["python_scorer"]["docs_per_s"] / out["cli_job"]["docs_per_s"]

    if a.ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        import mira.ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 1024**2)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def ray_job():
            ds = ray.data.read_json(a.corpus).map_batches(
                mira.ray.Score, fn_constructor_kwargs={"model_dir": a.model, "threads": 1,
                                                       "embed": task == "embed"},
                batch_format="pyarrow", batch_size=64, num_cpus=0.5,
                compute=ray.data.ActorPoolStrategy(size=2))
            ds.materialize()

        s = best_of(a.repeat, ray_job)
        ray.shutdown()
        out["ray_2x1"] = {"seconds": s, "docs_per_s": len(texts) / s, "tokens_per_s": tokens / s}
        out["ray_2x1_vs_cli_job"] = out["ray_2x1"]["docs_per_s"] / out["cli_job"]["docs_per_s"]
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

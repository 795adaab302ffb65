#!/usr/bin/env bash
# CPU throughput, side by side in one run on the same texts and the same thread count:
#   mira bench        the engine alone (forward pass; tokenization reported separately)
#   mira embed        the whole job: read JSONL, tokenize, forward, write JSONL
#   sentence-transformers fp32 and ONNX Runtime fp32 (benches/reference/bench_torch.py)
#
# usage: benches/compare_cpu.sh [PYTHON] [CORPUS]
#   PYTHON: an interpreter with torch, transformers, sentence-transformers, onnx, onnxruntime
#           (default /root/venv-ref/bin/python; `pip install torch transformers
#           sentence-transformers onnx onnxruntime` into a venv)
#   CORPUS: default .data/sample/corpus.jsonl (scripts/setup.sh makes it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${1:-/root/venv-ref/bin/python}"
CORPUS="${2:-.data/sample/corpus.jsonl}"
MODEL=.data/models/all-MiniLM-L6-v2
THREADS="${THREADS:-$(nproc)}"
MAXTOK=256

cargo build --release --locked -q
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$THREADS"
./target/release/mira bench --model "$MODEL" --input "$CORPUS" --device cpu --threads "$THREADS" \
    --max-tokens "$MAXTOK" --repeat 3 --json
python3 - "$MODEL" "$CORPUS" "$THREADS" "$MAXTOK" <<'PYEOF'
import json, subprocess, sys, time
model, corpus, threads, maxtok = sys.argv[1:]
cmd = ["./target/release/mira", "embed", "--model", model, "--input", corpus, "--output",
       "/tmp/mira-compare.jsonl", "--device", "cpu", "--threads", threads, "--max-tokens", maxtok,
       "--stats", "/tmp/mira-compare.stats.json"]
runs = []
for _ in range(3):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    runs.append(time.perf_counter() - t)
stats = json.load(open("/tmp/mira-compare.stats.json"))
best = min(runs)
print(json.dumps({"engine": "mira embed (end to end, process wall time)", "wall_s": round(best, 3),
                  "runs_s": [round(r, 3) for r in runs], "docs": stats["records"],
                  "tokens": stats["tokens"], "tokens_per_s": round(stats["tokens"] / best, 1),
                  "docs_per_s": round(stats["records"] / best, 2)}))
PYEOF
"$PY" benches/reference/bench_torch.py --model "$MODEL" --input "$CORPUS" --threads "$THREADS" \
    --max-tokens "$MAXTOK" --repeat 3 --onnx --json 2>/dev/null

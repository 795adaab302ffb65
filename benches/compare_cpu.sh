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
python3 benches/time_embed.py ./target/release/mira "$MODEL" "$CORPUS" --threads "$THREADS" \
    --max-tokens "$MAXTOK" --repeat 3
"$PY" benches/reference/bench_torch.py --model "$MODEL" --input "$CORPUS" --threads "$THREADS" \
    --max-tokens "$MAXTOK" --repeat 3 --onnx --json 2>/dev/null

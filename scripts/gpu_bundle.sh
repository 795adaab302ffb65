#!/usr/bin/env bash
# Build here what benches/gpu/run.sh runs on a GPU machine that has no Rust toolchain:
#   .gpu/bin/mira                         the release binary
#   .gpu/bin/cuda_ops, .gpu/bin/cuda_model the CUDA test executables (release profile)
#   .gpu/minilm/                          all-MiniLM-L6-v2 with f16 weights (45 MB instead of 90,
#                                          so it fits a 64 MiB transfer; GPU and CPU read the same
#                                          file, so the comparison is unaffected), if PYTHON has
#                                          numpy and safetensors
#   .gl/*.deb                             the Vulkan loader and glvnd, so run.sh can benchmark wgpu there
# usage: scripts/gpu_bundle.sh [--pack] [PYTHON]   (.gpu/ and .gl/ are ignored by git; carry them:
# .gpu/bin takes ~40 MB and .gpu/minilm 46 MB, too much for one 64 MiB transfer beside the working
# tree, so --pack also writes both into .gpu/pack.tar.xz (xz -9, ~50 MB; benches/gpu/session.sh
# unpacks it): carry .gpu/pack.tar.xz and .gl)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACK=0
[ "${1:-}" = --pack ] && PACK=1 && shift
PY="${1:-/root/venv-ref/bin/python}"
cargo build --release --locked
mkdir -p .gpu/bin
cp "${CARGO_TARGET_DIR:-target}/release/mira" .gpu/bin/
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
# The Vulkan loader for wgpu on the GPU machine (it has NVIDIA's driver but maybe no loader).
mkdir -p .gl /tmp/amd64/partial
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
# (NVIDIA's Vulkan driver, libGLX_nvidia, needs the glvnd dispatch libraries too: without them
# the loader found no adapter on an H200 machine.)
if apt-get $o update >/dev/null 2>&1 && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 \
    libopengl0 libgl1 libglx0 libgles2 >/dev/null 2>&1); then
    echo "Vulkan loader in .gl/ (carry .gl as well to benchmark wgpu there)"
fi
if [ "$PACK" = 1 ]; then
    rm -f .gpu/pack.tar.xz
    tar -C .gpu -cf - bin $( [ -d .gpu/minilm ] && echo minilm ) | xz -T0 -9 >.gpu/pack.tar.xz
fi
du -sh .gpu/* .gpu/bin/* .gl 2>/dev/null

#!/usr/bin/env bash
# ptxas (CUDA 13's PTX assembler) for the kernel assembly test on machines without a CUDA
# toolkit: the PyPI wheel nvidia-cuda-nvcc, installed once into ~/.cache/mira-ci/nvcc. Prints
# the path of the ptxas executable (for MIRA_PTXAS).
set -euo pipefail
dest="${MIRA_CACHE:-$HOME/.cache/mira-ci}/nvcc/13.0"
ptxas="$dest/nvidia/cu13/bin/ptxas"
if [ ! -x "$ptxas" ]; then
    rm -rf "$dest"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
        "nvidia-cuda-nvcc==13.0.*" >&2
fi
[ -x "$ptxas" ] || { echo "fetch_ptxas: no ptxas in $dest" >&2; exit 1; }
echo "$ptxas"

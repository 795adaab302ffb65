#!/usr/bin/env bash
# One file of a CUDA 13 PyPI wheel, for the kernel tests on machines without a CUDA toolkit
# (no GPU needed): installed once into ~/.cache/mira-ci/<NAME>/13.0, then its path is printed.
#   scripts/fetch_cuda_wheel.sh nvrtc nvidia-cuda-nvrtc nvidia/cu13/lib/libnvrtc.so.13   (NVRTC)
#   scripts/fetch_cuda_wheel.sh nvcc  nvidia-cuda-nvcc  nvidia/cu13/bin/ptxas            (ptxas)
set -euo pipefail
[ $# = 3 ] || { echo "usage: $0 NAME WHEEL FILE" >&2; exit 2; }
name="$1" wheel="$2" file="$3"
dest="${MIRA_CACHE:-$HOME/.cache/mira-ci}/$name/13.0"
if [ ! -e "$dest/$file" ]; then
    rm -rf "$dest"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
        "$wheel==13.0.*" >&2
fi
[ -e "$dest/$file" ] || { echo "fetch_cuda_wheel: no $file in $dest ($wheel)" >&2; exit 1; }
echo "$dest/$file"

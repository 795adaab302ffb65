#!/usr/bin/env bash
# NVRTC (CUDA 13's runtime compiler) for the kernel compilation test on machines without a CUDA
# toolkit: the PyPI wheel nvidia-cuda-nvrtc, installed once into ~/.cache/mira-ci/nvrtc. Prints
# the folder holding libnvrtc.so.13 (for LD_LIBRARY_PATH).
set -euo pipefail
dest="${MIRA_CACHE:-$HOME/.cache/mira-ci}/nvrtc/13.0"
lib="$dest/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
    rm -rf "$dest"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
        "nvidia-cuda-nvrtc==13.0.*" >&2
fi
[ -e "$lib/libnvrtc.so.13" ] || { echo "fetch_nvrtc: no libnvrtc.so.13 in $lib" >&2; exit 1; }
echo "$lib"

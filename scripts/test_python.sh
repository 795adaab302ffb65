#!/usr/bin/env bash
# The Python tests (python/tests): build mira's wheel from source, install it into a fresh
# virtual environment with the pinned test requirements (PyPI only), and run pytest against the
# `mira` binary that `cargo test` built (MIRA_BIN). Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
export MIRA_BIN="${MIRA_BIN:-$target/debug/mira}"
[ -x "$MIRA_BIN" ] || cargo build --locked --profile test --bin mira
venv="${MIRA_TEST_VENV:-$target/python-test-venv}"
python3 -m venv --clear "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r python/requirements-test.txt
# The wheel is built with the dev profile (mira at opt-level 2 like the test binaries, whose
# compiled dependencies it shares; cargo's `test` profile makes no loadable library); a user's
# `pip install ./python` builds the release profile.
PATH="$venv/bin:$PATH" MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/pip" install -q --disable-pip-version-check \
    --no-build-isolation ./python
cd python/tests
# No stray `mira` folder on the path: the tests import the installed wheel.
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"

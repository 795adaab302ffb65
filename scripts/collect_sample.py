#!/usr/bin/env python3
"""Build the bundled sample corpus (JSONL) from real text shipped by packages.

Sources (the `source` field of each record):
  python-code/<pkg>  Python files from pinned PyPI sdists, chunked by top-level def/class
  docs/<pkg>         README / CHANGES / HISTORY / docs/*.rst|md from the same sdists, split into sections
  licenses           license texts from Debian's base-files (/usr/share/common-licenses/*)
(<pkg> is the sdist's name: several sources per kind, as in a real mid-training mix.)

Nothing here is invented text: every record is a verbatim slice of a shipped file.
Deterministic: pinned versions + sha256-checked sdists, sorted file order, no randomness.
Uses only the Python standard library (plus `python3 -m pip download` to fetch sdists).

usage: python3 scripts/collect_sample.py [--out .data/sample/corpus.jsonl] [--cache .data/cache/sdists]
"""

import argparse
import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, version, sha256 of the sdist as published on PyPI, which .py files to use)
# Paths are relative to the sdist's top folder. click's library code is left out only to keep
# the corpus at ~550 records (its docs and examples are used).
SDISTS = [
    ("click", "8.1.7", "ca9853ad459e787e2192211578cc907e7594e294c7ccc834310722b41b9ca6de",
     re.compile(r"^examples/.*\.py$")),
    ("itsdangerous", "2.2.0", "e0050c0b7da1eea53ffaf149c0cfbb5c6e2e2b69c4bef22c81fa6eb73e5f6173",
     re.compile(r"^src/.*\.py$")),
    ("requests", "2.32.3", "55365417734eb18255590a9ff9eb97e9e1da868d4ccd6402399eaf68af20a760",
     re.compile(r"^src/.*\.py$")),
]

DOC_RE = re.compile(r"^(README(\.md|\.rst)?|CHANGES\.rst|HISTORY\.md|docs/[^/]+\.(rst|md))$")

LICENSE_DIR = "/usr/share/common-licenses"  # shipped by Debian's base-files package

MAX_CHARS = 8000     # hard cap per record (~8 KB)
MIN_CHARS = 200      # sections shorter than this are merged with the next one
LICENSE_CHUNK = 2500  # target size of license chunks
CODE_TARGET = 1200   # target size of Python code chunks


# ---------------------------------------------------------------------------------------------
# fetching

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(name, version, sha, cache):
    fname = f"{name}-{version}.tar.gz"
    path = os.path.join(cache, fname)
    if not (os.path.exists(path) and sha256_file(path) == sha):
        os.makedirs(cache, exist_ok=True)
        print(f"collect_sample: downloading {name}=={version} (sdist)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", cache],
            check=True,
        )
    got = sha256_file(path)
    if got != sha:
        sys.exit(f"collect_sample: sha256 mismatch for {fname}: {got} != {sha}")
    return path


def read_sdist(path):
    """{relative path: text} of the regular UTF-8 files in the sdist."""
    out = {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            parts = m.name.split("/", 1)
            if len(parts) != 2:
                continue
            try:
                out[parts[1]] = tf.extractfile(m).read().decode("utf-8")
            except UnicodeDecodeError:
                pass
    return out


# ---------------------------------------------------------------------------------------------
# splitting helpers

def split_by_size(text, limit=MAX_CHARS, sep="\n\n"):
    """Split `text` on `sep` boundaries into pieces of at most `limit` chars (falls back to
    line and then hard splits for oversized pieces)."""
    if len(text) <= limit:
        return [text]
    pieces, cur = [], ""
    units = text.split(sep)
    for i, u in enumerate(units):
        unit = u + (sep if i < len(units) - 1 else "")
        if len(unit) > limit:
            if cur:
                pieces.append(cur)
                cur = ""
            if sep != "\n":
                pieces.extend(split_by_size(unit, limit, "\n"))
            else:
                pieces.extend(unit[j:j + limit] for j in range(0, len(unit), limit))
            continue
        if len(cur) + len(unit) > limit and cur:
            pieces.append(cur)
            cur = ""
        cur += unit
    if cur:
        pieces.append(cur)
    return pieces


def pack(chunks, limit=MAX_CHARS, min_chars=MIN_CHARS):
    """Merge consecutive small chunks (< min_chars) into their successor while staying under limit."""
    out = []
    carry = ""
    for c in chunks:
        c = carry + c
        carry = ""
        if len(c) < min_chars:
            carry = c
            continue
        out.extend(split_by_size(c, limit))
    if carry:
        if out and len(out[-1]) + len(carry) <= limit:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def greedy(parts, target):
    """Concatenate consecutive parts while the result stays <= target chars."""
    out, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(p) > target:
            out.append(cur)
            cur = ""
        cur += p
    if cur:
        out.append(cur)
    return out


def chunk_python(src):
    """Files <= CODE_TARGET chars are one record; longer files are cut at top-level def/class
    boundaries into runs of about CODE_TARGET chars; oversized classes are split along their
    members. Nothing is dropped: the chunks of a file concatenate back to the file."""
    if len(src) <= CODE_TARGET:
        return [src] if src.strip() else []
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return split_by_size(src)
    lines = src.splitlines(keepends=True)
    if not tree.body:
        return [src] if src.strip() else []

    def node_start(n):
        return min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1

    # Segment boundaries: each top-level def/class starts a new segment (including the
    # comments directly above it); everything else sticks to the preceding segment.
    starts = [0]
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            s = node_start(n)
            while s > 0 and lines[s - 1].lstrip().startswith("#"):
                s -= 1
            if s > starts[-1]:
                starts.append(s)
    starts.append(len(lines))
    segments = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:])]

    chunks = []
    for seg in segments:
        if len(seg) <= MAX_CHARS:
            chunks.append(seg)
            continue
        # oversized (typically a big class): split along its top-level members
        seg_lines = seg.splitlines(keepends=True)
        cut = [0]
        for i, line in enumerate(seg_lines):
            if i > 0 and re.match(r"^    (@|def |async def |class )", line) and not re.match(
                r"^    @", seg_lines[i - 1]
            ):
                cut.append(i)
        cut.append(len(seg_lines))
        parts = ["".join(seg_lines[a:b]) for a, b in zip(cut, cut[1:])]
        chunks.extend(greedy(parts, CODE_TARGET))
    return [c for c in pack(greedy(chunks, CODE_TARGET)) if c.strip()]


RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")


def split_doc(text, is_md):
    """Split a reStructuredText / Markdown document into sections at its headings."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for i, line in enumerate(lines):
        if is_md:
            if re.match(r"^#{1,6} ", line) and i > 0:
                starts.append(i)
        else:
            # title line followed by an underline at least as long as the title
            if (
                i + 1 < len(lines)
                and RST_UNDERLINE.match(lines[i + 1])
                and line.strip()
                and not RST_UNDERLINE.match(line)
                and len(lines[i + 1].rstrip()) >= len(line.rstrip())
            ):
                s = i
                if i > 0 and RST_UNDERLINE.match(lines[i - 1]):  # overline
                    s = i - 1
                if s > starts[-1]:
                    starts.append(s)
    starts.append(len(lines))
    sections = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:])]
    return [s for s in pack(sections) if s.strip()]


def split_license(text):
    """Group paragraphs into chunks of about LICENSE_CHUNK chars; short licenses stay whole."""
    if len(text) <= MAX_CHARS:
        return [text]
    paras = text.split("\n\n")
    out, cur = [], ""
    for i, p in enumerate(paras):
        unit = p + ("\n\n" if i < len(paras) - 1 else "")
        if cur and len(cur) + len(unit) > LICENSE_CHUNK:
            out.append(cur)
            cur = ""
        cur += unit
    if cur:
        out.append(cur)
    return [c for piece in pack(out) for c in split_by_size(piece) if c.strip()]


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, ".data/sample/corpus.jsonl"))
    ap.add_argument("--cache", default=os.path.join(REPO_ROOT, ".data/cache/sdists"))
    args = ap.parse_args()

    records = []

    def add(source, package, path, chunks):
        for n, text in enumerate(chunks):
            records.append({
                "id": f"{source}/{package}/{path}#{n}",
                "text": text,
                "source": source,
                "metadata": {"package": package, "path": path},
            })

    sdists = [(name, ver, code_re, read_sdist(fetch_sdist(name, ver, sha, args.cache)))
              for name, ver, sha, code_re in SDISTS]

    for name, ver, code_re, files in sdists:
        pkg = f"{name}=={ver}"
        for path in sorted(files):
            if code_re.match(path):
                add(f"python-code/{name}", pkg, path, chunk_python(files[path]))
    for name, ver, _, files in sdists:
        pkg = f"{name}=={ver}"
        for path in sorted(files):
            if DOC_RE.match(path):
                add(f"docs/{name}", pkg, path, split_doc(files[path], path.endswith(".md")))

    if not os.path.isdir(LICENSE_DIR):
        sys.exit(f"collect_sample: {LICENSE_DIR} not found (Debian base-files)")
    for fname in sorted(os.listdir(LICENSE_DIR)):
        p = os.path.join(LICENSE_DIR, fname)
        if os.path.islink(p) or not os.path.isfile(p):  # GPL -> GPL-3 etc.: skip duplicates
            continue
        with open(p, encoding="utf-8") as f:
            add("licenses", "debian:base-files", f"common-licenses/{fname}", split_license(f.read()))

    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate record ids"

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)

    counts = Counter(r["source"] for r in records)
    lens = sorted(len(r["text"]) for r in records)
    print(f"collect_sample: wrote {len(records)} records to {args.out}")
    for src in sorted(counts):
        sl = sorted(len(r["text"]) for r in records if r["source"] == src)
        print(f"  {src:24s} {counts[src]:4d} records, {sum(sl):8d} chars (median {sl[len(sl) // 2]})")
    buckets = [(0, 500), (500, 2000), (2000, 4000), (4000, 10 ** 9)]
    mix = ", ".join(
        f"{a}-{b if b < 10 ** 9 else ''}: {sum(a <= x < b for x in lens)}" for a, b in buckets
    )
    print(f"  length mix (chars) {mix}")


if __name__ == "__main__":
    main()

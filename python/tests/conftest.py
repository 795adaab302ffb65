"""Shared by the Python tests: the repository's models and sample corpus, and the `mira` command
line (the reference every Python result is compared with, bit for bit on CPU)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / ".data" / "sample" / "corpus.jsonl"
MINILM = Path(os.environ.get("MIRA_MINILM_DIR", REPO / ".data" / "models" / "all-MiniLM-L6-v2"))
# A BERT classifier with 12 regression labels (tests/fixtures/make_goldens.py made it).
STUDENT = REPO / "tests" / "fixtures" / "models" / "bert-cls-regression"


def mira_bin() -> Path:
    """The command line built from the same sources (scripts/test.sh sets MIRA_BIN)."""
    if "MIRA_BIN" in os.environ:
        path = Path(os.environ["MIRA_BIN"])
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        path = target / "debug" / "mira"
    if not path.exists():
        raise FileNotFoundError(f"no mira binary at {path}: build it (cargo build) or set MIRA_BIN")
    return path


def cli_rows(task: str, model: Path, corpus: Path, tmp: Path, threads: int = 2,
             precision: str = "auto") -> list:
    """`mira score|embed` on CPU: its output rows, in order."""
    out = tmp / f"cli-{task}-{model.name}-{precision}.jsonl"
    subprocess.run(
        [str(mira_bin()), task, "--model", str(model), "--input", str(corpus),
         "--output", str(out), "--device", "cpu", "--threads", str(threads),
         "--precision", precision],
        check=True, capture_output=True,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def cli_matrix(rows: list, key: str, labels=None) -> np.ndarray:
    """The CLI's values as float32 (its JSON holds the shortest decimal of each f32, so this is
    exact)."""
    if key == "scores":
        return np.array([[r["scores"][l] for l in labels] for r in rows], dtype=np.float32)
    return np.array([r["embedding"] for r in rows], dtype=np.float32)


def assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.argwhere(a.view(np.uint32) != b.view(np.uint32))
    assert diff.size == 0, f"{len(diff)} values differ, first at {diff[0]}: {a[tuple(diff[0])]} vs {b[tuple(diff[0])]}"


def assert_close_to_cli(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to the CLI up to the last bits. Scored in other batches than the CLI's (Ray Data
    splits the corpus its own way), a text's numbers can differ in the last bits: the CPU GEMM
    (the `gemm` crate) chooses its blocking by matrix size, and so by the batch. Measured: at
    most 1e-6 of the value here; allowed: 1e-5 of (1 + |value|)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    bound = 1e-5 * (1.0 + np.abs(want))
    worst = np.max(np.abs(got.astype(np.float64) - want) - bound)
    assert worst <= 0, f"off the CLI by more than 1e-5 relative (excess {worst})"


def corpus_records() -> list:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def records():
    if not CORPUS.exists():
        raise FileNotFoundError(f"{CORPUS} is missing: run scripts/setup.sh")
    return corpus_records()

"""mira in a datatrove pipeline: JsonlReader -> MiraScorer -> JsonlWriter gives the command
line's scores (to the last bits: the step batches documents its own way), and MiraFilter keeps
exactly the documents at or over its thresholds."""

import json

import numpy as np
import pytest

from conftest import CORPUS, STUDENT, assert_close_to_cli, cli_matrix, cli_rows

pytest.importorskip("datatrove", reason="datatrove is installed by scripts/test.sh")

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402


def written(folder):
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def test_scorer_step_gives_the_cli_scores_and_filter_keeps_those_over(tmp_path):
    import mira
    from mira.datatrove import MiraFilter, MiraScorer

    labels = mira.Scorer(str(STUDENT), device="cpu", threads=1).labels
    cli = cli_rows("score", STUDENT, CORPUS, tmp_path)
    want = cli_matrix(cli, "scores", labels)
    scored, kept = tmp_path / "scored", tmp_path / "kept"
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(CORPUS.parent), glob_pattern=CORPUS.name),
            MiraScorer(str(STUDENT), device="cpu", threads=2, batch_size=100),
            JsonlWriter(str(scored), output_filename="${rank}.jsonl", compression=None),
        ],
        tasks=1, workers=1, logging_dir=str(tmp_path / "logs-score"),
    ).run()
    rows = {r["id"]: r for r in written(scored)}
    assert len(rows) == len(cli)
    got = np.array([[rows[c["id"]]["metadata"]["mira_" + l] for l in labels] for c in cli],
                   dtype=np.float32)
    assert_close_to_cli(got, want)

    # Thresholds at the median of two labels: the filter keeps exactly the documents at or
    # over both (by the CLI's scores), scoring them itself.
    thresholds = {l: float(np.median(want[:, j])) for j, l in enumerate(labels[:2])}
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(CORPUS.parent), glob_pattern=CORPUS.name),
            MiraFilter(thresholds, model_dir=str(STUDENT), device="cpu", threads=2,
                       batch_size=64),
            JsonlWriter(str(kept), output_filename="${rank}.jsonl", compression=None),
        ],
        tasks=1, workers=1, logging_dir=str(tmp_path / "logs-filter"),
    ).run()
    # (by the scores the step wrote, which are the CLI's to the last bits)
    expected = {c["id"] for c, row in zip(cli, got)
                if all(row[j] >= thresholds[l] for j, l in enumerate(labels[:2]))}
    assert 0 < len(expected) < len(cli)
    assert {r["id"] for r in written(kept)} == expected


def test_filter_needs_scores_or_a_model():
    from datatrove.data import Document
    from mira.datatrove import MiraFilter

    f = MiraFilter({"clarity": 1.0})
    with pytest.raises(KeyError, match="MiraScorer"):
        f.filter(Document(text="x", id="d1"))
    assert f.filter(Document(text="x", id="d2", metadata={"mira_clarity": 2.0})) is True
    assert f.filter(Document(text="x", id="d3", metadata={"mira_clarity": 0.5}))[0] is False
    assert f.filter(Document(text="x", id="d4", metadata={"mira_clarity": float("nan")}))[0] is False
    with pytest.raises(ValueError):
        MiraFilter({})

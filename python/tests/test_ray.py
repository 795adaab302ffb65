"""mira.ray.Score in a real local Ray cluster: Ray Data's map_batches with two actors gives the
command line's scores for every id (to the last bits: Ray batches the corpus its own way, see
`assert_close_to_cli`), and every input column comes through intact."""

import os

import numpy as np
import pytest

from conftest import CORPUS, STUDENT, assert_bitwise, assert_close_to_cli, cli_matrix, cli_rows

ray = pytest.importorskip("ray", reason="ray is installed by scripts/test.sh")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_map_batches_with_two_actors_gives_the_cli_scores(cluster, records, tmp_path):
    import mira
    import mira.ray

    labels = mira.Scorer(str(STUDENT), device="cpu", threads=1).labels
    want = cli_matrix(cli_rows("score", STUDENT, CORPUS, tmp_path), "scores", labels)
    ds = ray.data.read_json(str(CORPUS))
    scored = ds.map_batches(
        mira.ray.Score,
        fn_constructor_kwargs={"model_dir": str(STUDENT), "prefix": "mira_", "threads": 1},
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,  # leave CPU to the read tasks on a 2-CPU cluster
    )
    rows = {r["id"]: r for r in scored.take_all()}
    assert len(rows) == len(records)
    got = np.array([[rows[r["id"]]["mira_" + l] for l in labels] for r in records],
                   dtype=np.float32)
    assert_close_to_cli(got, want)
    for r in records:
        out = rows[r["id"]]
        assert {k: out[k] for k in r} == r  # every input column, as it was
        assert out["mira_error"] is None
        assert set(out) == set(r) | {"mira_error"} | {"mira_" + l for l in labels}


def test_numpy_and_pandas_batches_and_embeddings(records):
    import pandas as pd
    import mira.ray
    from conftest import MINILM

    texts = [r["text"] for r in records[:10]] + [""]
    score = mira.ray.Score(str(STUDENT), threads=1, error_column="err")
    batch = {"text": np.array(texts, dtype=object), "n": np.arange(11)}
    out = score(batch)
    assert out["n"].tolist() == list(range(11))
    assert np.isnan(out[score.scorer.labels[0]][10]) and out["err"][10].startswith("empty_text")
    frame = score(pd.DataFrame(batch))
    assert_bitwise(frame[score.scorer.labels[0]].to_numpy(np.float32), out[score.scorer.labels[0]])
    embed = mira.ray.Score(str(MINILM), threads=1, embed=True)
    vectors = embed({"text": np.array(texts[:3], dtype=object)})["embedding"]
    assert vectors.shape == (3, 384)

"""mira.Scorer against the command line (bit for bit on CPU), its inputs, errors, threads and
fork safety."""

import multiprocessing
import threading

import numpy as np
import pytest

import mira
from conftest import MINILM, STUDENT, CORPUS, assert_bitwise, cli_matrix, cli_rows


@pytest.fixture(scope="module")
def student():
    return mira.Scorer(str(STUDENT), device="cpu", threads=2)


def test_scores_equal_the_command_line_bit_for_bit(student, records, tmp_path):
    rows = cli_rows("score", STUDENT, CORPUS, tmp_path)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    want = cli_matrix(rows, "scores", student.labels)
    got = student.score([r["text"] for r in records])
    assert got.shape == (len(records), 12)
    assert_bitwise(got, want)


def test_embeddings_equal_the_command_line_bit_for_bit(records, tmp_path):
    embedder = mira.Scorer(str(MINILM), device="cpu", threads=2)
    rows = cli_rows("embed", MINILM, CORPUS, tmp_path)
    want = cli_matrix(rows, "embedding")
    got = embedder.embed([r["text"] for r in records])
    assert got.shape == (len(records), embedder.embedding_dim) == (len(records), 384)
    assert_bitwise(got, want)


def test_int8_embeddings_equal_the_command_line_and_stay_near_f32(records, tmp_path):
    int8 = mira.Scorer(str(MINILM), device="cpu", precision="int8", threads=2)
    assert "int8" in int8.device
    texts = [r["text"] for r in records]
    got = int8.embed(texts)
    assert_bitwise(got, cli_matrix(cli_rows("embed", MINILM, CORPUS, tmp_path, precision="int8"),
                                   "embedding"))
    f32 = mira.Scorer(str(MINILM), device="cpu", threads=2).embed(texts).astype(np.float64)
    cos = (got * f32).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(f32, axis=1))
    # issue #19's floor for int8 on this corpus (tests/precision.rs has the whole guard)
    assert cos.min() >= 0.999, cos.min()
    assert not np.array_equal(got, f32.astype(np.float32))


def test_properties(student):
    assert student.labels[:3] == ["clarity", "correctness", "depth"]
    assert len(student.labels) == 12
    assert student.device.startswith("cpu")
    assert student.max_tokens > 0
    assert student.model_dir.endswith("bert-cls-regression")
    assert "bert-cls-regression" in repr(student)


def test_every_kind_of_text_sequence_gives_the_same_scores(student, records):
    import pandas as pd
    import pyarrow as pa

    texts = [r["text"] for r in records[:40]]
    want = student.score(texts)
    for seq in (tuple(texts), np.array(texts), np.array(texts, dtype=object), pa.array(texts),
                pa.chunked_array([texts[:15], texts[15:]]), pd.Series(texts)):
        assert_bitwise(student.score(seq), want)


def test_one_str_is_refused_not_scored_per_character(student):
    with pytest.raises(ValueError, match="not one str"):
        student.score("a document")


def test_a_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        mira.Scorer(str(missing))


def test_a_broken_checkpoint_raises_with_mira_s_message(tmp_path):
    import shutil

    broken = tmp_path / "student"
    shutil.copytree(STUDENT, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="config.json"):
        mira.Scorer(str(broken), device="cpu")
    shutil.rmtree(broken)
    broken.mkdir()
    with pytest.raises(RuntimeError, match="has no config.json"):
        mira.Scorer(str(broken), device="cpu")


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="device"):
        mira.Scorer(str(STUDENT), device="tpu")
    with pytest.raises(ValueError, match="precision"):
        mira.Scorer(str(STUDENT), precision="f8")
    with pytest.raises(ValueError, match="at least 1"):
        mira.Scorer(str(STUDENT), threads=0)


def test_cuda_graphs_is_accepted_and_changes_nothing_on_cpu():
    texts = ["a fine document", "another one, a little longer than the first"]
    default = mira.Scorer(str(STUDENT), device="cpu", threads=1).score(texts)
    off = mira.Scorer(str(STUDENT), device="cpu", threads=1, cuda_graphs=0).score(texts)
    np.testing.assert_array_equal(default, off)
    with pytest.raises(OverflowError):
        mira.Scorer(str(STUDENT), device="cpu", cuda_graphs=-1)


def test_an_embedding_model_cannot_score():
    embedder = mira.Scorer(str(MINILM), device="cpu", threads=1)
    assert embedder.labels == []
    with pytest.raises(ValueError, match="no classification head"):
        embedder.score(["text"])


def test_empty_and_missing_texts_are_nan_rows_with_errors(student):
    texts = ["a fine document", "", "   ", None, "another one"]
    scores, errors = student.score_with_errors(texts)
    assert scores.shape == (5, 12)
    assert [e[:2] for e in errors] == [(1, "empty_text"), (2, "empty_text"), (3, "missing_text")]
    assert "texts[1]" in errors[0][2]
    assert np.isnan(scores[1:4]).all()
    assert np.isfinite(scores[[0, 4]]).all()
    # The good rows are what they are alone.
    assert_bitwise(scores[[0, 4]], student.score(["a fine document", "another one"]))
    assert_bitwise(student.score(texts, errors="nan"), scores)
    with pytest.raises(ValueError, match=r"texts\[1\].*empty_text"):
        student.score(texts)
    with pytest.raises(ValueError, match="errors must be"):
        student.score(texts, errors="skip")
    with pytest.raises(ValueError, match=r"texts\[1\] is a int"):
        student.score(["ok", 3])


def test_threads_share_one_scorer(student, records):
    texts = [r["text"] for r in records[:60]]
    want = student.score(texts)
    results = [None] * 4

    def work(i):
        results[i] = student.score(texts)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for r in results:
        assert_bitwise(r, want)


def _score_in_child(texts):
    return _FORK_SCORER.score(texts)


_FORK_SCORER = None


def test_a_forked_child_scores_without_hanging(records):
    global _FORK_SCORER
    _FORK_SCORER = mira.Scorer(str(STUDENT), device="cpu", threads=2)
    texts = [r["text"] for r in records[:30]]
    want = _FORK_SCORER.score(texts)  # the parent's pool is running now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.apply_async(_score_in_child, (texts,)).get(timeout=120)
    assert_bitwise(got, want)


def test_a_nemo_style_mixin_classifier_loads_with_its_base_model(tmp_path):
    import json
    import shutil

    fixtures = STUDENT.parent  # tests/fixtures/models
    golden = json.loads((fixtures.parent / "goldens" / "nemo-mixin-roberta.json").read_text())
    case = golden["settings"][0]["cases"][2]
    scorer = mira.Scorer(str(fixtures / "nemo-mixin-roberta"), device="cpu")
    assert scorer.labels == golden["labels"]
    got = scorer.score([case["text"]])[0]
    np.testing.assert_allclose(got, case["probs"], atol=1e-5)
    # Moved away from its base model, it needs base_model=.
    moved = tmp_path / "classifier"
    shutil.copytree(fixtures / "nemo-mixin-roberta", moved)
    with pytest.raises(RuntimeError, match="base model '../roberta-base-f16' not found"):
        mira.Scorer(str(moved), device="cpu")
    again = mira.Scorer(str(moved), device="cpu", base_model=str(fixtures / "roberta-base-f16"))
    np.testing.assert_array_equal(again.score([case["text"]])[0], got)

"""Students that `mira distill` writes load unmodified in the library their users run, and score
there as `mira score` scores them: a pooler student as transformers'
`AutoModelForSequenceClassification` (BertForSequenceClassification), a CLS or mean student as a
`SentenceTransformer` whose Dense module gives the anchor scores.

Needs torch, transformers and sentence-transformers. The CI test environment does not install
them (torch from PyPI brings several GB of CUDA libraries), so there these tests are reported as
skipped; run them with an environment that has them:

    MIRA_BIN=target/debug/mira python -m pytest python/tests/test_student_export.py

BENCHMARKS.md ("Students in their libraries") records the last run.
"""

import json
import subprocess

import numpy as np
import pytest

from conftest import MINILM, cli_rows, mira_bin

REASON = "needs torch, transformers and sentence-transformers (not in the CI test environment)"
torch = pytest.importorskip("torch", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)
sentence_transformers = pytest.importorskip("sentence_transformers", reason=REASON)

SOURCES = ("docs/click", "licenses", "python-code/requests")


def write_labels(records, path):
    """One group of three sources, 40 records each, two anchors learnable from the text."""
    rows, per = [], {}
    for r in records:
        s = r["source"]
        if s in SOURCES and per.get(s, 0) < 40:
            per[s] = per.get(s, 0) + 1
            text = r["text"]
            rows.append({
                "id": r["id"], "source": s, "group": "g",
                "split": "validation" if len(rows) % 3 == 0 else "train", "text": text,
                "scores": {"length": min(len(text) / 300.0, 10.0),
                           "has_def": 10.0 if "def " in text else 0.0},
            })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("feature", ["pooler", "cls", "mean"])
def test_student_loads_in_its_library_with_mira_scores(feature, records, tmp_path):
    rows = write_labels(records, tmp_path / "labels.jsonl")
    students = tmp_path / "students"
    subprocess.run(
        [str(mira_bin()), "distill", "--encoder", str(MINILM), "--device", "cpu",
         "--labels", str(tmp_path / "labels.jsonl"), "--output-dir", str(students),
         "--feature", feature],
        check=True, capture_output=True,
    )
    student = students / "g"
    card = json.loads((student / "mira_student.json").read_text())
    assert card["feature"] == feature
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows))
    texts = [r["text"] for r in rows]
    mira = cli_rows("score", student, corpus, tmp_path)
    labels = ["length", "has_def"]
    want = np.array([[m["scores"][l] for l in labels] for m in mira], dtype=np.float64)

    if feature == "pooler":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            student, torch_dtype=torch.float32).eval()
        assert type(model).__name__ == "BertForSequenceClassification"
        assert [model.config.id2label[i] for i in range(2)] == labels
        tok = transformers.AutoTokenizer.from_pretrained(student)
        max_len = json.loads((student / "sentence_bert_config.json").read_text())["max_seq_length"]
        got = []
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                enc = tok(texts[i:i + 16], truncation=True, max_length=max_len, padding=True,
                          return_tensors="pt")
                got.extend(model(**enc).logits.tolist())
        got = np.array(got)
    else:
        model = sentence_transformers.SentenceTransformer(str(student), device="cpu")
        assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense"]
        got = model.encode(texts, batch_size=16, convert_to_numpy=True).astype(np.float64)

    assert got.shape == want.shape, (got.shape, want.shape)
    worst = np.abs(got - want).max()
    # f32 on both sides, different kernels and batch shapes: measured ~4e-7.
    print(f"{feature}: {len(texts)} texts, max abs difference {worst:.2e}")
    assert worst < 1e-4, f"{feature}: max abs difference {worst}"


def test_student_scores_as_transformers_defaults_do(records, tmp_path):
    """transformers' pipeline and AutoTokenizer, called with their defaults (no truncation),
    score a pooler student as mira does for every document they can score (up to the
    encoder's 512 positions, longer ones among them than MiniLM's own 256-token limit); past 512
    tokens transformers fails by itself rather than giving another score."""
    rows = write_labels(records, tmp_path / "labels.jsonl")
    students = tmp_path / "students"
    subprocess.run(
        [str(mira_bin()), "distill", "--encoder", str(MINILM), "--device", "cpu",
         "--labels", str(tmp_path / "labels.jsonl"), "--output-dir", str(students),
         "--feature", "pooler"],
        check=True, capture_output=True,
    )
    student = students / "g"
    tok = transformers.AutoTokenizer.from_pretrained(student)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        student, torch_dtype=torch.float32).eval()
    lengths = [len(tok(r["text"])["input_ids"]) for r in rows]
    fits = [r for r, n in zip(rows, lengths) if n <= 512]
    assert any(256 < n <= 512 for n in lengths), "no document between 256 and 512 tokens"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in fits))
    mira = cli_rows("score", student, corpus, tmp_path)
    labels = ["length", "has_def"]
    want = np.array([[m["scores"][l] for l in labels] for m in mira], dtype=np.float64)
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok,
                                 function_to_apply="none", top_k=None, device="cpu")
    by_pipeline = np.array([[{d["label"]: d["score"] for d in out}[l] for l in labels]
                            for out in pipe([r["text"] for r in fits], batch_size=1)])
    with torch.no_grad():
        by_tokenizer = np.array([model(**tok(r["text"], return_tensors="pt")).logits[0].tolist()
                                 for r in fits])
    for name, got in (("pipeline", by_pipeline), ("AutoTokenizer", by_tokenizer)):
        worst = np.abs(got - want).max()
        print(f"{name} defaults: {len(fits)} texts, max abs difference {worst:.2e}")
        assert worst < 1e-4, f"{name} defaults: max abs difference {worst}"
    longer = [r for r, n in zip(rows, lengths) if n > 512]
    if longer:
        with pytest.raises(Exception), torch.no_grad():
            model(**tok(longer[0]["text"], return_tensors="pt"))

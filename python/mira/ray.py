"""mira inside Ray Data: a callable class for ``Dataset.map_batches``.

    import ray, mira.ray
    ds = ray.data.read_json("corpus.jsonl")
    scored = ds.map_batches(
        mira.ray.Score,
        fn_constructor_kwargs={"model_dir": "/models/student"},
        batch_format="pyarrow",
        concurrency=4,      # actors: one model each
        num_gpus=1,         # or num_cpus=N on CPU
    )

Each actor loads the model once. With ``num_gpus=1`` Ray gives the actor one GPU (it sets
``CUDA_VISIBLE_DEVICES``), so the actor's ``cuda:0`` is its own GPU; on CPU the scorer uses the
threads Ray gives the actor (``OMP_NUM_THREADS``, which Ray sets from ``num_cpus``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from . import Scorer


def _default_device() -> str:
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return "cuda:0"
    except Exception:  # not inside a Ray worker
        pass
    return "cpu"


def _default_threads() -> Optional[int]:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class Score:
    """Adds mira's outputs to each batch and passes every other column through.

    Scores: one ``float32`` column per label, named ``prefix + label``. With ``embed=True``: one
    ``embedding_column`` of float32 lists. A record mira cannot score (empty text, no text, a
    non-finite output) gets NaN and, when ``error_column`` is set, its error message there
    (``None`` for the others). Batches may be ``pyarrow.Table``, ``pandas.DataFrame`` or a dict
    of numpy arrays (``batch_format`` "pyarrow", "pandas" or "numpy"); the result has the same
    kind.
    """

    def __init__(
        self,
        model_dir: str,
        text_column: str = "text",
        prefix: str = "",
        embed: bool = False,
        embedding_column: str = "embedding",
        error_column: Optional[str] = "mira_error",
        device: Optional[str] = None,
        threads: Optional[int] = None,
        **scorer_kwargs: Any,
    ):
        self.text_column = text_column
        self.prefix = prefix
        self.embed = embed
        self.embedding_column = embedding_column
        self.error_column = error_column
        self.scorer = Scorer(
            model_dir,
            device=device or _default_device(),
            threads=threads if threads is not None else _default_threads(),
            **scorer_kwargs,
        )

    def _run(self, texts):
        if self.embed:
            return self.scorer.embed_with_errors(texts)
        return self.scorer.score_with_errors(texts)

    def _columns(self, values: np.ndarray, errors) -> dict:
        """The new columns, as numpy arrays of one value per row."""
        n = values.shape[0]
        cols = {}
        if self.embed:
            cols[self.embedding_column] = list(values)
        else:
            for j, label in enumerate(self.scorer.labels):
                cols[self.prefix + label] = values[:, j]
        if self.error_column is not None:
            messages = np.full(n, None, dtype=object)
            for index, kind, message in errors:
                messages[index] = f"{kind}: {message}"
            cols[self.error_column] = messages
        return cols

    def __call__(self, batch):
        try:
            import pyarrow as pa
        except ImportError:  # pragma: no cover - Ray Data needs pyarrow
            pa = None
        if pa is not None and isinstance(batch, pa.Table):
            values, errors = self._run(batch.column(self.text_column))
            out = batch
            for name, col in self._columns(values, errors).items():
                if name == self.embedding_column and self.embed:
                    arr = pa.FixedSizeListArray.from_arrays(
                        pa.array(values.reshape(-1), type=pa.float32()), values.shape[1]
                    )
                elif name == self.error_column:
                    arr = pa.array(list(col), type=pa.string())
                else:
                    arr = pa.array(col, type=pa.float32())
                if name in out.column_names:
                    out = out.set_column(out.column_names.index(name), name, arr)
                else:
                    out = out.append_column(name, arr)
            return out
        if hasattr(batch, "iloc"):  # pandas
            values, errors = self._run(batch[self.text_column].tolist())
            out = batch.copy()
            for name, col in self._columns(values, errors).items():
                out[name] = col
            return out
        values, errors = self._run(batch[self.text_column])
        out = dict(batch)
        for name, col in self._columns(values, errors).items():
            if name == self.embedding_column and self.embed:
                out[name] = values
            else:
                out[name] = np.asarray(col)
        return out

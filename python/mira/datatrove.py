"""mira in datatrove pipelines: a step that scores documents and a threshold filter.

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from mira.datatrove import MiraScorer, MiraFilter

    LocalPipelineExecutor(pipeline=[
        JsonlReader("corpus/"),
        MiraScorer("/models/student"),                 # scores into doc.metadata["mira_<label>"]
        MiraFilter({"reasoning": 6.0, "code_quality": 5.0}),
        JsonlWriter("kept/"),
    ], tasks=4).run()

The model is loaded once per task (in ``run``, never pickled with the step), so the steps work in
``LocalPipelineExecutor`` and ``SlurmPipelineExecutor`` alike.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched

from . import Scorer


class MiraScorer(PipelineStep):
    """Scores each document with a mira model: ``metadata[prefix + label]`` per label (a float;
    NaN when mira cannot score the document, with the reason in ``metadata[error_key]``)."""

    name = "mira scorer"
    type = "📊 - STATS"

    def __init__(
        self,
        model_dir: str,
        prefix: str = "mira_",
        error_key: str = "mira_error",
        batch_size: int = 256,
        device: str = "auto",
        threads: Optional[int] = None,
        **scorer_kwargs: Any,
    ):
        super().__init__()
        self.model_dir = model_dir
        self.prefix = prefix
        self.error_key = error_key
        self.batch_size = batch_size
        self.scorer_kwargs = dict(device=device, threads=threads, **scorer_kwargs)
        self._scorer = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_scorer"] = None
        return state

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.model_dir, **self.scorer_kwargs)
        return self._scorer

    def score_batch(self, docs) -> None:
        """Writes the scores of ``docs`` into their metadata."""
        scores, errors = self.scorer.score_with_errors([d.text for d in docs])
        labels = self.scorer.labels
        for doc, row in zip(docs, scores):
            for label, value in zip(labels, row):
                doc.metadata[self.prefix + label] = float(value)
        for index, kind, message in errors:
            docs[index].metadata[self.error_key] = f"{kind}: {message}"
            self.stat_update(kind)
        self.stat_update("scored", value=len(docs) - len(errors))

    def run(self, data, rank: int = 0, world_size: int = 1):
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                self.score_batch(batch)
            yield from batch


class MiraFilter(BaseFilter):
    """Keeps the documents whose score is at or over the threshold of every label in
    ``thresholds`` (``{label: minimum}``). Scores come from ``metadata[prefix + label]`` as
    ``MiraScorer`` writes them; with ``model_dir`` the filter scores the documents itself (and
    writes the scores into their metadata too). A document without a score (NaN: mira could not
    score it) is dropped."""

    name = "mira filter"

    def __init__(
        self,
        thresholds: Dict[str, float],
        model_dir: Optional[str] = None,
        prefix: str = "mira_",
        batch_size: int = 256,
        exclusion_writer=None,
        **scorer_kwargs: Any,
    ):
        if not thresholds:
            raise ValueError("MiraFilter needs at least one {label: threshold}")
        super().__init__(exclusion_writer=exclusion_writer, batch_size=batch_size)
        self.thresholds = {str(k): float(v) for k, v in thresholds.items()}
        self.prefix = prefix
        self.scoring = (
            MiraScorer(model_dir, prefix=prefix, batch_size=batch_size, **scorer_kwargs)
            if model_dir is not None
            else None
        )

    def filter(self, doc):
        for label, minimum in self.thresholds.items():
            key = self.prefix + label
            if key not in doc.metadata:
                raise KeyError(
                    f"document {doc.id!r} has no '{key}' in its metadata: put MiraScorer before "
                    f"MiraFilter, or give MiraFilter a model_dir"
                )
            value = float(doc.metadata[key])
            if math.isnan(value):
                return False, "mira_unscored"
            if value < minimum:
                return False, f"mira_below_{label}"
        return True

    def filter_batch(self, batch):
        if self.scoring is not None:
            self.scoring.score_batch(batch)
        return [self.filter(doc) for doc in batch]

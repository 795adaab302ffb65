"""mira: model-based data selection scorers for Python data tools.

``mira.Scorer`` loads an encoder checkpoint folder (BERT or ModernBERT, with or without a
classification head) and scores or embeds texts with mira's own forward pass, on CPU, any
Vulkan/Metal GPU (wgpu) or CUDA: the same numbers as the ``mira`` command line on the same
device. ``mira.ray.Score`` runs it inside Ray Data's ``map_batches``; ``mira.datatrove`` has a
scoring step and a threshold filter for datatrove pipelines.
"""

from ._mira import Scorer, __version__

__all__ = ["Scorer", "__version__"]

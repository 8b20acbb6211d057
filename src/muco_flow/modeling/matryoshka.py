"""Matryoshka (nested) embeddings: the first ``d`` coordinates of a vector, re-normalised, are an embedding too.

Matryoshka representation learning (Kusupati et al., 2022) trains the loss on
several prefixes of the same vector at once, so that a prefix can stand in
for the whole (smaller indexes, faster search). Training (modeling/loss.py
``matryoshka_loss``), evaluation (evaluation/dimensions.py) and serving
(registry/serving.py) all cut a vector the same way: ``nested_prefix``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def nested_prefix(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` coordinates of each row (the last axis), L2-normalised again."""
    if dim < 1 or dim > vectors.shape[-1]:
        raise ValueError(f"a prefix of {dim} coordinates does not fit vectors of width {vectors.shape[-1]}")
    return F.normalize(vectors[..., :dim], dim=-1)


def dimensions_problem(dims: Sequence[int], width: int | None = None) -> str | None:
    """Why ``dims`` is no list of nested prefixes (of vectors of ``width``, where known), or None if it is.

    Prefixes are nested: positive, strictly increasing, at most the width.
    """
    if not dims:
        return "must list at least one dimension (or be null)"
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        return f"must be positive integers, got {list(dims)}"
    if any(b <= a for a, b in itertools.pairwise(dims)):
        return f"must be strictly increasing, got {list(dims)}"
    if width is not None and dims[-1] > width:
        return f"must be at most the embedding width {width}, got {dims[-1]}"
    return None

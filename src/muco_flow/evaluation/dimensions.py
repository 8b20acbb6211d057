"""Scoring at a smaller width: every vector an EncodingCache gives, cut to its first ``dim`` numbers.

A model trained with Matryoshka representation learning (training.matryoshka)
nests smaller embeddings in its vectors' prefixes. ``PrefixVectors`` reads the
vectors already encoded (queries in memory, pools in memory or on disk) and
cuts and re-normalises them as they are read, so scoring at every width of
`evaluate.dimensions` encodes nothing again and compares the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muco_flow.evaluation.datasets import Item
from muco_flow.evaluation.encoded_pool import PrefixPool
from muco_flow.evaluation.encoding import EncodingCache
from muco_flow.modeling.matryoshka import nested_prefix


class PrefixVectors:
    """``cache``'s vectors and pools with each vector cut to its first ``dim`` coordinates, re-normalised."""

    def __init__(self, cache: EncodingCache, dim: int) -> None:
        self.cache, self.dim = cache, dim
        self.share = cache.share  # which rank scores: score_sets shows progress on the first only

    def vectors(self, items: Sequence[Item], root) -> torch.Tensor:
        vectors = self.cache.vectors(items, root)
        return nested_prefix(vectors, self.dim) if len(items) else vectors

    def pool(self, items: Sequence[Item], root) -> PrefixPool:
        pool = self.cache.pool(items, root)
        return PrefixPool(pool.pool if isinstance(pool, PrefixPool) else pool, self.dim)

"""Hard negatives for MMEB-train rows, mined with a model and filtered for false negatives.

Per dataset, the pool is the union of its rows' targets (``pos_text``,
``pos_image_path``), each distinct pair once. The pool and the distinct
queries are encoded through evaluation's EncodingCache: with a pool cache
directory, to disk in blocks under a key naming the model and the encoding
code (``evaluation.encoded_pool``), so memory stays flat in the pool's size
and a run killed mid-way re-encodes only the missing blocks. Rows are then
ranked ``query_block_rows`` at a time against the pool, read block by block
(``evaluation.retrieval.chunked_top_k``: never a full rows x pool matrix),
and each row's ``search_depth`` best candidates go through the rules of
``mining.filters``. The output is the input's meta files, row for row, with
``neg_text`` and ``neg_image_path`` replaced by the mined negatives (lists),
and a manifest (``mining.lineage``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from muco_flow.data import mmeb_train
from muco_flow.evaluation.datasets import Item
from muco_flow.evaluation.encoded_pool import VectorPool
from muco_flow.evaluation.encoding import EncodingCache
from muco_flow.evaluation.retrieval import chunked_top_k
from muco_flow.mining.config import MiningConfig
from muco_flow.mining.filters import RULES, normalised_text, select_negatives
from muco_flow.mining.lineage import MANIFEST_FILE, MANIFEST_SCHEMA

logger = logging.getLogger(__name__)

POOL_KIND = "training-targets-per-dataset"
# the code that decides which candidates become negatives (the encoding's own is encoding_code_key)
MINING_MODULES = ("muco_flow.mining.filters", "muco_flow.mining.mine")
# a row's query and positive, as read from its meta file
SIDES = (mmeb_train.QRY, mmeb_train.QRY_IMAGE_PATH, mmeb_train.POS_TEXT, mmeb_train.POS_IMAGE_PATH)


@dataclass(frozen=True)
class TrainingFile:
    """One MMEB-train meta file to mine: its dataset, its path below the snapshot, where to read it and its images.

    ``image_root``: the local folder the rows' image paths are relative to
    (encoding opens the files there); ``read_image``: an image's bytes by
    that path (exact-duplicate checks hash them).
    """

    dataset: str
    meta_file: str
    meta_path: Path
    image_root: Path
    read_image: Callable[[str], bytes]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _item(text: Any, image: Any) -> Item:
    return Item(_text(text), _text(image) or None)


class _Duplicates:
    """Whether a candidate is an exact duplicate of a positive: the same normalised text and image bytes."""

    def __init__(self, pool: Sequence[Item], read_image: Callable[[str], bytes]) -> None:
        self.pool, self.read_image = pool, read_image
        self._texts: dict[int, str] = {}
        self._digests: dict[str, str] = {}  # only the images of candidates whose text matched a positive's

    def _normalised(self, index: int) -> str:
        if index not in self._texts:
            self._texts[index] = normalised_text(self.pool[index].text)
        return self._texts[index]

    def _digest(self, image: str | None) -> str | None:
        if image is None:
            return None
        if image not in self._digests:
            self._digests[image] = hashlib.sha256(self.read_image(image)).hexdigest()
        return self._digests[image]

    def of(self, positive: int) -> Callable[[int], bool]:
        def same(candidate: int) -> bool:
            if self._normalised(candidate) != self._normalised(positive):
                return False
            return self._digest(self.pool[candidate].image) == self._digest(self.pool[positive].image)

        return same


def rank_and_filter(
    row_queries: Sequence[int],
    row_positives: Sequence[int],
    queries: VectorPool,
    candidates: VectorPool,
    config: MiningConfig,
    *,
    duplicates: Callable[[int], Callable[[int], bool]],
    dropped: dict[str, int] | None = None,
) -> list[list[int]]:
    """Each row's negatives: candidate rows of the pool, ranked for its query, filtered against its positive.

    Row i's query is ``queries`` row ``row_queries[i]``, its positive
    ``candidates`` row ``row_positives[i]``; ``duplicates(positive)`` says which
    candidates duplicate that positive. Rows go ``query_block_rows`` at a time,
    each block against the whole pool read block by block: memory is one pool
    block and a block of rows' top ``search_depth``, whatever the pool's size.
    """
    depth = min(config.search_depth, len(candidates))
    negatives: list[list[int]] = []
    for start in range(0, len(row_queries), config.query_block_rows):
        block_queries = row_queries[start : start + config.query_block_rows]
        block_positives = row_positives[start : start + config.query_block_rows]
        vectors = queries.rows(block_queries)
        positive_scores = (vectors * candidates.rows(block_positives)).sum(dim=1)
        scores, indices = chunked_top_k(vectors, candidates.blocks(), depth)
        for i, positive in enumerate(block_positives):
            ranked = zip(indices[i].tolist(), scores[i].tolist(), strict=True)
            negatives.append(
                select_negatives(
                    ranked,
                    positive,
                    float(positive_scores[i]),
                    config.filter,
                    duplicates_positive=duplicates(positive),
                    dropped=dropped,
                )
            )
    return negatives


def mine_dataset(
    files: Sequence[TrainingFile],
    cache: EncodingCache,
    config: MiningConfig,
    output_dir: Path,
) -> dict[str, Any]:
    """Mines the rows of one dataset's meta files into ``output_dir``/<meta_file>; returns its counts."""
    started = time.monotonic()
    tables = [pq.read_table(f.meta_path) for f in files]
    pool_index: dict[Item, int] = {}
    query_index: dict[Item, int] = {}
    row_queries: list[int] = []
    row_positives: list[int] = []
    for table in tables:
        columns = [table.column(name).to_pylist() for name in SIDES]
        for qry, qry_image, pos, pos_image in zip(*columns, strict=True):
            row_queries.append(query_index.setdefault(_item(qry, qry_image), len(query_index)))
            row_positives.append(pool_index.setdefault(_item(pos, pos_image), len(pool_index)))
    pool, queries = list(pool_index), list(query_index)
    del pool_index, query_index
    root = files[0].image_root
    candidates = cache.pool(pool, root)
    query_vectors = cache.pool(queries, root)
    duplicates = _Duplicates(pool, files[0].read_image)
    dropped = dict.fromkeys(RULES, 0)
    negatives = rank_and_filter(
        row_queries, row_positives, query_vectors, candidates, config, duplicates=duplicates.of, dropped=dropped
    )
    row = 0
    for file, table in zip(files, tables, strict=True):
        chosen = negatives[row : row + table.num_rows]
        row += table.num_rows
        texts = pa.array([[pool[c].text for c in each] for each in chosen], pa.list_(pa.string()))
        images = pa.array([[pool[c].image or "" for c in each] for each in chosen], pa.list_(pa.string()))
        for name, column in ((mmeb_train.NEG_TEXT, texts), (mmeb_train.NEG_IMAGE_PATH, images)):
            position = table.schema.get_field_index(name)
            field = pa.field(name, pa.list_(pa.string()))
            table = table.set_column(position, field, column) if position >= 0 else table.append_column(field, column)
        target = output_dir / file.meta_file
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
    seconds = time.monotonic() - started
    kept = [len(n) for n in negatives]
    logger.info("mined %s: %d rows against a pool of %d in %.1f s", files[0].dataset, len(kept), len(pool), seconds)
    return {
        "rows": len(kept),
        "distinct_queries": len(queries),
        "pool_size": len(pool),
        "negatives": sum(kept),
        "rows_without_negatives": sum(1 for n in kept if n == 0),
        "dropped": dropped,
        "seconds": round(seconds, 3),
    }


def mine_hard_negatives(
    files: Sequence[TrainingFile],
    cache: EncodingCache,
    config: MiningConfig,
    output_dir: Path,
    model: dict[str, Any],
    source: dict[str, Any],
    git_commit: str,
    encoding_code: str,
) -> dict[str, Any]:
    """Mines every dataset of ``files`` into ``output_dir`` and writes the manifest there; returns it.

    ``model``: the mining model's identity (reference as configured, directory,
    MLflow run, registered version, content hash); ``source``: where the rows
    came from; ``git_commit`` and ``encoding_code``: the code that mined.
    """
    by_dataset: dict[str, list[TrainingFile]] = {}
    for file in files:
        by_dataset.setdefault(file.dataset, []).append(file)
    datasets = {name: mine_dataset(group, cache, config, output_dir) for name, group in sorted(by_dataset.items())}
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "model": model,
        "pool": {
            "kind": POOL_KIND,
            "description": "per dataset, the distinct (pos_text, pos_image_path) targets of its training rows",
        },
        "settings": config.to_dict(),
        "code": {"git_commit": git_commit, "encoding_code": encoding_code, "mining_code": mining_code_key()},
        "source": source,
        "datasets": datasets,
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def mining_code_key() -> str:
    """A digest of the mining code itself (the rules and the ranking), for the manifest."""
    digest = hashlib.sha256()
    for module in MINING_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"MINING_MODULES names {module}, which has no source file")
        digest.update(Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()

"""One model's metrics on the evaluation sets: the sets and the model read as configured, every score.

``score_model`` is what the evaluate pipeline runs for the trained model and
for the baseline, in one process or, with ``share``, as one rank of several
(``evaluation.ranks``), each encoding its share of every pool's blocks, then
encoding and scoring its share of every set's queries on its own device
(``retrieval.QueryShare``); the shares' ranks are gathered, so every rank
computes the same metrics. The vectors come from ``evaluation.encoding``;
here they are ranked and aggregated.
With `evaluate.dimensions`, the MMEB and M-BEIR averages are also computed
from the same vectors cut to each width (``score_dimensions``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from muco_flow.data.conversations import FormatConfig
from muco_flow.evaluation.config import EvaluationConfig
from muco_flow.evaluation.datasets import RetrievalSet, read_m3t_heldout
from muco_flow.evaluation.dimensions import PrefixVectors
from muco_flow.evaluation.encoding import EncodingCache, checkpoint_identity
from muco_flow.evaluation.mbeir import MBeirBenchmark, read_mbeir, score_mbeir
from muco_flow.evaluation.metrics import argmax_hit, candidate_rank, hit_at_1, mrr, recall_at_k
from muco_flow.evaluation.mmeb import read_mmeb
from muco_flow.evaluation.retrieval import QueryShare, chunked_positive_ranks
from muco_flow.modeling.backbone import BackboneConfig, resolve_attn_implementation
from muco_flow.modeling.embedder import load_embedder
from muco_flow.progress import progress

RECALL_KS = (1, 5, 10)
CURVE_KS = tuple(range(1, 11))


def positive_ranks(
    retrieval_set: RetrievalSet, cache: EncodingCache | PrefixVectors, share: QueryShare | None = None
) -> list[list[int]]:
    """Rank of each query's positives in the whole pool, ties against them (M-BEIR, M3T); ``share``: whose."""
    share = share or QueryShare()
    part = share.part(len(retrieval_set.queries))
    queries = cache.vectors(retrieval_set.queries[part], retrieval_set.root)
    candidates = cache.pool(retrieval_set.candidates, retrieval_set.root)
    return share.merged(chunked_positive_ranks(queries, candidates, retrieval_set.positives[part], device=share.device))


def own_candidate_lists(retrieval_set: RetrievalSet) -> list[list[int]]:
    """Each query's own candidates (MMEB ranks a query among its list only, never the whole pool)."""
    lists = [own for own in retrieval_set.candidate_lists if own is not None]
    if len(lists) != len(retrieval_set.candidate_lists):
        raise ValueError(f"{retrieval_set.name}: a query without its own candidate list cannot be scored as MMEB")
    return lists


def mmeb_hits(
    retrieval_set: RetrievalSet, cache: EncodingCache | PrefixVectors, share: QueryShare | None = None
) -> tuple[list[bool], list[int]]:
    """Per query: VLM2Vec's hit (argmax of its own list) and the correct one's tie-aware rank; ``share``: whose."""
    share = share or QueryShare()
    part = share.part(len(retrieval_set.queries))
    queries = cache.vectors(retrieval_set.queries[part], retrieval_set.root)
    candidates = cache.pool(retrieval_set.candidates, retrieval_set.root)
    scored = []
    lists = own_candidate_lists(retrieval_set)[part]
    for query, own, positives in zip(queries, lists, retrieval_set.positives[part], strict=True):
        # the correct candidate is first in its list (evaluation.mmeb)
        scores = candidates.rows(own) @ query
        scored.append((argmax_hit(scores), candidate_rank(scores, own.index(positives[0]))))
    merged = share.merged(scored)
    return [hit for hit, _ in merged], [rank for _, rank in merged]


def score_sets(
    mmeb: list[RetrievalSet],
    mbeir: MBeirBenchmark | None,
    m3t: list[RetrievalSet],
    cache: EncodingCache | PrefixVectors,
    *,
    progress_every_s: float,
    share: QueryShare | None = None,
) -> dict[str, Any]:
    """Every metric for one model, as a JSON-ready dict; progress by set (first rank only).

    With ``share``, this rank scores its part of every set's queries; the metrics are every query's.
    """
    sets = len(mmeb) + (mbeir is not None) + len(m3t)
    shown = progress(sets, desc="evaluate", unit="set", every_s=progress_every_s, disable=cache.share[0] != 0)
    datasets: dict[str, dict[str, Any]] = {}
    for s in mmeb:
        hits, ranks = mmeb_hits(s, cache, share)
        shown.update()
        datasets[s.name] = {
            "meta_task": s.group,
            "queries": len(s.queries),
            "hit@1": sum(hits) / len(hits),
            "hit@1_strict": hit_at_1(ranks),  # a tie with a wrong candidate is a miss
        }
    by_task: dict[str, list[float]] = {}
    for d in datasets.values():
        by_task.setdefault(d["meta_task"], []).append(d["hit@1"])
    results: dict[str, Any] = {
        "mmeb": {
            "datasets": datasets,
            "meta_tasks": {task: mean(values) for task, values in sorted(by_task.items())},
            "average": mean(d["hit@1"] for d in datasets.values()) if datasets else None,
            "average_strict": mean(d["hit@1_strict"] for d in datasets.values()) if datasets else None,
        }
    }
    curves: dict[str, dict[str, float]] = {}
    results["mbeir"] = None
    if mbeir is not None:
        results["mbeir"], curves = score_mbeir(mbeir, cache.vectors, cache.pool, CURVE_KS, share)
        shown.update()
    section = {}
    for s in m3t:
        each_positive = positive_ranks(s, cache, share)
        section[s.group] = {
            **{f"recall@{k}": recall_at_k(each_positive, k) for k in RECALL_KS},
            "mrr@10": mrr(each_positive, cutoff=10),
            "queries": len(each_positive),
            "candidates": len(s.candidates),
        }
        curves[s.name] = {str(k): recall_at_k(each_positive, k) for k in CURVE_KS}
        shown.update()
    shown.close()
    results["m3t_heldout"] = section
    results["recall_curves"] = curves
    return results


def score_dimensions(
    mmeb: list[RetrievalSet],
    mbeir: MBeirBenchmark | None,
    cache: EncodingCache,
    dimensions: list[int],
    *,
    progress_every_s: float,
    share: QueryShare | None = None,
) -> dict[str, dict[str, Any]]:
    """Per width (a string key, as in JSON): the MMEB average and meta-tasks, and the M-BEIR average per pool kind.

    Scored from ``cache``'s vectors cut to each width (PrefixVectors): no item is encoded again.
    """
    scored = {}
    for dim in dimensions:
        results = score_sets(mmeb, mbeir, [], PrefixVectors(cache, dim), progress_every_s=progress_every_s, share=share)
        scored[str(dim)] = {
            "mmeb": {key: results["mmeb"][key] for key in ("average", "meta_tasks")},
            "mbeir": results["mbeir"] and {"average": results["mbeir"]["average"]},
        }
    return scored


def chance_mmeb_average(mmeb: list[RetrievalSet]) -> float:
    """hit@1 of a random ranking: the mean of 1/|candidates| over queries, averaged over datasets."""
    return mean(mean(1 / len(own) for own in own_candidate_lists(s)) for s in mmeb)


def read_evaluation_sets(data_root: str | Path, config: EvaluationConfig) -> dict[str, Any]:
    """Every set `evaluate` configures (mmeb, mbeir, m3t_heldout), read and checked; paths relative to ``data_root``.

    The result keeps ``data_root``, so that the ranks of a multi-process
    evaluation read the same sets (``evaluation.ranks``).
    """
    root = Path(data_root)
    sets: dict[str, Any] = {"mmeb": [], "mbeir": None, "m3t": [], "data_root": str(root)}
    if mmeb := config.mmeb:
        sets["mmeb"] = read_mmeb(root / mmeb.dir, root / mmeb.image_root, mmeb.dataset_tasks())
    if mbeir := config.mbeir:
        sets["mbeir"] = read_mbeir(root / mbeir.root, mbeir.tasks, **mbeir.reader_options())
    if m3t := config.m3t_heldout:
        sets["m3t"] = read_m3t_heldout(root / m3t.meta_file, root / m3t.image_root)
    return sets


def score_model(
    model_dir: str,
    sets: dict[str, Any],
    config: EvaluationConfig,
    format_params: dict[str, Any],
    backbone: dict[str, Any],
    *,
    device: torch.device | None = None,
    share: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
) -> dict[str, Any]:
    """Every metric for one model directory, loaded with the `backbone` settings (precision, attention, pixels).

    With `evaluate.pool_cache_dir`, candidate pools are encoded to disk
    (``model_encoding_cache``), so every rank of a run writes and reads the same pools.
    Queries are ranked on the model's device. As rank ``share`` of several,
    this rank scores its part of the queries; ``gather`` (a collective,
    QueryShare) brings every rank's parts together.
    """
    cache = model_encoding_cache(
        model_dir,
        format_params,
        backbone,
        batch_size=config.batch_size,
        pool_dir=config.pool_cache_dir or None,
        block_rows=config.pool_block_rows,
        device=device,
        share=share,
        barrier=barrier,
    )
    if config.dimensions:
        config.check_width(cache.embedder.hidden_size)  # before anything is encoded
    # ranks are counted where the model runs: a GPU's matrix products outpace the CPU's by far
    queries = QueryShare(*share, gather=gather, device=next(cache.embedder.parameters()).device)
    results = score_sets(
        sets["mmeb"], sets["mbeir"], sets["m3t"], cache, progress_every_s=config.progress_every_s, share=queries
    )
    if config.dimensions:
        results["dimensions"] = score_dimensions(
            sets["mmeb"],
            sets["mbeir"],
            cache,
            config.dimensions,
            progress_every_s=config.progress_every_s,
            share=queries,
        )
    return results


def model_encoding_cache(
    model_dir: str,
    format_params: dict[str, Any],
    backbone: dict[str, Any],
    *,
    batch_size: int,
    pool_dir: str | Path | None,
    block_rows: int,
    device: torch.device | None = None,
    share: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
) -> EncodingCache:
    """An EncodingCache over one model directory, loaded with the `backbone` settings (precision, attention, pixels).

    The model runs on ``device`` (default: the GPU where there is one, else
    the CPU). With ``pool_dir``, candidate pools are encoded to disk under a
    key naming everything the vectors depend on (EncodingCache.pool): here the
    model's identity (checkpoint_identity), the load settings and the kind of
    device, so every rank of a run, whichever GPU it has, writes and reads the
    same pools. Evaluation and hard-negative mining (muco_flow.mining) encode through it.
    """
    template = FormatConfig.from_params(format_params).templates.single_turn()
    settings = BackboneConfig.from_params(backbone)
    attn_implementation = resolve_attn_implementation(settings.attn_implementation)
    embedder, template = load_embedder(
        model_dir,
        default_template=template,
        dtype=settings.dtype,
        attn_implementation=attn_implementation,
        image_limits=settings.image,
    )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    embedder.to(device)
    model = f"{checkpoint_identity(model_dir)} {settings} {attn_implementation} {device.type}" if pool_dir else ""
    return EncodingCache(
        embedder,
        template,
        batch_size,
        pool_dir=pool_dir,
        model=model,
        block_rows=block_rows,
        share=share,
        barrier=barrier,
    )

"""One model's metrics on the evaluation sets: the model loaded as configured, its pools, every score.

``score_model`` is what the evaluate pipeline runs for the trained model and
for the baseline, in one process or, with ``share``, as one rank of several
(``evaluation.ranks``), each encoding its share of every pool's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from muco_flow.data.conversations import FormatConfig
from muco_flow.evaluation.datasets import read_m3t_heldout
from muco_flow.evaluation.encoded_pool import DEFAULT_BLOCK_ROWS
from muco_flow.evaluation.evaluate import EncodingCache, score_sets
from muco_flow.evaluation.mbeir import read_mbeir
from muco_flow.evaluation.mmeb import read_mmeb
from muco_flow.modeling.backbone import BackboneConfig, resolve_attn_implementation, resolve_checkpoint
from muco_flow.modeling.embedder import load_embedder
from muco_flow.training.model_identity import content_hash


def read_evaluation_sets(data_root: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Every set `evaluate` configures (mmeb, mbeir, m3t_heldout), read and checked; paths relative to ``data_root``.

    The result keeps ``data_root``, so that the ranks of a multi-process
    evaluation read the same sets (``evaluation.ranks``).
    """
    root = Path(data_root)
    sets: dict[str, Any] = {"mmeb": [], "mbeir": None, "m3t": [], "data_root": str(root)}
    if mmeb := params.get("mmeb"):
        sets["mmeb"] = read_mmeb(root / mmeb["dir"], root / mmeb["image_root"], mmeb["datasets"])
    if mbeir := params.get("mbeir"):
        options = {k: v for k, v in mbeir.items() if k not in ("root", "tasks")}
        sets["mbeir"] = read_mbeir(root / mbeir["root"], list(mbeir["tasks"]), **options)
    if m3t := params.get("m3t_heldout"):
        sets["m3t"] = read_m3t_heldout(root / m3t["meta_file"], root / m3t.get("image_root", "."))
    return sets


def checkpoint_identity(name_or_path: str) -> str:
    """Names a model's weights: a local directory by its content hash, a hub id by the commit it was loaded at.

    A hub id's files are in the Hugging Face cache once the model is loaded;
    the snapshot there is named by its commit, and a commit's files never change.
    """
    source, local = resolve_checkpoint(name_or_path)
    if local:
        return content_hash(source)
    from huggingface_hub import snapshot_download

    return f"{source}@{Path(snapshot_download(source, local_files_only=True)).name}"


def score_model(
    model_dir: str,
    sets: dict[str, Any],
    params: dict[str, Any],
    format_params: dict[str, Any],
    backbone: dict[str, Any],
    *,
    device: torch.device | None = None,
    share: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every metric for one model directory, loaded with the `backbone` settings (precision, attention, pixels).

    The model runs on ``device`` (default: the GPU where there is one, else
    the CPU). With `evaluate.pool_cache_dir`, candidate pools are encoded to
    disk under a key naming everything the vectors depend on
    (EncodingCache.pool): here the model's identity (checkpoint_identity), the
    load settings and the kind of device, so every rank of a run, whichever
    GPU it has, writes and reads the same pools.
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
    pool_dir = params.get("pool_cache_dir") or None
    model = f"{checkpoint_identity(model_dir)} {settings} {attn_implementation} {device.type}" if pool_dir else ""
    cache = EncodingCache(
        embedder,
        template,
        params["batch_size"],
        pool_dir=pool_dir,
        model=model,
        block_rows=params.get("pool_block_rows", DEFAULT_BLOCK_ROWS),
        share=share,
        barrier=barrier,
    )
    return score_sets(sets["mmeb"], sets["mbeir"], sets["m3t"], cache)

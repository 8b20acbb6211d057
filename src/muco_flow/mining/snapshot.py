"""An MMEB-train snapshot's hard negatives mined with a chosen model: what the `mine` node runs.

The model is the stage-1 model by default (the `train` pipeline's record), or
a model directory, or a registered version (``models:/name/3``,
``models:/name@alias``), resolved as `finetune.init_from` is
(training.init_model). Its vectors come from evaluation's encoding
(``model_encoding_cache``), with the pools and queries on disk under
`mine.pool_cache_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from muco_flow.data.ingest import MetaPart
from muco_flow.data.sources import file_sha256
from muco_flow.evaluation.encoding import checkpoint_identity, encoding_code_key
from muco_flow.evaluation.scoring import model_encoding_cache
from muco_flow.mining.config import MiningConfig
from muco_flow.mining.mine import TrainingFile, mine_hard_negatives
from muco_flow.tracking import source_commit
from muco_flow.training.init_model import resolve_init_model

# where a registered mining model is downloaded, below mine.pool_cache_dir
MODEL_DOWNLOAD_DIR = "mining_model"


def training_files(parts: list[MetaPart]) -> list[TrainingFile]:
    """The meta files of a local snapshot's parts, with where their images are (encoding opens image files)."""
    files = []
    for part in parts:
        source = part.source
        if "://" in source.uri:
            raise ValueError(f"mining reads a local MMEB-train snapshot; '{source.uri}' is not one (download it first)")
        image_root = getattr(source, "image_root", "")
        files.append(
            TrainingFile(
                dataset=part.dataset or Path(source.meta_file).parent.name,
                meta_file=source.meta_file,
                meta_path=source.meta_path(),
                image_root=Path(source.uri) / image_root,
                read_image=source.read_image,
            )
        )
    return files


def mined_snapshot_writer(
    parts: list[MetaPart],
    train_run: dict[str, Any],
    config: MiningConfig,
    backbone: dict[str, Any],
    format_params: dict[str, Any],
    tracking_uri: str,
) -> Callable[[Path], dict[str, Any]]:
    """A writer that mines ``parts``' rows into a folder (meta files and manifest) when the catalog saves it."""
    files = training_files(parts)
    model_dir, run_id = resolve_init_model(
        config.model, train_run, tracking_uri, Path(config.pool_cache_dir) / MODEL_DOWNLOAD_DIR
    )
    model = {
        "reference": config.model or "train_run",
        "model_dir": model_dir,
        "mlflow_run_id": run_id,
        "registered": config.model if config.model and config.model.startswith("models:/") else None,
        "content_hash": checkpoint_identity(model_dir),
    }
    source = {
        "uri": parts[0].source.uri if parts else "",
        "meta_files": [{"meta_file": f.meta_file, "sha256": file_sha256(f.meta_path)} for f in files],
    }

    def write(directory: Path) -> dict[str, Any]:
        try:
            cache = model_encoding_cache(
                model_dir,
                format_params,
                backbone,
                batch_size=config.batch_size,
                pool_dir=config.pool_cache_dir or None,  # empty: in memory (no resume)
                block_rows=config.pool_block_rows,
            )
            return mine_hard_negatives(
                files, cache, config, directory, model, source, source_commit(), encoding_code_key()
            )
        finally:
            for part in parts:
                part.source.close()

    return write

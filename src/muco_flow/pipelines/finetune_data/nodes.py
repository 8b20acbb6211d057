"""Nodes of the `finetune_data` pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muco_flow.data.ingest import IngestConfig, IngestQualityError, MetaPart, checked_manifest
from muco_flow.data.mmeb_train_conversations import FinetuneFormatConfig
from muco_flow.data.mmeb_train_formatting import format_mmeb_train_shards
from muco_flow.data.mmeb_train_ingest import REJECT_REASONS_MMEB_TRAIN, ingest_mmeb_train
from muco_flow.datasets.file_tree import TreeWriter
from muco_flow.modeling.backbone import BackboneConfig, load_processors


def plan_mmeb_train_ingest(parts: list[MetaPart], params: dict[str, Any]) -> TreeWriter:
    """A writer that streams every meta file of ``parts`` into shards when the catalog saves it."""
    config = IngestConfig.from_params(params)

    def write(directory: Path) -> None:
        try:
            ingest_mmeb_train(parts, directory, config)
        finally:
            for part in parts:
                part.source.close()

    return write


def check_mmeb_train_quality(shards_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """The manifest as a report; fails the run (SystemExit, as `ingest`) if too many rows were rejected."""
    config = IngestConfig.from_params(params)
    try:
        return checked_manifest(shards_dir, config.max_reject_fraction, REJECT_REASONS_MMEB_TRAIN)
    except IngestQualityError as err:
        raise SystemExit(f"ingest failed: {err}") from None


def format_finetune_samples(
    shards_dir: str, checkpoint: str, backbone: dict[str, Any], params: dict[str, Any]
) -> TreeWriter:
    """A writer that tokenizes every ingested MMEB-train sample into stage-2 pieces when saved."""
    config = FinetuneFormatConfig.from_params(params)
    settings = BackboneConfig.from_params(backbone)
    tokenizer, image_processor = load_processors(checkpoint, trust_remote_code=settings.trust_remote_code)
    return lambda directory: format_mmeb_train_shards(Path(shards_dir), directory, tokenizer, image_processor, config)

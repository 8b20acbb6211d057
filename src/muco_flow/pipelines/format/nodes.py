"""Nodes of the `format` pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muco_flow.data.conversations import FormatConfig
from muco_flow.data.formatting import format_m3t_shards
from muco_flow.datasets.file_tree import TreeWriter
from muco_flow.modeling.backbone import BackboneConfig, load_processors


def format_conversations(
    shards_dir: str, checkpoint: str, backbone: dict[str, Any], params: dict[str, Any]
) -> TreeWriter:
    """A writer that tokenizes every ingested sample into conversations when saved."""
    config = FormatConfig.from_params(params)
    settings = BackboneConfig.from_params(backbone)
    tokenizer, image_processor = load_processors(
        checkpoint, trust_remote_code=settings.trust_remote_code, image_limits=settings.image
    )
    return lambda directory: format_m3t_shards(Path(shards_dir), directory, tokenizer, image_processor, config)

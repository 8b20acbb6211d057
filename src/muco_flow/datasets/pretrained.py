"""A Kedro dataset for a checkpoint that is read, never written: a hub id or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from muco_flow.modeling.backbone import missing_checkpoint_files, resolve_checkpoint


class PretrainedCheckpointDataset(AbstractDataset[None, str]):
    """Loads as ``name_or_path`` once checked: a complete model directory or an ``org/name`` hub id.

    A directory is checked for the files loading reads (config, tokenizer,
    image processor, every weight shard), so a partial download fails here.

    The `cluster` environment declares ``backbone_checkpoint`` with this type,
    where `base` declares the tiny preset that the `backbone` pipeline writes.
    """

    def __init__(self, name_or_path: str, metadata: dict[str, Any] | None = None) -> None:
        self._name_or_path = name_or_path
        self.metadata = metadata

    def load(self) -> str:
        try:
            source, local_only = resolve_checkpoint(self._name_or_path)
            missing = missing_checkpoint_files(Path(source)) if local_only else []
        except (FileNotFoundError, ValueError) as err:
            raise DatasetError(str(err)) from None
        if missing:
            raise DatasetError(
                f"backbone_checkpoint '{self._name_or_path}' is not a complete Qwen2-VL model directory; "
                f"missing: {', '.join(missing)}"
            )
        return self._name_or_path

    def save(self, data: None) -> None:
        raise DatasetError(
            f"backbone_checkpoint is the pretrained checkpoint '{self._name_or_path}' in this environment; "
            "the `backbone` pipeline (the tiny preset) does not apply here"
        )

    def _describe(self) -> dict[str, Any]:
        return {"name_or_path": self._name_or_path}

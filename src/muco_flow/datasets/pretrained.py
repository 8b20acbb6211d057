"""A Kedro dataset for a checkpoint that is read, never written: a hub id or a local directory."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

from muco_flow.modeling.backbone import resolve_checkpoint


class PretrainedCheckpointDataset(AbstractDataset[None, str]):
    """Loads as ``name_or_path`` once checked: an existing directory or an ``org/name`` hub id.

    The `cluster` environment declares ``backbone_checkpoint`` with this type,
    where `base` declares the tiny preset that the `backbone` pipeline writes.
    """

    def __init__(self, name_or_path: str, metadata: dict[str, Any] | None = None) -> None:
        self._name_or_path = name_or_path
        self.metadata = metadata

    def load(self) -> str:
        try:
            resolve_checkpoint(self._name_or_path)
        except FileNotFoundError as err:
            raise DatasetError(str(err)) from None
        return self._name_or_path

    def save(self, data: None) -> None:
        raise DatasetError(
            f"backbone_checkpoint is the pretrained checkpoint '{self._name_or_path}' in this environment; "
            "the `backbone` pipeline (the tiny preset) does not apply here"
        )

    def _describe(self) -> dict[str, Any]:
        return {"name_or_path": self._name_or_path}

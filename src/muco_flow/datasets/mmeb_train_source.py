"""A Kedro dataset that opens MuCo's MMEB-train snapshot (many meta files), local or on S3, for streaming."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

from muco_flow.data.ingest import MetaPart
from muco_flow.data.mmeb_train import META_GLOB
from muco_flow.data.mmeb_train_ingest import open_meta_parts
from muco_flow.data.sources import SourceError
from muco_flow.datasets.snapshot_source import note_snapshot_written


class MMEBTrainSourceDataset(AbstractDataset[str, list[MetaPart]]):
    """Loads one part per meta file matching ``meta_glob`` under ``uri`` (a directory or ``s3://bucket/prefix``).

    ``image_root`` is where the images are, below ``uri`` (MuCo's
    ``image_folder``); the rows' image paths are relative to it. Credentials
    come from Kedro's credentials, as for M3TSnapshotSourceDataset, and are
    never part of the description.
    """

    def __init__(
        self,
        uri: str,
        meta_glob: str = META_GLOB,
        image_root: str = "",
        credentials: dict[str, Any] | None = None,
        s3_options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._uri, self._meta_glob, self._image_root = uri, meta_glob, image_root
        self._s3_options = {**(s3_options or {}), **(credentials or {})}
        self.metadata = metadata

    def load(self) -> list[MetaPart]:
        try:
            return open_meta_parts(self._uri, self._meta_glob, self._image_root, self._s3_options)
        except SourceError as err:
            # chained, so that the run ends with this one line (hooks.OneLineInputErrors)
            raise DatasetError(str(err)) from err

    def save(self, data: str) -> None:
        note_snapshot_written(self._uri, data, "mmeb_train_source")

    def _describe(self) -> dict[str, Any]:
        return {"uri": self._uri, "meta_glob": self._meta_glob, "image_root": self._image_root}

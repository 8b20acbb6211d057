"""A Kedro dataset that opens an M3T snapshot, local or on S3, for streaming."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from muco_flow.data.sources import SnapshotSource, SourceError, open_snapshot

logger = logging.getLogger(__name__)


def note_snapshot_written(uri: str, written_dir: str, source_name: str) -> None:
    """A source's save: the sample pipeline names the directory it wrote; nothing is copied.

    Saving makes the hand-off an edge of the Kedro graph (the sample before
    ingestion, under every runner). A source pointed elsewhere (a real
    snapshot, ``s3://``) is read from there: the log says so, the sample is
    left where it was written.
    """
    if uri.startswith("s3://") or Path(uri).resolve() != Path(written_dir).resolve():
        logger.warning("%s is %s, not the sample written at %s: ingestion reads %s", source_name, uri, written_dir, uri)


class M3TSnapshotSourceDataset(AbstractDataset[str, SnapshotSource]):
    """Loads a SnapshotSource for ``uri`` (a directory or ``s3://bucket/prefix``).

    ``credentials`` come from Kedro's credentials (conf/local/credentials.yml);
    keys left out fall back to boto3's chain, the environment included. They
    are never part of this dataset's description, so never in Kedro's logs.
    """

    def __init__(
        self,
        uri: str,
        meta_file: str,
        credentials: dict[str, Any] | None = None,
        s3_options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._uri, self._meta_file = uri, meta_file
        self._s3_options = {**(s3_options or {}), **(credentials or {})}
        self.metadata = metadata

    def load(self) -> SnapshotSource:
        try:
            return open_snapshot(self._uri, self._meta_file, self._s3_options)
        except SourceError as err:
            # chained, so that the run ends with this one line (hooks.OneLineInputErrors)
            raise DatasetError(str(err)) from err

    def save(self, data: str) -> None:
        note_snapshot_written(self._uri, data, "m3t_source")

    def _describe(self) -> dict[str, Any]:
        return {"uri": self._uri, "meta_file": self._meta_file}

"""A Kedro dataset that opens an M3T snapshot, local or on S3, for streaming."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

from muco_flow.data.sources import SnapshotSource, SourceError, open_snapshot


class M3TSnapshotSourceDataset(AbstractDataset[None, SnapshotSource]):
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

    def save(self, data: None) -> None:
        raise DatasetError("an M3T snapshot source is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"uri": self._uri, "meta_file": self._meta_file}

"""Nodes of the `ingest` pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muco_flow.data.ingest import IngestConfig, IngestQualityError, checked_manifest
from muco_flow.data.m3t_ingest import REJECT_REASONS_M3T, ingest_m3t_snapshot
from muco_flow.data.meta_file import MetaFileError
from muco_flow.data.sources import SnapshotSource
from muco_flow.datasets.file_tree import TreeWriter


def plan_ingest(source: SnapshotSource, params: dict[str, Any]) -> TreeWriter:
    """A writer that streams ``source`` into shards when the catalog saves it."""
    config = IngestConfig.from_params(params)

    def write(directory: Path) -> None:
        # A damaged input file is a verdict on the data: one line naming the file and the
        # problem, not a traceback; the dataset then removes the half-written output.
        try:
            ingest_m3t_snapshot(source, directory, config)
        except MetaFileError as err:
            raise SystemExit(f"ingest failed: {err}") from None
        finally:
            source.close()

    return write


def check_ingest_quality(shards_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """The manifest as a report; fails the run if too many rows were rejected.

    Too many rejects is a verdict on the data, not a bug: the run ends with
    the summary alone (SystemExit), not a traceback through Kedro's runner.
    """
    try:
        return checked_manifest(shards_dir, IngestConfig.from_params(params).max_reject_fraction, REJECT_REASONS_M3T)
    except IngestQualityError as err:
        raise SystemExit(f"ingest failed: {err}") from None

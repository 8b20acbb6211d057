"""Nodes of the `sample` pipeline."""

from __future__ import annotations

from typing import Any

from muco_flow.sample.m3t_mini import MiniSampleConfig, generate_m3t_mini


def generate_m3t_mini_sample(params: dict[str, Any]) -> dict[str, bytes]:
    """The M3T-mini snapshot (train, held-out, MMEB and M-BEIR sets) as files."""
    return generate_m3t_mini(MiniSampleConfig(**params))


def offer_sample_as_sources(snapshot_dir: str) -> tuple[str, str]:
    """The sample's directory, saved as the M3T and MMEB-train sources (nothing is copied).

    It makes the hand-off a dataset one node writes and the next reads, so
    ingestion waits for the sample under every runner.
    """
    return snapshot_dir, snapshot_dir

"""Nodes of the `sample` pipeline."""

from __future__ import annotations

from typing import Any

from muco_flow.sample.m3t_mini import MiniSampleConfig, generate_m3t_mini


def generate_m3t_mini_sample(params: dict[str, Any]) -> dict[str, bytes]:
    """The M3T-mini snapshot (train, held-out, MMEB and M-BEIR sets) as files."""
    return generate_m3t_mini(MiniSampleConfig(**params))

"""Shared fixtures: a small M3T-mini sample and the tiny backbone built from conf/base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from muco_flow import settings
from muco_flow.data.m3t_mini import MiniSampleConfig, generate_m3t_mini
from muco_flow.datasets import FileTreeDataset
from muco_flow.pipelines.backbone.nodes import build_tiny_backbone_preset, collect_tokenizer_corpus

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SMALL_SAMPLE = MiniSampleConfig(
    seed=7, train_images=24, heldout_images=6, eval_queries_per_dataset=12, eval_candidates=5
)


def load_params(env: str = "base") -> dict:
    """Parameters as a Kedro run in `env` sees them (base, then env's overrides)."""
    args = {**settings.CONFIG_LOADER_ARGS, "default_run_env": env}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **args)
    return loader["parameters"]


@pytest.fixture(scope="session")
def small_sample_files() -> dict[str, bytes]:
    return generate_m3t_mini(SMALL_SAMPLE)


@pytest.fixture(scope="session")
def small_sample_root(small_sample_files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "m3t_mini"
    FileTreeDataset(str(root)).save(small_sample_files)
    return root


@pytest.fixture(scope="session")
def tiny_preset() -> dict:
    return load_params()["backbone"]["tiny_preset"]


@pytest.fixture(scope="session")
def tiny_backbone_dir(small_sample_root, tiny_preset, tmp_path_factory) -> Path:
    corpus = collect_tokenizer_corpus(str(small_sample_root))
    root = tmp_path_factory.mktemp("models") / "tiny-qwen2-vl"
    FileTreeDataset(str(root)).save(build_tiny_backbone_preset(corpus, tiny_preset))
    return root

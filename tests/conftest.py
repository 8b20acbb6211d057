"""Shared fixtures: a small M3T-mini sample and the tiny backbone built from conf/base."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader

from muco_flow import settings
from muco_flow.data.conversations import FormatConfig
from muco_flow.datasets import FileTreeDataset
from muco_flow.modeling.backbone import family_preset, load_backbone
from muco_flow.modeling.embedder import EmbedderSettings, MuCoEmbedder
from muco_flow.modeling.families import DEFAULT_FAMILY
from muco_flow.pipelines.backbone.nodes import build_tiny_backbone_preset, collect_tokenizer_corpus
from muco_flow.sample.m3t_mini import MiniSampleConfig, generate_m3t_mini

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SMALL_SAMPLE = MiniSampleConfig(
    seed=7, train_images=24, heldout_images=6, eval_queries_per_dataset=12, eval_candidates=5
)


# Opt-in tiers: marker -> (the pytest option that runs it, what it holds). `make test` leaves them out so that
# the suite keeps its 45 minutes; `make test-all` runs them (docs/development.md, "The opt-in tiers").
OPT_IN_TIERS = {
    "every_family": ("--every-family", "the real-width runs of the families the suite leaves out"),
    "full_size": ("--full-size", "the default run at its full size (`kedro run` with every default: about 9 minutes)"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    for marker, (option, holds) in OPT_IN_TIERS.items():
        parser.addoption(option, action="store_true", help=f"also run the tests marked {marker}: {holds}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) each opt-in tier's tests unless its option is given."""
    left_out = [marker for marker, (option, _) in OPT_IN_TIERS.items() if not config.getoption(option)]
    chosen = [item for item in items if not any(item.get_closest_marker(marker) for marker in left_out)]
    if len(chosen) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
        items[:] = chosen


def config_loader(env: str = "base") -> OmegaConfigLoader:
    """Configuration as a Kedro run in `env` sees it (base, then env's overrides)."""
    args = {**settings.CONFIG_LOADER_ARGS, "default_run_env": env}
    return OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **args)


def load_params(env: str = "base") -> dict:
    return config_loader(env)["parameters"]


# with_value(params, "a.b", DELETE) removes the setting instead of changing it
DELETE = object()


def with_value(params: dict, dotted: str, value) -> dict:
    """A deep copy of a parameter block with the setting at ``dotted`` (e.g. "promotion.margin") set to ``value``."""
    changed = copy.deepcopy(params)
    *parents, name = dotted.split(".")
    node = changed
    for parent in parents:
        node = node[parent]
    if value is DELETE:
        del node[name]
    else:
        node[name] = value
    return changed


@pytest.fixture(scope="session")
def small_sample_files() -> dict[str, bytes]:
    return generate_m3t_mini(SMALL_SAMPLE)


@pytest.fixture(scope="session")
def small_sample_root(small_sample_files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "m3t_mini"
    FileTreeDataset(str(root)).save(small_sample_files)
    return root


@pytest.fixture(scope="session")
def tiny_presets() -> dict:
    """conf/base's whole `backbone.tiny_preset` block (every family's)."""
    return load_params()["backbone"]["tiny_preset"]


@pytest.fixture(scope="session")
def tiny_preset(tiny_presets) -> dict:
    """The default family's (Qwen2-VL's) tiny preset, resolved."""
    return family_preset(tiny_presets, DEFAULT_FAMILY)


@pytest.fixture(scope="session")
def family_backbone_dir(small_sample_root, tiny_presets, tmp_path_factory) -> Callable[[str], Path]:
    """The tiny preset of a family (model_type), built once per session on first use."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            corpus = collect_tokenizer_corpus(str(small_sample_root))
            root = tmp_path_factory.mktemp("models") / f"tiny-{family}"
            FileTreeDataset(str(root)).save(build_tiny_backbone_preset(corpus, tiny_presets, family))
            built[family] = root
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_backbone_dir(family_backbone_dir) -> Path:
    return family_backbone_dir(DEFAULT_FAMILY)


@pytest.fixture(scope="session")
def model_dir(tiny_backbone_dir, tmp_path_factory) -> Path:
    """A model directory as training writes it: LoRA merged, muco_embedder.json with the encode template."""
    torch.manual_seed(0)
    model = MuCoEmbedder(load_backbone(str(tiny_backbone_dir)), EmbedderSettings())
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the vectors
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    directory = tmp_path_factory.mktemp("trained") / "model"
    model.save_merged(directory, FormatConfig.from_params(load_params()["format"]).templates.single_turn())
    return directory


KEDRO = str(Path(sys.executable).with_name("kedro"))
SMALL_RUN_PARAMS = (
    "m3t_mini.train_images=24,m3t_mini.heldout_images=6,m3t_mini.eval_queries_per_dataset=8,m3t_mini.eval_candidates=4"
)


def new_project(root: Path) -> Path:
    """The project's configuration in a fresh directory ``root``, with empty data layers."""
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("credentials.yml"))
    (root / "src").mkdir()  # kedro checks it exists; muco_flow is imported from the install
    return root


@pytest.fixture
def project(tmp_path) -> Path:
    return new_project(tmp_path / "project")


def kedro_run(
    project: Path, *args: str, env: dict | None = None, check: bool = True, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """`kedro run ARGS` in ``project``, as a user would type it; killed after ``timeout_s`` (a hang guard)."""
    # a wide terminal, so that rich does not wrap the messages tests look for
    full_env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200", **(env or {})}
    result = subprocess.run(
        [KEDRO, "run", *args], cwd=project, env=full_env, capture_output=True, text=True, timeout=timeout_s
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result

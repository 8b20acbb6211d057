"""The `evaluate` parameters (conf/base/parameters_evaluate.yml) as one typed, validated object.

``EvaluationConfig.from_dict`` is the one way in: the evaluate nodes build it
from their parameters, each rank of a multi-process evaluation from the
settings the node hands it (``to_dict`` wrote them). A bad value stops the
run before any set is read or model loaded, with one error naming its dotted
key (``evaluate.batch_size must be a positive integer, got 'x'``).

As in TrainingConfig, no field has a default: the YAML is where every value
lives. A set (``mmeb``, ``mbeir``, ``m3t_heldout``) set to null is not scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muco_flow.evaluation.mbeir import POOL_KINDS
from muco_flow.evaluation.mmeb import INSTRUCT_PARSERS, META_TASKS
from muco_flow.modeling.matryoshka import dimensions_problem
from muco_flow.settings_schema import read_settings, setting

PARAMETERS_FILE = "conf/base/parameters_evaluate.yml"


class EvaluationConfigError(ValueError):
    """An `evaluate` parameter is unknown, missing, of the wrong type or out of range; names its dotted key."""


@dataclass(frozen=True)
class MmebDatasetSettings:
    meta_task: str = field(metadata=setting(choices=META_TASKS))
    # how the Instruct layout's rows become text; null: a v1 download, encoded as written
    parser: str | None = field(metadata=setting(choices=tuple(INSTRUCT_PARSERS)))


@dataclass(frozen=True)
class MmebSettings:
    dir: str
    image_root: str
    datasets: dict[str, MmebDatasetSettings]

    def dataset_tasks(self) -> dict[str, dict[str, Any]]:
        """``datasets`` as read_mmeb takes them: name -> {meta_task, parser}."""
        return {name: dataclasses.asdict(dataset) for name, dataset in self.datasets.items()}


@dataclass(frozen=True)
class MbeirSettings:
    root: str
    split: str
    instructions: str | None
    instruction_seed: int
    global_pool: str
    pools: list[str] = field(metadata=setting(choices=POOL_KINDS))
    tasks: list[str]
    local_pools: dict[str, str]
    recall_ks: dict[str, list[int]] = field(metadata=setting(minimum=1))
    average_k: dict[str, int] = field(metadata=setting(minimum=1))

    def reader_options(self) -> dict[str, Any]:
        """read_mbeir's keyword arguments (all but ``root`` and ``tasks``)."""
        options = dataclasses.asdict(self)
        del options["root"], options["tasks"]
        return options


@dataclass(frozen=True)
class M3tHeldoutSettings:
    meta_file: str
    image_root: str


@dataclass(frozen=True)
class EvaluationConfig:
    """The `evaluate` parameters; conf/base/parameters_evaluate.yml says what each one does."""

    batch_size: int = field(metadata=setting(minimum=1))
    progress_every_s: float = field(metadata=setting(minimum=0, exclusive_minimum=True))
    pool_cache_dir: str | None
    pool_block_rows: int = field(metadata=setting(minimum=1))
    processes: int = field(metadata=setting(minimum=1))
    mlflow_metrics: list[str]
    dvc_metrics: list[str]
    model: str | None
    baseline: str
    # MMEB and M-BEIR headline numbers also at these widths (Matryoshka prefixes of the same vectors); null: none
    dimensions: list[int] | None = field(metadata=setting(minimum=1))
    mmeb: MmebSettings | None
    mbeir: MbeirSettings | None
    m3t_heldout: M3tHeldoutSettings | None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (problem := dimensions_problem(self.dimensions)):
            raise EvaluationConfigError(f"evaluate.dimensions {problem}")

    def check_width(self, width: int) -> None:
        """Refuses dimensions wider than the model's vectors (known once the model is loaded)."""
        if self.dimensions is not None and (problem := dimensions_problem(self.dimensions, width)):
            raise EvaluationConfigError(f"evaluate.dimensions {problem}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluationConfig:
        """The settings in ``values`` (the `evaluate` parameters, or ``to_dict``'s output), checked.

        Raises EvaluationConfigError naming the dotted key (``evaluate.…``) of a setting that is
        unknown, missing, of the wrong type or out of range.
        """
        return read_settings(cls, values, "evaluate", PARAMETERS_FILE, EvaluationConfigError)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the parameters hold them (JSON-serialisable); ``from_dict`` reads them back."""
        return dataclasses.asdict(self)

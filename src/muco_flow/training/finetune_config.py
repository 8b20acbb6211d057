"""The `finetune` parameters (conf/base/parameters_finetune.yml) as one typed, validated object.

Its `training` block is laid over the `training` parameters
(``finetuning_settings``); TrainingConfig checks the result, so here it is
only a mapping. What this checks is the rest: an unknown key, or an
``init_from`` that is not a string, stops the run naming its dotted key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from muco_flow.settings_schema import read_settings

PARAMETERS_FILE = "conf/base/parameters_finetune.yml"


class FinetuneConfigError(ValueError):
    """A `finetune` parameter is unknown, missing or of the wrong type; names its dotted key."""


@dataclass(frozen=True)
class FinetuneConfig:
    """The `finetune` parameters; conf/base/parameters_finetune.yml says what each one does."""

    # null: the model `train` wrote; a model directory or a models:/ URI (training/init_model.py)
    init_from: str | None
    # `training` settings for stage 2 (null: none changed); TrainingConfig checks them once merged
    training: dict[str, Any] | None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """The settings in ``values`` (the `finetune` parameters), checked; raises FinetuneConfigError."""
        return read_settings(cls, values, "finetune", PARAMETERS_FILE, FinetuneConfigError)

"""The `cocoa` parameters (conf/base/parameters_cocoa.yml): CoCoA's stage 0 as one typed, validated object.

Its `training` block is laid over the `training` parameters, as
`finetune.training` is for stage 2; TrainingConfig checks the result. The
rest decides the weights, so all of it but `training` enters the resume
fingerprint (``objective``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muco_flow.settings_schema import read_settings, setting

PARAMETERS_FILE = "conf/base/parameters_cocoa.yml"


class CocoaConfigError(ValueError):
    """A `cocoa` parameter is unknown, missing, of the wrong type or out of range; names its dotted key."""


@dataclass(frozen=True)
class CocoaLossWeights:
    """Each reconstruction loss's weight in its phase's loss."""

    text: float = field(metadata=setting(minimum=0))
    image: float = field(metadata=setting(minimum=0))
    bridged: float = field(metadata=setting(minimum=0))


@dataclass(frozen=True)
class CocoaConfig:
    """The `cocoa` parameters; conf/base/parameters_cocoa.yml says what each one does."""

    warmup_steps: int = field(metadata=setting(minimum=0))
    bridged_steps: int = field(metadata=setting(minimum=0))
    text_mask_ratio: float = field(metadata=setting(minimum=0.01, maximum=0.99))
    image_mask_ratio: float = field(metadata=setting(minimum=0.01, maximum=0.99))
    normalize_targets: bool
    loss_weights: CocoaLossWeights
    # `training` settings for stage 0 (null: none changed); TrainingConfig checks them once merged
    training: dict[str, Any] | None

    def __post_init__(self) -> None:
        if self.warmup_steps + self.bridged_steps < 1:
            raise CocoaConfigError("cocoa.warmup_steps + cocoa.bridged_steps must be at least 1, got 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CocoaConfig:
        """The settings in ``values`` (the `cocoa` parameters), checked; raises CocoaConfigError."""
        return read_settings(cls, values, "cocoa", PARAMETERS_FILE, CocoaConfigError)

    @property
    def steps(self) -> int:
        """Stage 0's optimizer steps: the warm-up's, then the bridged phase's."""
        return self.warmup_steps + self.bridged_steps

    def objective(self) -> dict[str, Any]:
        """What the ranks need to build the objective (CocoaObjective's settings and the phase lengths)."""
        values = dataclasses.asdict(self)
        del values["training"]
        return values

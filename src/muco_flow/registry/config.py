"""The `registry` parameters (conf/base/parameters_registry.yml) as one typed, validated object.

``RegistryConfig.from_dict`` is the one way in: the register and promote nodes
build it before they reach MLflow, so a bad value stops the run with one error
naming its dotted key (``registry.promotion.margin must be a number, got 'x'``).
As in the other typed blocks, no field has a default: the YAML is where every
value lives.

``serving`` stays a mapping: ServingLimits (serving.py) is the one place that
checks it, because the served model reads the same values again, with the
``MUCO_SERVE_*`` overrides, from the version's model_config. ``from_dict`` asks
it here too, so that a bad limit is refused before registration starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from muco_flow.registry.promotion import PromotionPolicy
from muco_flow.registry.serving import ServingLimits
from muco_flow.settings_schema import read_settings

PARAMETERS_FILE = "conf/base/parameters_registry.yml"


class RegistryConfigError(ValueError):
    """A `registry` parameter is unknown, missing or of the wrong type; names its dotted key."""


@dataclass(frozen=True)
class PromotionSettings:
    margin: float  # the challenger must beat the champion by at least this
    promote_first: bool  # with no champion yet: make the challenger champion?


@dataclass(frozen=True)
class RegistryConfig:
    """The `registry` parameters; conf/base/parameters_registry.yml says what each one does."""

    model_name: str
    primary_metric: str
    allow_older_challenger: bool
    promotion: PromotionSettings
    serving: dict[str, Any]  # the ServingLimits stored with a new version (checked by ServingLimits)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RegistryConfig:
        """The settings in ``values`` (the `registry` parameters), checked.

        Raises RegistryConfigError naming the dotted key (``registry.…``) of a setting that is
        unknown, missing or of the wrong type; ValueError from ServingLimits for a bad
        ``registry.serving`` limit (it names ``registry.serving.<limit>`` too).
        """
        config = read_settings(cls, values, "registry", PARAMETERS_FILE, RegistryConfigError)
        ServingLimits.from_config(config.serving)  # no environment: MUCO_SERVE_* applies where it is served
        return config

    def promotion_policy(self) -> PromotionPolicy:
        """The rule `promote` applies: the primary metric, the margin, and whether a first model is crowned."""
        return PromotionPolicy(self.primary_metric, self.promotion.margin, self.promotion.promote_first)

"""The `mine` parameters (conf/base/parameters_mine.yml) as one typed, validated object."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muco_flow.mining.filters import NegativeFilter
from muco_flow.settings_schema import read_settings, setting

PARAMETERS_FILE = "conf/base/parameters_mine.yml"


class MiningConfigError(ValueError):
    """A `mine` parameter is unknown, missing, of the wrong type or out of range; names its dotted key."""


@dataclass(frozen=True)
class MiningConfig:
    """The `mine` parameters; conf/base/parameters_mine.yml says what each one does."""

    model: str | None
    batch_size: int = field(metadata=setting(minimum=1))
    pool_cache_dir: str
    pool_block_rows: int = field(metadata=setting(minimum=1))
    query_block_rows: int = field(metadata=setting(minimum=1))
    search_depth: int = field(metadata=setting(minimum=1))
    filter: NegativeFilter

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MiningConfig:
        """The settings in ``values`` (the `mine` parameters), checked; MiningConfigError names a bad key."""
        return read_settings(cls, values, "mine", PARAMETERS_FILE, MiningConfigError)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

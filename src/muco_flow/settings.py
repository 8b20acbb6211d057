"""Kedro settings: configuration comes from conf/ through OmegaConfigLoader."""

from kedro.config import OmegaConfigLoader

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    # `--env cluster` selects the multi-GPU configuration instead.
    "default_run_env": "local",
    # An environment lists only the keys it changes (deep merge), so
    # conf/cluster need not repeat everything in conf/base.
    "merge_strategy": {"parameters": "soft"},
}

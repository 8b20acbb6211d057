"""Kedro settings: configuration comes from conf/ through OmegaConfigLoader."""

from kedro.config import OmegaConfigLoader

from muco_flow.hooks import KedroRunContext, TrackingServerCheck

# Before any node runs: the MLflow server a run will log to must answer; and
# nodes that record the run learn which `kedro run` it is.
HOOKS = (TrackingServerCheck(), KedroRunContext())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    # `--env cluster` selects the multi-GPU configuration instead.
    "default_run_env": "local",
    # An environment lists only the keys it changes (deep merge), so
    # conf/cluster need not repeat everything in conf/base.
    "merge_strategy": {"parameters": "soft"},
}

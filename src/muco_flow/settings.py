"""Kedro settings: configuration comes from conf/ through OmegaConfigLoader."""

import logging
import sys

from kedro.config import OmegaConfigLoader

from muco_flow.hooks import KedroRunContext, MovedProjectStore, OneLineInputErrors, RunSummary, TrackingServerCheck

# Before any node runs: the MLflow server a run will log to must answer; and
# nodes that record the run learn which `kedro run` it is. An unreadable
# input ends a run with one line. A run that evaluated or registered a model
# ends with its score, version, MLflow run, report and next commands.
HOOKS = (TrackingServerCheck(), MovedProjectStore(), KedroRunContext(), OneLineInputErrors(), RunSummary())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    # `--env cluster` selects the multi-GPU configuration instead.
    "default_run_env": "local",
    # An environment lists only the keys it changes (deep merge), so
    # conf/cluster need not repeat everything in conf/base.
    "merge_strategy": {"parameters": "soft"},
}


def _rich_console_on_a_terminal() -> None:
    """conf/logging.yml logs plain lines; on a terminal, Kedro's Rich handler replaces its console handler.

    Rich wraps at 80 columns when output goes to a file, which breaks log lines
    in SLURM files; a YAML logging config cannot ask whether stdout is a TTY.
    """
    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler and h.stream is sys.stdout]
    if not plain or not sys.stdout.isatty():
        return
    from kedro.logging import RichHandler

    for handler in plain:
        root.removeHandler(handler)
    root.addHandler(RichHandler(rich_tracebacks=True))


_rich_console_on_a_terminal()

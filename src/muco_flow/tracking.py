"""MLflow helpers shared by training, evaluation and registration."""

from __future__ import annotations

import contextlib
import fnmatch
import getpass
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UNKNOWN_COMMIT = "unknown"
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI wins, then configuration, then the embedded SQLite store."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fails fast, naming the URI, if an HTTP tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as err:
        raise ConnectionError(
            f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); "
            "start it, or set MLFLOW_TRACKING_URI / mlflow.tracking_uri"
        ) from None


# The columns of MLflow's SQL store (3.x) that hold an artifact folder as an absolute path
ARTIFACT_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def relocate_project_store(uri: str, project: Path, artifact_folder: str = "mlruns") -> str | None:
    """Points a moved or copied project's SQLite store at the project's own artifact folder.

    MLflow writes every artifact location into the store as an absolute path
    when it creates it, so a copy of the project would read and write the
    original's ``mlruns/`` (or fail where that is gone). When the store is the
    project's own file and its experiments name ``<elsewhere>/mlruns/<id>``
    while ``<project>/mlruns/<id>`` is here (the artifacts came along), every
    location under the old folder is rewritten to the new one. A store whose
    artifacts were configured to live elsewhere has no such folder here and is
    left alone. Returns the old folder, or None when nothing was moved.
    """
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return None
    database = (project / uri.removeprefix("sqlite:///")).resolve()
    root = (project / artifact_folder).resolve()
    if not database.is_file() or not database.is_relative_to(project.resolve()):
        return None
    # closing(): sqlite3's own context manager commits but leaves the file open
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None
        old = None
        for experiment_id, location in connection.execute("SELECT experiment_id, artifact_location FROM experiments"):
            path = Path(urlparse(location).path if location.startswith("file:") else location)
            elsewhere = path.name == str(experiment_id) and path.parent.name == artifact_folder and path.parent != root
            if elsewhere and (root / str(experiment_id)).is_dir():  # ...and its artifacts are here
                old = str(path.parent)
                break
        if old is None:
            return None
        for table, column in ARTIFACT_LOCATION_COLUMNS:
            if table not in tables:
                continue
            for before, after in ((f"{old}/", f"{root}/"), (f"file://{old}/", f"file://{root}/")):
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (after, len(before) + 1, len(before), before),
                )
    logger.warning("the project's MLflow store named artifacts under %s (moved or copied): now %s", old, root)
    return old


# A locked SQLite store: how often and how long registry writes wait for it (see ``retry_while_locked``)
LOCKED_STORE_ATTEMPTS = 6
LOCKED_STORE_FIRST_WAIT_S = 1.0


def is_locked_store(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) is SQLite's "database is locked": another writer holds the store."""
    seen: BaseException | None = err
    while seen is not None:
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_while_locked(
    call: Callable[[], T],
    *,
    attempts: int = LOCKED_STORE_ATTEMPTS,
    first_wait_s: float = LOCKED_STORE_FIRST_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried again while a SQLite store is locked by another writer: at most ``attempts`` times,
    waiting ``first_wait_s``, then twice as long each time (1 + 2 + 4 + 8 + 16 s by default).

    MLflow's SQL store already waits for the lock inside each request (SQLite's
    busy timeout); a store that stays locked longer, or a lock that SQLite
    refuses at once to avoid a deadlock, fails the request with "database is
    locked". The writes retried here are each one transaction that either
    happened or did not, so trying again is safe. A small loop rather than a
    retry library: only this one error is retried, and no dependency is added
    for it. Any other error, and the last attempt's, is raised as it is.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts or not is_locked_store(err):
                raise
            wait_s = first_wait_s * 2 ** (attempt - 1)
            logger.warning(
                "the MLflow store is locked by another writer; trying again in %.0f s (%d of %d)",
                wait_s,
                attempt + 1,
                attempts,
            )
            sleep(wait_s)
    raise AssertionError("unreachable")


def source_commit(directory: str | Path = ".") -> str:
    """The git commit of ``directory``, with ``-dirty`` if tracked files changed; "unknown" outside git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return UNKNOWN_COMMIT
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN_COMMIT
    return head.stdout.strip() + ("-dirty" if dirty else "")


def canonical_hash(value: Any) -> str:
    """sha256 of ``value`` as sorted JSON: the same for equal manifests and parameter sets."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow params: dotted keys, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def run_name(template: str, values: Mapping[str, Any]) -> str:
    """``template`` (str.format fields: dotted keys of ``values``) filled in; names the missing key if one is."""
    import string

    flat = {**flatten(values)}
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
    missing = [f for f in fields if f not in flat]
    if missing:
        raise ValueError(f"training.run_name {template!r} names {missing}, which are not parameters of the run")
    for field in fields:  # dotted names are not format() identifiers: filled in one by one
        template = template.replace("{" + field + "}", flat[field])
    return template


def context_tags(*, source: str, git_commit: str, pipeline: str, env: str) -> dict[str, str]:
    """MLflow's standard tags (its UI's Source, Created by and version columns) and the Kedro context."""
    return {
        "mlflow.source.name": source,
        "mlflow.source.type": "PROJECT",
        "mlflow.source.git.commit": git_commit,
        "mlflow.user": getpass.getuser(),
        "kedro.pipeline": pipeline,
        "kedro.env": env,
    }


def select_metrics(values: Mapping[str, float], patterns: Iterable[str]) -> dict[str, float]:
    """The ``values`` whose key matches one of ``patterns`` (fnmatch: `*` spans `/`), in the patterns' order."""
    patterns = list(patterns)
    return (
        {key: values[key] for pattern in patterns for key in values if fnmatch.fnmatchcase(key, pattern)}
        if patterns
        else {}
    )


def metrics_table(headline: Mapping[str, float], delta: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per headline metric: its section, name, the trained model's value, the baseline's and the gain."""
    rows = []
    for key, value in headline.items():
        section, _, name = key.partition("/")
        gain = delta.get(key)
        rows.append(
            {
                "section": section,
                "metric": name,
                "trained": float(value),
                "baseline": float(value) - gain if gain is not None else None,
                "delta": gain,
            }
        )
    return rows


# The MLflow section of the per-step training metrics (batch/loss, batch/learning_rate, ...). MLflow's run
# page lays out "Model metrics" as sections sorted by name, unprefixed metrics last; "batch" sorts before the
# evaluation's "eval" and "eval_delta", so the run page opens with the training curves.
TRAINING_METRICS_SECTION = "batch"


class MetricBuffer:
    """Per-step metrics sent to MLflow in batches (one request per ``every`` steps).

    A tracking-server hiccup in the middle of training costs a warning, not
    the run: what could not be sent stays buffered and goes with the next
    batch (metrics.jsonl keeps every step regardless). Only the final flush,
    once the model is saved, raises if the server still does not take them.
    """

    def __init__(self, client: Any, run_id: str, every: int = 10, section: str = "") -> None:
        self.client, self.run_id, self.every = client, run_id, every
        self.prefix = f"{section}/" if section else ""  # MLflow's UI groups charts by what comes before a "/"
        self._pending: list[Any] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(self.prefix + k, float(v), now, step) for k, v in metrics.items())
        if step % self.every == 0:
            try:
                self.flush()
            except Exception as err:  # MLflow, requests and socket errors alike
                logger.warning(
                    "MLflow did not take the metrics of step %d (%s: %s); %d values kept for the next try",
                    step,
                    type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "",
                    len(self._pending),
                )

    def logged_steps(self, key: str = "loss") -> set[int]:
        """The steps MLflow has a value of ``key`` for (one request)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, self.prefix + key)}

    def log_missing(self, records: Sequence[Mapping[str, float]], logged: set[int] | None = None) -> int:
        """Sends the records (metrics.jsonl lines: a step and its values) whose step MLflow lacks; returns how many.

        A resumed run calls it with the steps before its checkpoint: a rank 0
        killed between two batches took its unsent steps with it. ``logged``:
        the steps MLflow has (``logged_steps``), when the caller has them already.
        """
        from mlflow.entities import Metric

        logged = self.logged_steps() if logged is None else logged
        missing = [r for r in records if r["step"] not in logged]
        now = int(time.time() * 1000)
        for record in missing:
            step = int(record["step"])
            self._pending.extend(Metric(self.prefix + k, float(v), now, step) for k, v in record.items() if k != "step")
        self.flush()
        return len(missing)

    def flush(self) -> None:
        """Sends every buffered value; raises (keeping what was not sent) if the server refuses."""
        while self._pending:
            chunk = self._pending[:1000]
            self.client.log_batch(self.run_id, metrics=chunk)
            del self._pending[: len(chunk)]

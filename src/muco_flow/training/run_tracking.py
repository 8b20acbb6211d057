"""The MLflow run of one training, kept by rank 0: started or resumed, every step logged, finished or failed.

Each step goes to ``metrics.jsonl`` in the output folder (the record the loss
curve and the resume read back) and, in batches, to MLflow (see
``MetricBuffer``). The other ranks keep no run: they pass ``None`` where a
``TrainingRun`` is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from muco_flow.tracking import TRAINING_METRICS_SECTION, MetricBuffer, flatten, retry_while_locked

logger = logging.getLogger(__name__)

# The tag that holds why a training stopped, on its MLflow run (ended FAILED or KILLED)
ERROR_TAG = "muco_flow.error"
METRICS_FILE = "metrics.jsonl"
# Why a run ended KILLED: "preempted" (a stop signal); the step it stopped after; the signal
STOPPED_TAG = "muco_flow.stopped"
STOPPED_AT_STEP_TAG = "muco_flow.stopped_at_step"
STOPPED_BY_TAG = "muco_flow.stopped_by"
PREEMPTED = "preempted"
# On a run that continues a training whose run the tracking store no longer has: that run's id
PREDECESSOR_TAG = "muco_flow.predecessor_run_id"
# A checkpoint's MLflow 3 LoggedModel: its type, and tags naming the checkpoint folder and its step
CHECKPOINT_MODEL_TYPE = "muco-checkpoint"
CHECKPOINT_PATH_TAG = "muco_flow.checkpoint"
CHECKPOINT_STEP_TAG = "muco_flow.step"
# Which step's weights became the model, and why (training.select), on the run and on that step's LoggedModel
SELECTED_STEP_TAG = "muco_flow.selected_step"
SELECTED_BY_TAG = "muco_flow.selected_by"
SELECTED_TAG = "muco_flow.selected"
# In the output folder of a finished training: which step's weights became the model, and why (stage.py reads it)
SELECTION_FILE = "selection.json"
# Where a training records its MLflow run (and the fingerprint it ran with) for the next start to find
RUN_FILE = "run.json"


class TrainingRun:
    """Rank 0's record of a training: ``metrics.jsonl`` and the MLflow run, from ``start`` to ``finish``."""

    def __init__(
        self, output_dir: Path, metrics: MetricBuffer, metrics_file: IO[str], in_mlflow: set[int] | None = None
    ) -> None:
        self.output_dir, self.metrics, self._metrics_file = output_dir, metrics, metrics_file
        self._in_mlflow = in_mlflow or set()  # steps MLflow has already: not sent again

    @property
    def run_id(self) -> str:
        return self.metrics.run_id

    @classmethod
    def start(
        cls, config: dict[str, Any], output_dir: Path, *, start_step: int, checkpoint_run: str | None
    ) -> TrainingRun:
        """Starts the MLflow run (system metrics on), or continues it when resuming from ``start_step`` > 0.

        A resumed training continues the run that wrote its checkpoint
        (``checkpoint_run``; run.json's, for a checkpoint that does not say). A
        training from step 0 always starts a new run: one run never holds two
        trainings' curves, and the previous run, if it never finished, is ended
        (KILLED) rather than left RUNNING. ``metrics.jsonl`` is cut back to
        ``start_step``, and the steps it keeps that MLflow lacks are sent.
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        settings = config["mlflow"]
        mlflow.set_tracking_uri(settings["tracking_uri"])
        client = MlflowClient(settings["tracking_uri"])
        run_file = output_dir / RUN_FILE
        previous = json.loads(run_file.read_text()) if run_file.exists() else {}
        run_id = predecessor = None
        if start_step > 0:
            wrote = checkpoint_run or (
                previous.get("mlflow_run_id") if previous.get("fingerprint") == config["fingerprint"] else None
            )
            run_id, predecessor = _run_to_continue(client, wrote, previous.get("mlflow_run_id"))
        elif previous.get("mlflow_run_id"):
            _end_unfinished_run(client, previous["mlflow_run_id"])
        if run_id is not None:
            mlflow.start_run(run_id=run_id, log_system_metrics=True)
            _clear_stop_tags(client, run_id)
        else:
            run_id = _start_new_run(config, client, predecessor=predecessor)
        run_file.write_text(
            json.dumps(
                {
                    "mlflow_run_id": run_id,
                    "fingerprint": config["fingerprint"],
                    "tracking_uri": settings["tracking_uri"],
                },
                indent=2,
            )
        )
        metrics = MetricBuffer(client, run_id, every=config["training"]["log_every"], section=TRAINING_METRICS_SECTION)
        metrics_file, earlier = _open_metrics(output_dir / METRICS_FILE, start_step)
        # the steps MLflow has: a step is never sent twice, though a killed run may have sent steps past its
        # checkpoint (they come again, with the same values, after the resume)
        in_mlflow = metrics.logged_steps() if start_step > 0 else set()
        if earlier:  # a killed rank 0 may have died with steps it had not sent to MLflow yet
            logger.info("sent %d earlier steps that MLflow did not have", metrics.log_missing(earlier, in_mlflow))
        return cls(output_dir, metrics, metrics_file, in_mlflow | {record["step"] for record in earlier})

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One step's metrics: a line of metrics.jsonl now, MLflow with the next batch."""
        self._metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics_file.flush()
        if step not in self._in_mlflow:
            self.metrics.log(step, values)

    def log_evaluation(self, step: int, values: Mapping[str, float], model_id: str | None = None) -> None:
        """The held-out metrics of ``step`` (training/heldout.py), sent now: on the run, and on checkpoint
        ``model_id``'s LoggedModel when the step has one. Tracking trouble costs a warning, not the run."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step, model_id=model_id) for key, value in values.items()]
        try:
            self.metrics.client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # MLflow, requests and socket errors alike
            logger.warning("MLflow did not take the held-out metrics of step %d: %s", step, err)

    def log_checkpoint_model(self, step: int, checkpoint: Path, fingerprint: str) -> str | None:
        """Checkpoint ``step`` as an MLflow 3 LoggedModel of this run, READY; returns its ``model_id``.

        The weights stay in the checkpoint folder (tag ``muco_flow.checkpoint``), not uploaded a second
        time. None, with a warning, when the tracking store refuses it: the checkpoint is safe either way.
        """
        client = self.metrics.client
        try:
            experiment_id = client.get_run(self.run_id).info.experiment_id
            tags = {CHECKPOINT_PATH_TAG: str(checkpoint.resolve()), CHECKPOINT_STEP_TAG: str(step),
                    "muco_flow.fingerprint": fingerprint}  # fmt: skip
            # a SQLite store another process writes to (evaluate, register) may be locked for a moment
            model = retry_while_locked(
                lambda: client.create_logged_model(
                    experiment_id, checkpoint.name, self.run_id, tags, model_type=CHECKPOINT_MODEL_TYPE
                )
            )
            retry_while_locked(lambda: client.finalize_logged_model(model.model_id, "READY"))
        except Exception as err:  # MLflow, requests and socket errors alike
            logger.warning("MLflow did not take checkpoint %s as a LoggedModel: %s", checkpoint, err)
            return None
        return str(model.model_id)

    def mark_selected(self, selected: Mapping[str, Any]) -> None:
        """Records which step's weights became the model and why: ``selection.json`` in the output folder, tags
        on the run and on that step's LoggedModel."""
        (self.output_dir / SELECTION_FILE).write_text(json.dumps(dict(selected), indent=2) + "\n")
        client = self.metrics.client
        step = str(selected["step"])
        try:
            client.set_tag(self.run_id, SELECTED_STEP_TAG, step)
            client.set_tag(self.run_id, SELECTED_BY_TAG, f"training.select: {selected['select']}: {selected['reason']}")
            for model in checkpoint_models(client, self.run_id):
                if model.tags.get(CHECKPOINT_STEP_TAG) == step:
                    client.set_logged_model_tags(model.model_id, {SELECTED_TAG: "true"})
        except Exception as err:  # MLflow, requests and socket errors alike
            logger.warning("could not tag MLflow run %s with its selected step: %s", self.run_id, err)

    def finish(self) -> None:
        """Sends what is left, the loss curve and metrics.jsonl, and ends the run FINISHED.

        Raises if MLflow still refuses metrics: called once the model and checkpoints are safe.
        """
        import mlflow

        from muco_flow.training.report import loss_curve_figure, read_metrics

        self._metrics_file.close()
        self.metrics.flush()
        metrics_path = self.output_dir / METRICS_FILE
        client = self.metrics.client
        client.log_figure(self.run_id, loss_curve_figure(read_metrics(metrics_path)), "plots/loss_curve.png")
        client.log_artifact(self.run_id, str(metrics_path), "metrics")
        mlflow.end_run()  # FINISHED, and the system metrics monitor stops

    def end_on_error(self, err: BaseException) -> None:
        """Ends the run FAILED (KILLED on Ctrl-C), with the steps not yet sent and the error as its tag.

        Tracking trouble here is only logged: the training error is what the user needs to see.
        """
        import mlflow

        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            self.metrics.flush()
            self.metrics.client.set_tag(self.run_id, ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status=status)
        except Exception as tracking_error:  # MLflow, requests and socket errors alike
            logger.warning("could not end MLflow run %s as %s: %s", self.run_id, status, tracking_error)

    def end_preempted(self, step: int, signal_name: str) -> None:
        """Ends the run KILLED, tagged ``muco_flow.stopped=preempted`` and the step, every step up to it sent.

        A resume reopens it (the checkpoint names it) and takes the tags off.
        Tracking trouble is only logged, as in ``end_on_error``.
        """
        import mlflow

        self._metrics_file.close()
        try:
            self.metrics.flush()
            client = self.metrics.client
            client.set_tag(self.run_id, STOPPED_TAG, PREEMPTED)
            client.set_tag(self.run_id, STOPPED_AT_STEP_TAG, str(step))
            client.set_tag(self.run_id, STOPPED_BY_TAG, signal_name)
            mlflow.end_run(status="KILLED")
        except Exception as tracking_error:  # MLflow, requests and socket errors alike
            logger.warning("could not end MLflow run %s as preempted: %s", self.run_id, tracking_error)


@contextlib.contextmanager
def ended_as_failed_on_error(run: TrainingRun | None) -> Iterator[None]:
    """Ends rank 0's MLflow run as FAILED (KILLED on Ctrl-C) when the block stops with an error, then re-raises.

    Otherwise a run stopped by a NaN loss or a crash stays RUNNING in the UI
    forever. The steps not yet sent go first, so the curve shows where it
    broke. A resume from a checkpoint reopens the same run. ``None``: a rank
    other than 0, which keeps no run.
    """
    try:
        yield
    except BaseException as err:
        if run is not None:
            run.end_on_error(err)
        raise


def checkpoint_models(client: Any, run_id: str) -> list[Any]:
    """The LoggedModels of run ``run_id``'s checkpoints (``log_checkpoint_model``), by step."""
    experiment = client.get_run(run_id).info.experiment_id
    models = []
    page_token = None
    while True:
        page = client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{run_id}'", page_token=page_token
        )
        models += [m for m in page if m.model_type == CHECKPOINT_MODEL_TYPE]
        page_token = page.token
        if not page_token:
            break
    return sorted(models, key=lambda m: int(m.tags[CHECKPOINT_STEP_TAG]))


def _run_to_continue(client: Any, wrote: str | None, last: str | None) -> tuple[str | None, str | None]:
    """The run a resumed training continues, and the run it replaces when that one is gone: (run, predecessor).

    The run that wrote the checkpoint (``wrote``), if the tracking store still
    has it. If not (the project was moved without its mlflow.db, or the
    tracking server is a new one), a new run continues the training and names
    ``wrote`` as its predecessor; ``last``, run.json's run, is that new run
    when an earlier resume already made it.
    """
    if wrote is None or _run_exists(client, wrote):
        return wrote, None
    replaced = last and last != wrote and _run_exists(client, last)
    if replaced and client.get_run(last).data.tags.get(PREDECESSOR_TAG) == wrote:
        return last, None
    logger.warning(
        "MLflow run %s, which wrote the checkpoint, is not in the tracking store %s (a project moved without its "
        "mlflow.db, or another tracking server): the training continues in a new run, tagged %s=%s",
        wrote,
        client.tracking_uri,
        PREDECESSOR_TAG,
        wrote,
    )
    return None, wrote


def _run_exists(client: Any, run_id: str) -> bool:
    """Whether the store has ``run_id`` and it is not deleted (MLflow cannot reopen a deleted run)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise


def _clear_stop_tags(client: Any, run_id: str) -> None:
    """A reopened run runs again: the tags of an earlier preemption no longer say how it stands."""
    tags = client.get_run(run_id).data.tags
    for tag in (STOPPED_TAG, STOPPED_AT_STEP_TAG, STOPPED_BY_TAG):
        if tag in tags:
            client.delete_tag(run_id, tag)


def _start_new_run(config: dict[str, Any], client: Any, predecessor: str | None = None) -> str:
    """A new run named and described by the stage, with the run's parameters, configs and training data.

    ``predecessor``: the run this one continues (gone from the store), as the tag ``muco_flow.predecessor_run_id``.
    """
    import mlflow
    from mlflow.entities import Param

    settings = config["mlflow"]
    experiment = mlflow.set_experiment(settings["experiment"])
    run_id = mlflow.start_run(
        experiment_id=experiment.experiment_id,
        run_name=settings["run_name"],
        description=settings["description"],
        tags={"muco_flow.stage": config.get("stage", "train"), **settings["tags"]}
        | ({PREDECESSOR_TAG: predecessor} if predecessor else {}),
        log_system_metrics=True,
    ).info.run_id
    params = flatten({k: config[k] for k in ("training", "backbone")}) | {"checkpoint": config["checkpoint"]}
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per request
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    client.log_dict(run_id, config["deepspeed"], "config/deepspeed.json")
    client.log_dict(run_id, config, "config/run_config.json")
    _log_training_data(Path(config["shards_dir"]), settings["data_fingerprint"])
    return run_id


def _end_unfinished_run(client: Any, run_id: str) -> None:
    """Marks a previous training's run KILLED if it is still RUNNING: this training will not continue it."""
    from mlflow.exceptions import MlflowException

    try:
        status = client.get_run(run_id).info.status
    except MlflowException:
        return  # deleted, or another tracking store: nothing to end
    if status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
        logger.info("ended MLflow run %s (KILLED): this training starts from step 0 in a new run", run_id)


def _log_training_data(shards: Path, fingerprint: str) -> None:
    """The shards trained on, as the active run's "training" dataset: where they are and their fingerprint."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow keeps 36 characters of a digest; the version tag data_fingerprint has all 64
    # mlflow's Dataset declares profile abstract but is no ABC, so MetaDataset (which has none) instantiates
    dataset = MetaDataset(  # type: ignore[abstract]
        resolve_dataset_source(str(shards.resolve())), name=shards.name, digest=fingerprint[:36]
    )
    mlflow.log_input(dataset, context="training", tags={"data_fingerprint": fingerprint})


def _open_metrics(path: Path, start_step: int) -> tuple[IO[str], list[dict[str, Any]]]:
    """The per-step metrics file, cut back to the resumed step so that the curve has no repeats.

    Returns it open for appending, with the records it kept.
    """
    lines = [line for line in path.read_text().splitlines() if line] if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a"), [json.loads(line) for line in kept]

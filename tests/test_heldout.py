"""Evaluation during training (training/heldout.py): the held-out draw, its score, the best checkpoint, and
each checkpoint as an MLflow LoggedModel in a real SQLite tracking store."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from muco_flow.training.checkpoint import save_checkpoint
from muco_flow.training.heldout import (
    HELDOUT_METRIC,
    SELECTION_STATE,
    Selection,
    evaluate_heldout,
    heldout_records,
    heldout_scores,
)
from muco_flow.training.run_tracking import (
    CHECKPOINT_PATH_TAG,
    CHECKPOINT_STEP_TAG,
    SELECTED_BY_TAG,
    SELECTED_STEP_TAG,
    SELECTED_TAG,
    SELECTION_FILE,
    TrainingRun,
    checkpoint_models,
)
from tests.test_run_tracking import config  # noqa: F401 (the fixture: a run config with a SQLite store)


def test_the_held_out_records_are_a_fixed_draw_and_a_smaller_slice_is_part_of_a_larger_one():
    drawn = heldout_records(100, 10)
    assert len(set(drawn.tolist())) == 10 and all(0 <= r < 100 for r in drawn.tolist())
    assert drawn.tolist() == sorted(drawn.tolist())
    assert drawn.tolist() == heldout_records(100, 10).tolist()  # the same every time: no seed of the run in it
    assert set(heldout_records(100, 4).tolist()) <= set(drawn.tolist())
    assert heldout_records(100, 0).tolist() == []
    with pytest.raises(ValueError, match="heldout_conversations is 5, but the data has 5 records"):
        heldout_records(5, 5)


def test_hit_at_1_ranks_each_query_among_the_slices_distinct_targets_ties_against_it():
    # candidates by key: 10 -> [1, 0] (the first row of that key), 11 -> [0.6, 0.8]
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    targets = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    keys = [10, 11, 10, 10]
    # query 0: 1.0 vs 0.6, rank 1; query 1: 0 vs 0.8, rank 1; query 2: key 10 is [1, 0] (not its own row's
    # [0, 1]): 1.0 vs 0.6, rank 1; query 3: 0.6 vs 1.0, rank 2
    # turn types: queries 0-2 of type 0 (all hits), query 3 of type 1 (a miss): each type counts once
    assert heldout_scores(queries, targets, keys, [0, 0, 0, 1]) == pytest.approx(
        {
            HELDOUT_METRIC: 0.75,
            "heldout/hit_at_1_turn_mean": (1.0 + 0.0) / 2,
            "heldout/recall_at_5": 1.0,
            "heldout/mrr_at_10": (1 + 1 + 1 + 0.5) / 4,
        }
    )
    # a query scoring its target and another candidate the same is a miss (rank 2), as in evaluation
    two = heldout_scores(
        torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), [1, 2], [-1, -1]
    )
    assert two[HELDOUT_METRIC] == 0.0 and two["heldout/mrr_at_10"] == 0.5


class DropoutEmbedder(torch.nn.Module):
    """Returns each side's "vectors" through dropout: training mode would draw random numbers and change them."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.dropout(vectors)


def side(rows: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"vectors": torch.tensor(rows)}


def test_the_slice_is_scored_in_eval_mode_without_drawing_random_numbers_and_the_mode_comes_back():
    model = DropoutEmbedder().train()
    batch = SimpleNamespace(
        query=side([[1.0, 0.0], [0.0, 1.0]]),
        target=side([[1.0, 0.0], [0.0, 1.0]]),
        target_keys=torch.tensor([1, 2]),
        turn_types=torch.tensor([0, 1]),
    )
    before = torch.get_rng_state()
    scores = evaluate_heldout(model, [batch], torch.device("cpu"), four_way=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.modes == [False, False] and model.training
    assert scores[HELDOUT_METRIC] == 1.0


def test_stage_two_scores_each_samples_main_embedding_only():
    # rows: [main_0, auxiliary_0, main_1, auxiliary_1]; the auxiliary ones would swap the two samples' targets
    query = side([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    target = side([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    unknown = torch.tensor([-1, -1, -1, -1])  # stage 2 has no turn types
    batch = SimpleNamespace(query=query, target=target, target_keys=torch.tensor([5, 5, 6, 6]), turn_types=unknown)
    scores = evaluate_heldout(DropoutEmbedder(), [batch], torch.device("cpu"), four_way=True)
    assert scores[HELDOUT_METRIC] == 1.0
    crossed = SimpleNamespace(query=query, target=side([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
                              target_keys=torch.tensor([5, 5, 6, 6]), turn_types=unknown)  # fmt: skip
    assert evaluate_heldout(DropoutEmbedder(), [crossed], torch.device("cpu"), four_way=True)[HELDOUT_METRIC] == 0.0


def test_the_best_checkpoint_is_the_highest_score_a_tie_keeps_the_earlier_one_and_it_survives_a_resume():
    selection = Selection()
    for step, value in [(20, 0.3), (40, 0.5), (60, 0.5), (80, 0.4)]:
        selection = selection.after(step, {HELDOUT_METRIC: value})
    assert (selection.step, selection.value) == (40, 0.5)
    # what a checkpoint's client state holds, read back by a resumed run
    resumed = Selection.from_state(json.loads(json.dumps({"step": 80, SELECTION_STATE: selection.state()})))
    assert resumed == selection
    assert Selection.from_state({"step": 20}) == Selection()  # a checkpoint before any evaluation
    best = selection.describe("best", 100)
    assert (best["step"], best["value"], best["metric"]) == (40, 0.5, HELDOUT_METRIC)
    assert selection.describe("last", 100)["step"] == 100
    assert Selection().describe("best", 100)["step"] == 100  # nothing evaluated: the last step's


class ModelFileEngine:
    """A DeepSpeed engine as save_checkpoint sees it: one small model file per checkpoint."""

    def __init__(self) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self._config = None
        self.checkpoint_engine = TorchCheckpointEngine(None)

    def save_checkpoint(self, save_dir: str, tag: str, **options) -> None:
        (Path(save_dir) / tag).mkdir(parents=True)
        self.checkpoint_engine.save({"module": torch.zeros(4)}, str(Path(save_dir) / tag / "model.pt"))


def test_keep_last_never_removes_the_checkpoint_kept_as_the_best(tmp_path):
    root, engine = tmp_path / "checkpoints", ModelFileEngine()
    for step in (2, 4, 6, 8):
        save_checkpoint(engine, root, step, rank=0, world_size=1, fingerprint="f", keep_last=2,
                        client_state={"step": step}, keep=[2])  # fmt: skip
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000006", "step-00000008"]
    save_checkpoint(engine, root, 10, rank=0, world_size=1, fingerprint="f", keep_last=2, client_state={})
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000008", "step-00000010"]


def test_each_checkpoint_is_a_logged_model_with_its_held_out_metrics_and_the_selected_one_is_tagged(
    config,  # noqa: F811 (the fixture imported above)
    tmp_path,
):
    client = MlflowClient(config["mlflow"]["tracking_uri"])
    run = TrainingRun.start(config, tmp_path, start_step=0, checkpoint_run=None)
    selection = Selection()
    for step, value in [(4, 0.25), (8, 0.75), (12, 0.5)]:
        run.log(step, {"loss": 1.0 / step, "learning_rate": 0.001})  # the loss curve that finish() plots
        checkpoint = tmp_path / "checkpoints" / f"step-{step:08d}"
        checkpoint.mkdir(parents=True)
        model_id = run.log_checkpoint_model(step, checkpoint, config["fingerprint"])
        run.log_evaluation(step, {HELDOUT_METRIC: value}, model_id)
        selection = selection.after(step, {HELDOUT_METRIC: value})
    run.log_evaluation(6, {HELDOUT_METRIC: 0.6})  # between checkpoints: on the run's curve only
    run.mark_selected(selection.describe("best", 12))
    run.finish()

    models = checkpoint_models(client, run.run_id)
    assert [m.name for m in models] == ["step-00000004", "step-00000008", "step-00000012"]
    assert all(m.status == LoggedModelStatus.READY for m in models)
    assert [[(x.key, x.value, x.step) for x in m.metrics] for m in models] == [
        [(HELDOUT_METRIC, 0.25, 4)],
        [(HELDOUT_METRIC, 0.75, 8)],
        [(HELDOUT_METRIC, 0.5, 12)],
    ]
    assert models[1].tags[CHECKPOINT_PATH_TAG] == str((tmp_path / "checkpoints" / "step-00000008").resolve())
    assert [m.tags[CHECKPOINT_STEP_TAG] for m in models] == ["4", "8", "12"]
    assert [m.tags.get(SELECTED_TAG) for m in models] == [None, "true", None]
    assert all(m.source_run_id == run.run_id for m in models)
    curve = client.get_metric_history(run.run_id, HELDOUT_METRIC)
    assert sorted((m.step, m.value) for m in curve) == [(4, 0.25), (6, 0.6), (8, 0.75), (12, 0.5)]
    tags = client.get_run(run.run_id).data.tags
    assert tags[SELECTED_STEP_TAG] == "8" and "training.select: best" in tags[SELECTED_BY_TAG]
    assert json.loads((tmp_path / SELECTION_FILE).read_text())["step"] == 8

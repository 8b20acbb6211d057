"""The ablation runner's lines: what it reads from a run's metrics.json and train_run.json."""

from __future__ import annotations

import pytest

from benchmarks import ablations
from muco_flow.docs_numbers import stage1_table

METRICS = {
    "model": {
        "mmeb": {"average": 0.5, "datasets": {"A": {"hit@1": 0.75}, "B": {"hit@1": 0.25}}},
        "mbeir": {"average": {"local": 0.375, "global": 0.25}},
        "dimensions": {
            "16": {"mmeb": {"average": 0.25}, "mbeir": {"average": {"local": 0.125}}},
        },
    },
    "baseline": {
        "mmeb": {"average": 0.125, "datasets": {}},
        "mbeir": {"average": {"local": 0.0625}},
        "dimensions": {"16": {"mmeb": {"average": 0.0625}, "mbeir": {"average": {"local": 0.0}}}},
    },
}


def test_a_stage1_line_holds_each_width_and_becomes_a_table_row():
    row = ablations.stage1_row("multi_turn", 2, METRICS, {"steps": 64, "mlflow_run_id": "x"})
    assert row == {
        "config": "multi_turn",
        "seed": 2,
        "steps": 64,
        "mmeb_average": {"16": 0.25, "full": 0.5},
        "mbeir_local_average": {"16": 0.125, "full": 0.375},
        "baseline_mmeb_average": {"16": 0.0625, "full": 0.125},
    }
    assert "| 0.500 (n=1) | 0.375 (n=1) | 2: 0.500 | 64 | 1.5 |" in stage1_table([row | {"wall_s": 90.0}])


def test_a_stage2_line_sits_beside_the_stage1_model_it_started_from():
    stage1 = {"model": {"mmeb": {"average": 0.25}, "mbeir": {"average": {"local": 0.5}}}}
    row = ablations.stage2_row("mined_lr5e-5", 1, METRICS, stage1)
    assert row == {
        "stage2": "mined_lr5e-5",
        "seed": 1,
        "mmeb_average": 0.5,
        "mmeb_datasets": {"A": 0.75, "B": 0.25},
        "mbeir_local_average": 0.375,
        "stage1_mmeb_average": 0.25,
        "stage1_mbeir_local_average": 0.5,
    }


def test_an_unknown_configuration_is_named(capsys):
    with pytest.raises(SystemExit):
        ablations.main(["stage1", "--only", "multi_turn", "three_turn"])
    assert "unknown stage1 names ['three_turn']" in capsys.readouterr().err

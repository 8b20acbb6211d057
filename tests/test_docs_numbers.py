"""The default run's numbers in README.md and docs/evaluation.md are those of the committed run record."""

from __future__ import annotations

import json
import shutil

import pytest

from muco_flow.docs_numbers import (
    RECORD_FILE,
    STAGE1_ABLATIONS_FILE,
    STAGE2_ABLATIONS_FILE,
    main,
    markers,
    matryoshka_table,
    readme_results,
    run_record,
    stage1_table,
    stage2_table,
    stale_blocks,
    with_blocks,
)
from tests.conftest import PROJECT_ROOT

METRICS = {
    "mmeb_chance_average": 0.140625,
    "model": {
        "mmeb": {"average": 0.5, "datasets": {"A": {"hit@1": 0.75}, "B": {"hit@1": 0.25}}},
        "mbeir": {
            "average": {"local": 0.5, "global": 0.25},
            "average_metrics": {"t0": "recall@5", "t3": "recall@5"},
            "rows": {"local": {"t0": {"recall@1": 0.0, "recall@5": 0.375}, "t3": {"recall@1": 0.5, "recall@5": 0.625}}},
        },
    },
    "baseline": {
        "mmeb": {"average": 0.125, "datasets": {"A": {"hit@1": 0.0}, "B": {"hit@1": 0.25}}},
        "mbeir": {"average": {"local": 0.0625, "global": 0.0}},
    },
}
TRAIN_RUN = {"steps": 20, "loss_first_10pct": 4.625, "loss_last_10pct": 1.875, "mlflow_run_id": "x"}


def test_the_documents_state_the_committed_records_numbers():
    assert stale_blocks(PROJECT_ROOT) == []


def test_a_record_holds_what_the_documents_state_of_a_run():
    assert run_record(METRICS, TRAIN_RUN, "hand") == {
        "source": "hand",
        "steps": 20,
        "loss_first_10pct": 4.625,
        "loss_last_10pct": 1.875,
        "mmeb": {
            "trained": 0.5,
            "untrained": 0.125,
            "chance": 0.140625,
            "datasets": {"A": {"trained": 0.75, "untrained": 0.0}, "B": {"trained": 0.25, "untrained": 0.25}},
        },
        "mbeir": {"local": {"trained": 0.5, "untrained": 0.0625}, "tasks": {"t0": 0.375, "t3": 0.625}},
    }
    rows = readme_results(run_record(METRICS, TRAIN_RUN, "hand")).splitlines()
    assert rows[2].startswith("| training steps | 20 |")
    assert "| 4.62 → 1.88 |" in rows[3]  # halves round to even, as Python's format does
    assert "(chance 0.14) | 0.500 / 0.125 (4.00x) |" in rows[4]
    assert "| 0.500 / 0.062 |" in rows[5]
    assert "| t0 0.375, t3 0.625 |" in rows[6]


def test_a_changed_number_or_a_lost_marker_is_found_and_write_repairs_it(tmp_path):
    for document in ("README.md", "docs/evaluation.md", RECORD_FILE, STAGE1_ABLATIONS_FILE, STAGE2_ABLATIONS_FILE):
        (tmp_path / document).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / document, tmp_path / document)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| 0.482 / 0.159 (3.03x) |", "| 0.47 / 0.11 (3.03x) |"))
    assert main(["check", "--root", str(tmp_path)]) == 1
    assert main(["write", "--root", str(tmp_path)]) == 0
    assert readme.read_text() == (PROJECT_ROOT / "README.md").read_text()
    assert main(["check", "--root", str(tmp_path)]) == 0

    start, _ = markers("default-run-results")
    with pytest.raises(ValueError, match=r"README\.md has no block default-run-results"):
        with_blocks("text without it\n" + start, {"default-run-results": "x"}, "README.md")


def test_record_reads_a_runs_files(tmp_path):
    (tmp_path / "data/08_reporting").mkdir(parents=True)
    (tmp_path / "data/06_models").mkdir(parents=True)
    (tmp_path / "data/08_reporting/metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "data/06_models/train_run.json").write_text(json.dumps(TRAIN_RUN))
    assert main(["record", "--root", str(tmp_path), "--source", "a test"]) == 0
    written = json.loads((tmp_path / RECORD_FILE).read_text())
    assert written["source"] == "a test" and written["mmeb"]["trained"] == 0.5 and written["steps"] == 20


def stage1_row(config, seed, full, mbeir, widths=None, baseline=None):
    return {
        "config": config,
        "seed": seed,
        "steps": 64,
        "wall_s": 60.0 * (seed + 1),
        "mmeb_average": (widths or {}) | {"full": full},
        "mbeir_local_average": {"full": mbeir},
        "baseline_mmeb_average": (baseline or {}) | {"full": 0.125},
    }


def test_the_stage1_table_gives_mean_and_sample_spread_per_configuration():
    rows = [
        stage1_row("single_turn_equal_images", 1, 0.25, 0.5),
        stage1_row("multi_turn", 1, 0.5, 0.25),
        stage1_row("multi_turn", 0, 0.25, 0.25),
        stage1_row("single_turn_equal_images", 0, 0.125, 0.5),
        stage1_row("multi_turn", 2, 0.75, 0.25),
    ]
    lines = stage1_table(rows).splitlines()
    # by hand: mean(0.25, 0.5, 0.75) = 0.5, sample sd = sqrt((0.0625 + 0 + 0.0625) / 2) = 0.25
    assert lines[2] == (
        "| multi-turn (MuCo: one conversation per image, K turns) | 0.500 ± 0.250 (n=3) | 0.250 ± 0.000 (n=3) "
        "| 0: 0.250, 1: 0.500, 2: 0.750 | 64 | 2.0 |"
    )
    # mean(0.125, 0.25) = 0.1875, sd = sqrt(2 * 0.0625**2) = 0.0884
    assert lines[3].startswith("| single-turn, equal images (one turn per image per step) | 0.188 ± 0.088 (n=2) |")
    assert len(lines) == 4  # configurations without runs are left out


def test_the_matryoshka_table_lines_up_each_width_with_and_without_it():
    rows = [
        stage1_row("mrl", 0, 0.5, 0.5, {"16": 0.5, "128": 0.25}, {"16": 0.0625, "128": 0.125}),
        stage1_row("multi_turn", 0, 0.5, 0.5, {"16": 0.25, "128": 0.5}),
    ]
    assert matryoshka_table(rows).splitlines()[2:] == [
        "| 16 | 0.500 (n=1) | 0.250 (n=1) | 0.062 |",
        "| 128 | 0.250 (n=1) | 0.500 (n=1) | 0.125 |",
        "| full | 0.500 (n=1) | 0.500 (n=1) | 0.125 |",
    ]


def test_the_stage2_table_gives_each_seeds_change_from_its_own_stage1_model():
    def row(variant, seed, mmeb, stage1):
        return {"stage2": variant, "seed": seed, "mmeb_average": mmeb, "mbeir_local_average": 0.5,
                "stage1_mmeb_average": stage1, "stage1_mbeir_local_average": 0.25}  # fmt: skip

    lines = stage2_table([row("given_lr5e-5", 0, 0.5, 0.25), row("given_lr5e-5", 1, 0.25, 0.5)]).splitlines()
    assert lines[2] == "| nothing (stage 1 alone) | 0.375 ± 0.177 (n=2) | — | 0.250 ± 0.000 (n=2) |"
    assert lines[3] == (
        "| given negatives, lr 5e-5 (the official stage-2 rate) | 0.375 ± 0.177 (n=2) | 0: +0.250, 1: -0.250 "
        "| 0.500 ± 0.000 (n=2) |"
    )

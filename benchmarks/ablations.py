"""The sample's ablations, seed by seed: stage 1's recipe and stage 2's negatives and learning rate.

    python -m benchmarks.ablations prepare                 # the sample at --train-images, the backbone, the shards
    python -m benchmarks.ablations stage1 --seeds 0 1 2    # multi-turn, single-turn (equal images, equal pairs), MRL
    python -m benchmarks.ablations stage2 --seeds 0 1 2    # from each seed's multi-turn model: given / no / mined
                                                           # negatives, at stage 1's rate and the official one

Run it in a copy of the project (it rewrites ``data/``); each run is a
``kedro run`` there. Each finished run appends one line, with the command that
made it, to ``docs/results/ablations_stage1.jsonl`` or ``ablations_stage2.jsonl``
of the copy, and ``python -m muco_flow.docs_numbers write`` turns those files
into the README's tables. The scale is a quarter of the default run
(``--train-images 512``, 2 epochs: 64 steps), so that one stage-1 run takes
about 3.5 minutes on 2 idle cores and the whole of both about 90.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGE1_RESULTS = Path("docs/results/ablations_stage1.jsonl")
STAGE2_RESULTS = Path("docs/results/ablations_stage2.jsonl")
MODELS = Path("data/06_models/ablations")  # each seed's multi-turn model, which stage 2 starts from
LOGS = MODELS / "logs"
WIDTHS = [16, 32, 64, 128]

# configuration -> (format parameters, training parameters, Kedro environment)
STAGE1 = {
    "multi_turn": ("format.mode=multi_turn", "", "ablation_widths"),
    "mrl": ("format.mode=multi_turn", "", "ablation_matryoshka"),
    "single_turn_equal_images": ("format.mode=single_turn,format.conversations_per_sample=1", "", "ablation_widths"),
    # K conversations per image, 7 x 8 per micro batch: the same steps see K times the pairs
    "single_turn_equal_pairs": (
        "format.mode=single_turn",
        ",training.micro_batch_size=56,evaluate.m3t_heldout=null",
        "ablation_widths",
    ),
}
# variant -> (pipelines, parameters); each starts from the seed's multi-turn model and formats its own data
# (finetune_data and finetune_data_mined write the same shards)
STAGE2 = {
    "given_lr5e-4": ("finetune_data,finetune", ""),
    "given_lr5e-5": ("finetune_data,finetune", ",finetune.training.learning_rate=5e-5"),
    "none_lr5e-5": (
        "finetune_data,finetune",
        ",finetune.training.learning_rate=5e-5,finetune_format.hard_negatives=false",
    ),
    "mined_lr5e-5": ("mine,finetune_data_mined,finetune", ",finetune.training.learning_rate=5e-5,mine.model={model}"),
}
ENVIRONMENTS = {
    "ablation_widths": {"evaluate": {"dimensions": WIDTHS}},
    "ablation_matryoshka": {"evaluate": {"dimensions": WIDTHS}, "training": {"matryoshka": {"dims": WIDTHS}}},
}


def kedro(args: list[str], log: Path) -> str:
    """Runs ``kedro run ARGS`` here, its output appended to ``log``; the command as a string."""
    command = ["kedro", "run", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        code = subprocess.run([sys.executable, "-m", *command], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {code}); its output: {log}")
    return " ".join(command)


def per_width(result: dict[str, Any], pick: Callable[[dict[str, Any]], float]) -> dict[str, float]:
    """A score at each evaluated width and at full width."""
    return {d: pick(scores) for d, scores in (result.get("dimensions") or {}).items()} | {"full": pick(result)}


def stage1_row(config: str, seed: int, metrics: dict[str, Any], train_run: dict[str, Any]) -> dict[str, Any]:
    """One stage-1 run's line: the MMEB-format and M-BEIR local averages per width, and the untrained backbone's."""
    return {
        "config": config,
        "seed": seed,
        "steps": train_run["steps"],
        "mmeb_average": per_width(metrics["model"], lambda s: s["mmeb"]["average"]),
        "mbeir_local_average": per_width(metrics["model"], lambda s: s["mbeir"]["average"]["local"]),
        "baseline_mmeb_average": per_width(metrics["baseline"], lambda s: s["mmeb"]["average"]),
    }


def stage2_row(variant: str, seed: int, metrics: dict[str, Any], stage1_metrics: dict[str, Any]) -> dict[str, Any]:
    """One stage-2 run's line, beside the stage-1 model it started from."""
    return {
        "stage2": variant,
        "seed": seed,
        "mmeb_average": metrics["model"]["mmeb"]["average"],
        "mmeb_datasets": {name: d["hit@1"] for name, d in metrics["model"]["mmeb"]["datasets"].items()},
        "mbeir_local_average": metrics["model"]["mbeir"]["average"]["local"],
        "stage1_mmeb_average": stage1_metrics["model"]["mmeb"]["average"],
        "stage1_mbeir_local_average": stage1_metrics["model"]["mbeir"]["average"]["local"],
    }


def append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def write_environments() -> None:
    """conf/<env>/parameters_ablation.yml for each environment the stage-1 runs use (JSON is YAML)."""
    for env, parameters in ENVIRONMENTS.items():
        folder = Path("conf") / env
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "parameters_ablation.yml").write_text(json.dumps(parameters) + "\n")


def run_stage1(config: str, seed: int) -> None:
    format_params, training_params, env = STAGE1[config]
    log = LOGS / f"stage1-{config}-seed{seed}.log"
    kedro(["--env", env, "--pipelines=format", f"--params={format_params}"], log)
    shutil.rmtree("data/06_models/muco", ignore_errors=True)  # a fresh start, never a resume
    started = time.monotonic()
    params = f"training.seed={seed},{format_params}{training_params}"
    command = kedro(["--env", env, "--pipelines=train,evaluate", f"--params={params}"], log)
    metrics = json.loads(Path("data/08_reporting/metrics.json").read_text())
    train_run = json.loads(Path("data/06_models/train_run.json").read_text())
    if config == "multi_turn":
        shutil.rmtree(MODELS / f"multi_turn-seed{seed}", ignore_errors=True)
        shutil.copytree("data/08_reporting", MODELS / f"multi_turn-seed{seed}/reporting")
        shutil.copytree(train_run["model_dir"], MODELS / f"multi_turn-seed{seed}/model")
    row = stage1_row(config, seed, metrics, train_run)
    append(STAGE1_RESULTS, row | {"wall_s": round(time.monotonic() - started, 1), "command": command})


def run_stage2(variant: str, seed: int) -> None:
    start = MODELS / f"multi_turn-seed{seed}"
    if not (start / "model").is_dir():
        raise FileNotFoundError(f"{start / 'model'}: run `python -m benchmarks.ablations stage1 --seeds {seed}` first")
    pipelines, extra = STAGE2[variant]
    params = f"training.seed={seed},finetune.init_from={start / 'model'}" + extra.format(model=start / "model")
    for output in ("data/06_models/muco_finetune", "data/08_reporting/finetune"):
        shutil.rmtree(output, ignore_errors=True)
    started = time.monotonic()
    command = kedro([f"--pipelines={pipelines}", f"--params={params}"], LOGS / f"stage2-{variant}-seed{seed}.log")
    metrics = json.loads(Path("data/08_reporting/finetune/metrics.json").read_text())
    stage1_metrics = json.loads((start / "reporting/metrics.json").read_text())
    row = stage2_row(variant, seed, metrics, stage1_metrics)
    append(STAGE2_RESULTS, row | {"wall_s": round(time.monotonic() - started, 1), "command": command})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablations", description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["prepare", "stage1", "stage2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=512, help="prepare: the sample's training images")
    parser.add_argument("--only", nargs="+", help="these configurations (stage1) or variants (stage2) only")
    args = parser.parse_args(argv)
    if args.study == "prepare":
        kedro(["--pipelines=sample,backbone,data", f"--params=m3t_mini.train_images={args.train_images}"],
              LOGS / "prepare.log")  # fmt: skip
        write_environments()
        return
    runs = STAGE1 if args.study == "stage1" else STAGE2
    unknown = set(args.only or []) - set(runs)
    if unknown:
        parser.error(f"unknown {args.study} names {sorted(unknown)}; known: {sorted(runs)}")
    run = run_stage1 if args.study == "stage1" else run_stage2
    for seed in args.seeds:  # seed by seed, so that a partial table has every configuration
        for name in args.only or runs:
            run(name, seed)


if __name__ == "__main__":
    main()

"""The numbers README.md and the docs state about runs on the sample, generated from committed result files.

The default run's record (docs/results/default_run.json) is a small JSON made
from a default run's outputs; the ablations (docs/results/ablations_stage1.jsonl
and ablations_stage2.jsonl) hold one line per trained seed, written by
``benchmarks/ablations.sh`` with the command that made it. The documents hold
their numbers in blocks between marker comments, which only this module writes::

    python -m muco_flow.docs_numbers record   # the record, from metrics.json and train_run.json of a run here
    python -m muco_flow.docs_numbers write    # the blocks in README.md and docs/evaluation.md, from the record
    python -m muco_flow.docs_numbers check    # exit status 1 naming every block that differs from the record

so a number cannot drift from the run it came from (tests/test_docs_numbers.py runs `check`).
Across seeds a table gives the mean and the sample standard deviation (n - 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_FILE = Path("docs/results/default_run.json")
STAGE1_ABLATIONS_FILE = Path("docs/results/ablations_stage1.jsonl")
STAGE2_ABLATIONS_FILE = Path("docs/results/ablations_stage2.jsonl")
METRICS_FILE = Path("data/08_reporting/metrics.json")
TRAIN_RUN_FILE = Path("data/06_models/train_run.json")


def run_record(metrics: Mapping[str, Any], train_run: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What the documents state about a run, from its metrics.json and train_run.json; ``source`` says which run."""
    model, baseline = metrics["model"], metrics["baseline"]
    local = model["mbeir"]["rows"]["local"]
    return {
        "source": source,
        "steps": train_run["steps"],
        "loss_first_10pct": train_run["loss_first_10pct"],
        "loss_last_10pct": train_run["loss_last_10pct"],
        "mmeb": {
            "trained": model["mmeb"]["average"],
            "untrained": baseline["mmeb"]["average"],
            "chance": metrics["mmeb_chance_average"],
            "datasets": {
                name: {"trained": scores["hit@1"], "untrained": baseline["mmeb"]["datasets"][name]["hit@1"]}
                for name, scores in model["mmeb"]["datasets"].items()
            },
        },
        "mbeir": {
            "local": {
                "trained": model["mbeir"]["average"]["local"],
                "untrained": baseline["mbeir"]["average"]["local"],
            },
            # each task's local score in the metric its average takes (UniIR's: recall@5)
            "tasks": {task: local[task][metric] for task, metric in model["mbeir"]["average_metrics"].items()},
        },
    }


def readme_results(record: Mapping[str, Any]) -> str:
    """README.md's table of the default run."""
    mmeb, mbeir = record["mmeb"], record["mbeir"]
    return "\n".join(
        [
            "| what | value | regenerate |",
            "| --- | --- | --- |",
            f"| training steps | {record['steps']} | `jq .steps data/06_models/train_run.json` |",
            "| training loss, mean of the first and last 10% of steps | "
            f"{record['loss_first_10pct']:.2f} → {record['loss_last_10pct']:.2f} | "
            "`jq '.loss_first_10pct, .loss_last_10pct' data/06_models/train_run.json` |",
            f"| MMEB-format average hit@1, trained / untrained (chance {mmeb['chance']:.2f}) | "
            f"{mmeb['trained']:.3f} / {mmeb['untrained']:.3f} ({_ratio(mmeb)}) | "
            "`jq '.model.mmeb.average, .baseline.mmeb.average' data/08_reporting/metrics.json` |",
            f"| M-BEIR local average (R@5), trained / untrained | "
            f"{mbeir['local']['trained']:.3f} / {mbeir['local']['untrained']:.3f} | "
            "`jq '.model.mbeir.average.local, .baseline.mbeir.average.local' data/08_reporting/metrics.json` |",
            f"| M-BEIR local R@5 per task, trained | {_tasks(mbeir['tasks'])} | "
            "`jq '.model.mbeir.rows.local' data/08_reporting/metrics.json` |",
        ]
    )


def evaluation_results(record: Mapping[str, Any]) -> str:
    """docs/evaluation.md's paragraph on the default run."""
    mmeb, mbeir = record["mmeb"], record["mbeir"]
    datasets = sorted(mmeb["datasets"].items(), key=lambda item: -item[1]["trained"])
    per_dataset = ", ".join(f"{name} {d['trained']:.2f} / {d['untrained']:.2f}" for name, d in datasets)
    return (
        f"On the default sample the trained tiny model reaches an MMEB-format average of {mmeb['trained']:.3f} "
        f"against {mmeb['untrained']:.3f} for the untrained backbone ({_ratio(mmeb)}; chance is "
        f"{mmeb['chance']:.2f}). Per dataset (trained / untrained): {per_dataset}. M-BEIR's local average (R@5) is "
        f"{mbeir['local']['trained']:.3f} against {mbeir['local']['untrained']:.3f}; per task, trained: "
        f"{_tasks(mbeir['tasks'])}."
    )


def _ratio(scores: Mapping[str, float]) -> str:
    return f"{scores['trained'] / scores['untrained']:.2f}x" if scores["untrained"] > 0 else "untrained at 0"


def _tasks(tasks: Mapping[str, float]) -> str:
    return ", ".join(f"{task} {value:.3f}" for task, value in sorted(tasks.items()))


# The stage-1 configurations of docs/results/ablations_stage1.jsonl, in table order, with what each one is
STAGE1_CONFIGS = {
    "multi_turn": "multi-turn (MuCo: one conversation per image, K turns)",
    "single_turn_equal_images": "single-turn, equal images (one turn per image per step)",
    "single_turn_equal_pairs": "single-turn, equal pairs (K conversations per image)",
    "mrl": "multi-turn with Matryoshka (16, 32, 64, 128)",
}
STAGE2_VARIANTS = {
    "given_lr5e-4": "given negatives, lr 5e-4 (the sample's default)",
    "given_lr5e-5": "given negatives, lr 5e-5 (the official stage-2 rate)",
    "none_lr5e-5": "no hard negatives, lr 5e-5",
    "mined_lr5e-5": "mined, filtered negatives, lr 5e-5",
}


def _spread(values: Sequence[float]) -> str:
    """``mean ± sd (n)``; one value alone has no spread."""
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def _by(rows: Sequence[Mapping[str, Any]], key: str, name: str) -> list[Mapping[str, Any]]:
    return sorted((row for row in rows if row[key] == name), key=lambda row: row["seed"])


def stage1_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The stage-1 ablation: each configuration's full-width MMEB-format and M-BEIR local averages over seeds."""
    lines = [
        "| stage 1 | MMEB-format average | M-BEIR local average | MMEB per seed | steps | minutes per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for config, label in STAGE1_CONFIGS.items():
        runs = _by(rows, "config", config)
        if runs:
            mmeb = [run["mmeb_average"]["full"] for run in runs]
            mbeir = [run["mbeir_local_average"]["full"] for run in runs]
            per_seed = ", ".join(f"{run['seed']}: {run['mmeb_average']['full']:.3f}" for run in runs)
            minutes = statistics.median(run["wall_s"] for run in runs) / 60  # train and evaluate, 2 cores
            lines.append(
                f"| {label} | {_spread(mmeb)} | {_spread(mbeir)} | {per_seed} | {runs[0]['steps']} | {minutes:.1f} |"
            )
    return "\n".join(lines)


def matryoshka_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """MMEB-format average per width: trained with Matryoshka, without it (the multi-turn runs), untrained."""
    on, off = _by(rows, "config", "mrl"), _by(rows, "config", "multi_turn")
    widths = [*sorted((w for w in on[0]["mmeb_average"] if w != "full"), key=int), "full"]
    lines = ["| width | Matryoshka on | Matryoshka off | untrained backbone |", "| ---: | --- | --- | --- |"]
    for width in widths:
        untrained = statistics.mean(run["baseline_mmeb_average"][width] for run in on)
        cells = [_spread([run["mmeb_average"][width] for run in runs]) for runs in (on, off)]
        lines.append(f"| {width} | {cells[0]} | {cells[1]} | {untrained:.3f} |")
    return "\n".join(lines)


def stage2_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Stage 2 on each seed's stage-1 model: MMEB-format average and its change from that stage-1 model."""
    lines = [
        "| after stage 1 | MMEB-format average | change from stage 1, per seed | M-BEIR local average |",
        "| --- | --- | --- | --- |",
    ]
    if not rows:
        return f"No stage-2 run is recorded in {STAGE2_ABLATIONS_FILE} yet."
    stage1 = {row["seed"]: row for row in rows}
    first = [stage1[seed]["stage1_mmeb_average"] for seed in sorted(stage1)]
    first_mbeir = [stage1[seed]["stage1_mbeir_local_average"] for seed in sorted(stage1)]
    lines.append(f"| nothing (stage 1 alone) | {_spread(first)} | — | {_spread(first_mbeir)} |")
    for variant, label in STAGE2_VARIANTS.items():
        runs = _by(rows, "stage2", variant)
        if runs:
            change = ", ".join(
                f"{run['seed']}: {run['mmeb_average'] - run['stage1_mmeb_average']:+.3f}" for run in runs
            )
            mmeb = _spread([run["mmeb_average"] for run in runs])
            lines.append(f"| {label} | {mmeb} | {change} | {_spread([run['mbeir_local_average'] for run in runs])} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Block:
    """A generated block: the result file it is made from and the function that writes it."""

    source: Path
    write: Callable[[Any], str]


# Each document's generated blocks, by name.
BLOCKS: dict[str, dict[str, Block]] = {
    "README.md": {
        "default-run-results": Block(RECORD_FILE, readme_results),
        "stage1-ablation": Block(STAGE1_ABLATIONS_FILE, stage1_table),
        "stage2-ablation": Block(STAGE2_ABLATIONS_FILE, stage2_table),
    },
    "docs/evaluation.md": {
        "default-run-results": Block(RECORD_FILE, evaluation_results),
        "matryoshka-ablation": Block(STAGE1_ABLATIONS_FILE, matryoshka_table),
    },
}


def read_results(path: Path) -> Any:
    """A result file: a JSON record, or a list of one JSON object per line for ``.jsonl``."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def markers(name: str, source: Path = RECORD_FILE) -> tuple[str, str]:
    """The comment lines around block ``name``, made from ``source``."""
    return (
        f"<!-- {name}: generated by `python -m muco_flow.docs_numbers write` from {source}; do not edit -->",
        f"<!-- end of {name} -->",
    )


def with_blocks(text: str, blocks: Mapping[str, str], document: str, sources: Mapping[str, Path] | None = None) -> str:
    """``text`` with each named block's lines between its markers replaced by ``blocks[name]``."""
    for name, body in blocks.items():
        start, end = markers(name, (sources or {}).get(name, RECORD_FILE))
        if start not in text or end not in text:
            raise ValueError(f"{document} has no block {name}: add the lines {start!r} and {end!r} where it goes")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def generated(root: Path, document: str) -> str:
    """``document`` (under ``root``) with every generated block written from its result file."""
    blocks = BLOCKS[document]
    bodies = {name: block.write(read_results(root / block.source)) for name, block in blocks.items()}
    sources = {name: block.source for name, block in blocks.items()}
    return with_blocks((root / document).read_text(), bodies, document, sources)


def stale_blocks(root: Path) -> list[str]:
    """The documents (under ``root``) whose generated blocks differ from their result files, with the blocks."""
    return [
        f"{document} ({', '.join(BLOCKS[document])})"
        for document in BLOCKS
        if generated(root, document) != (root / document).read_text()
    ]


def write_blocks(root: Path) -> None:
    """Rewrites every document's generated blocks from their result files."""
    for document in BLOCKS:
        (root / document).write_text(generated(root, document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muco_flow.docs_numbers", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "write", "check"])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project directory (default: here)")
    parser.add_argument("--source", default="`kedro run` (the default run) in a fresh project, seed 0")
    args = parser.parse_args(argv)
    record_path = args.root / RECORD_FILE
    if args.action == "record":
        metrics = json.loads((args.root / METRICS_FILE).read_text())
        train_run = json.loads((args.root / TRAIN_RUN_FILE).read_text())
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(run_record(metrics, train_run, args.source), indent=2) + "\n")
        return 0
    if args.action == "write":
        write_blocks(args.root)
        return 0
    stale = stale_blocks(args.root)
    for document in stale:
        print(f"{document} differs from docs/results/: run `python -m muco_flow.docs_numbers write`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""The numbers README.md and docs/evaluation.md state about the default run, generated from one run record.

The record (docs/results/default_run.json) is a small JSON made from a
default run's outputs; the documents hold its numbers in blocks between
marker comments, which only this module writes::

    python -m muco_flow.docs_numbers record   # the record, from metrics.json and train_run.json of a run here
    python -m muco_flow.docs_numbers write    # the blocks in README.md and docs/evaluation.md, from the record
    python -m muco_flow.docs_numbers check    # exit status 1 naming every block that differs from the record

so a number cannot drift from the run it came from (tests/test_docs_numbers.py runs `check`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RECORD_FILE = Path("docs/results/default_run.json")
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


# Each document's generated blocks, by name: what writes it.
BLOCKS: dict[str, dict[str, Callable[[Mapping[str, Any]], str]]] = {
    "README.md": {"default-run-results": readme_results},
    "docs/evaluation.md": {"default-run-results": evaluation_results},
}


def markers(name: str) -> tuple[str, str]:
    """The comment lines around block ``name``."""
    return (
        f"<!-- {name}: generated by `python -m muco_flow.docs_numbers write` from {RECORD_FILE}; do not edit -->",
        f"<!-- end of {name} -->",
    )


def with_blocks(text: str, blocks: Mapping[str, str], document: str) -> str:
    """``text`` with each named block's lines between its markers replaced by ``blocks[name]``."""
    for name, body in blocks.items():
        start, end = markers(name)
        if start not in text or end not in text:
            raise ValueError(f"{document} has no block {name}: add the lines {start!r} and {end!r} where it goes")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def stale_blocks(root: Path, record: Mapping[str, Any]) -> list[str]:
    """The documents (under ``root``) whose generated blocks differ from what ``record`` gives, by name."""
    stale = []
    for document, writers in BLOCKS.items():
        text = (root / document).read_text()
        if with_blocks(text, {name: write(record) for name, write in writers.items()}, document) != text:
            stale.append(f"{document} ({', '.join(writers)})")
    return stale


def write_blocks(root: Path, record: Mapping[str, Any]) -> None:
    """Rewrites every document's generated blocks from ``record``."""
    for document, writers in BLOCKS.items():
        path = root / document
        path.write_text(
            with_blocks(path.read_text(), {name: write(record) for name, write in writers.items()}, document)
        )


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
    record = json.loads(record_path.read_text())
    if args.action == "write":
        write_blocks(args.root, record)
        return 0
    stale = stale_blocks(args.root, record)
    for document in stale:
        print(f"{document} differs from {RECORD_FILE}: run `python -m muco_flow.docs_numbers write`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

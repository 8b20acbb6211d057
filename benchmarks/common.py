"""What every benchmark shares: repeats and their summary, the machine and versions, JSON results, tables.

Each benchmark writes one JSON file under ``data/08_reporting/benchmarks/``:
the machine, the versions, its parameters, one entry per measurement (each
timing as median, min and max over its repeats) and its goals, each with the
value measured and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "data/08_reporting/benchmarks"
SAMPLE_DIR = PROJECT_ROOT / "data/01_raw/m3t_mini"
TINY_BACKBONE_DIR = PROJECT_ROOT / "data/06_models/tiny-qwen2-vl"
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "tokenizers", "pyarrow", "muco_flow")


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min and max of repeated measurements, and how many there were."""
    if not values:
        raise ValueError("no measurements to summarize")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def repeat_timed(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 0, budget_seconds: float | None = None
) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    Once ``budget_seconds`` of timed calls are spent, stops early (after at
    least one), so that one slow size cannot take the whole suite's time.
    """
    for _ in range(warmup):
        fn()
    seconds: list[float] = []
    while len(seconds) < repeats:
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
        if budget_seconds is not None and sum(seconds) >= budget_seconds:
            break
    return seconds


def rates(amount: float, seconds: Sequence[float]) -> dict[str, float | int]:
    """``amount`` per second for each timed repeat, summarized."""
    return summarize([amount / s for s in seconds])


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(threads: int) -> None:
    """Intra-op threads for torch in this process and in the processes it starts."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
    }


def git_commit() -> str:
    """HEAD of the checkout, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=PROJECT_ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["muco_flow_commit"] = git_commit()
    return found


def goal(description: str, target: str, measured: str, met: bool) -> dict[str, Any]:
    return {"goal": description, "target": target, "measured": measured, "met": bool(met)}


def rss_growth_goal(what: str, results: list[dict[str, Any]], dim: int, max_growth: float) -> dict[str, Any]:
    """The goal that peak RSS stays flat from the smallest pool to the largest (``results`` in pool order)."""
    first, last = results[0], results[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"]
    return goal(
        f"{what} peak RSS, {last['candidates']:,} against {first['candidates']:,} candidates (d={dim})",
        f"<= {max_growth:.2f}x",
        f"{growth:.3f}x ({first['peak_rss_mib']:.0f} -> {last['peak_rss_mib']:.0f} MiB; "
        f"the larger pool is {last['pool_mib']:.0f} MiB)",
        growth <= max_growth,
    )


def write_result(
    out_dir: Path,
    name: str,
    parameters: dict[str, Any],
    results: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    notes: list[str] | None = None,
) -> Path:
    document = {
        "benchmark": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "parameters": parameters,
        "results": results,
        "goals": goals,
        "notes": notes or [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def write_and_print(
    out_dir: Path, name: str, document: dict[str, Any], table: Callable[[dict[str, Any]], tuple[list, list]]
) -> Path:
    """Writes a benchmark's result; prints its table, its goals and where it went."""
    path = write_result(out_dir, name, document["parameters"], document["results"], document["goals"])
    print(text_table(*table(document)))
    print(goals_text(document["goals"]))
    print(f"written to {path}")
    return path


def read_result(out_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((out_dir / f"{name}.json").read_text())


def spread(summary: dict[str, float], digits: int = 1) -> str:
    """``median (min-max)`` of a summary, for tables."""
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_text(goals: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['measured']} (goal {g['target']})" for g in goals
    )


def run_fresh_process(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``python -m module args`` in a new process; returns the JSON object on its last output line.

    A fresh process is how a peak-memory figure belongs to one measurement
    alone. ``env`` adds to this process's environment.
    """
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """Options every benchmark takes: where results go, quick mode and threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON result")
    parser.add_argument(
        "--quick", action="store_true", help="the smallest settings: checks that it runs, measures nothing useful"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: each training process on a 2-core machine uses one, see launch.py)",
    )
    return parser


def load_parameters() -> dict[str, Any]:
    """The project's parameters as `kedro run` sees them in conf/base."""
    from kedro.config import OmegaConfigLoader

    from muco_flow import settings

    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **{**settings.CONFIG_LOADER_ARGS, "default_run_env": "base"})
    return loader["parameters"]

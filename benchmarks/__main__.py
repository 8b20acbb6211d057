"""Runs every benchmark, each in its own process, then writes one report of all their tables.

    python -m benchmarks                  # all of them (make bench)
    python -m benchmarks --quick          # the smallest settings: checks that they run
    python -m benchmarks --only zero_memory retrieval_scaling
    python -m benchmarks --update-docs    # also puts the report into docs/performance.md

Each benchmark writes its JSON under data/08_reporting/benchmarks/; the
report (report.md there) holds the machine, the versions, every table and
every goal with what was measured.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

BENCHMARKS = (
    "training_throughput",
    "data_path",
    "ingest_scaling",
    "data_parallelism",
    "retrieval_scaling",
    "zero_memory",
    "grad_cache_memory",
    "evaluation_memory",
    "mining_memory",
    "training_input",
    "backbone_cpu",
)
TITLES = {
    "training_throughput": "Multi-turn against single-turn training throughput",
    "data_path": "Data path against training's consumption",
    "ingest_scaling": "Ingest scaling",
    "data_parallelism": "Ingest and format on 2 processes against 1, and as parts",
    "retrieval_scaling": "Retrieval scoring scaling (chunked top-k)",
    "zero_memory": "ZeRO memory per rank, 2 processes (bytes measured, theory in parentheses)",
    "grad_cache_memory": "GradCache memory: bounded by the chunk, not the batch",
    "evaluation_memory": "Evaluation memory (real reader, M-BEIR-shaped pools) and scoring on 1 and 2 processes",
    "mining_memory": "Hard-negative mining: throughput and memory with pools encoded to disk in blocks (d=1536)",
    "training_input": "Training input at realistic sizes (391 image tokens, 89 KB JPEGs)",
    "backbone_cpu": "Released 2B-class backbones on the CPU: one DoRA step, fp32, random weights",
}
DOCS = common.PROJECT_ROOT / "docs/performance.md"
DOCS_BEGIN = "<!-- benchmark results: begin -->"
DOCS_END = "<!-- benchmark results: end -->"


def report(out_dir: Path, names: list[str], seconds: dict[str, float], command: str) -> str:
    """Markdown: where and how it ran, then each benchmark's table and goals."""
    documents = {name: common.read_result(out_dir, name) for name in names if (out_dir / f"{name}.json").exists()}
    if not documents:
        return "No benchmark results.\n"
    first = next(iter(documents.values()))
    machine, versions = first["machine"], first["versions"]
    lines = [
        f"Command: `{command}`, {sum(seconds.values()) / 60:.1f} minutes in all "
        f"({', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())}).",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, Python {machine['python']}, "
        f"load average {machine['load_average_1m']:.1f} at the start. "
        + ", ".join(f"{package} {v}" for package, v in versions.items() if package != "muco_flow_commit")
        + f", commit {versions['muco_flow_commit']}.",
        "",
        "Timings: median (min-max) over repeats.",
    ]
    for name, document in documents.items():
        module = importlib.import_module(f"benchmarks.{name}")
        lines += ["", f"### {TITLES[name]}", "", common.markdown_table(*module.table(document)), ""]
        lines += [f"- {'met' if g['met'] else '**missed**'}: {g['goal']}: {g['measured']} (goal {g['target']})"
                  for g in document["goals"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def update_docs(markdown: str, docs: Path = DOCS) -> None:
    """Replaces what stands between the results markers of ``docs`` with ``markdown``."""
    text = docs.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{docs} has no results section between '{DOCS_BEGIN}' and '{DOCS_END}'")
    before, rest = text.split(DOCS_BEGIN, 1)
    after = rest.split(DOCS_END, 1)[1]
    docs.write_text(f"{before}{DOCS_BEGIN}\n\n{markdown}\n{DOCS_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--update-docs", action="store_true", help=f"replace the results section of {DOCS.name}")
    args = parser.parse_args(argv)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    seconds: dict[str, float] = {}
    failed = []
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        began = time.perf_counter()
        options = ["--out", str(args.out), *(["--quick"] if args.quick else [])]
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *options], cwd=common.PROJECT_ROOT).returncode:
            failed.append(name)
        seconds[name] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report(args.out, [n for n in args.only if n not in failed], seconds, command)
    (args.out / "report.md").write_text(markdown)
    print(f"\n{sum(seconds.values()) / 60:.1f} minutes; report: {args.out / 'report.md'}")
    if args.update_docs:
        update_docs(markdown)
        print(f"updated {DOCS}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

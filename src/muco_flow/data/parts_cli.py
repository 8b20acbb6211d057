"""Data steps as parts of a job spread over machines (a SLURM array task or a torchrun node each), then a merge.

    python -m muco_flow.data.parts_cli ingest-part --source s3://bucket/m3t --output /shared/m3t_shards
    python -m muco_flow.data.parts_cli ingest-merge --output /shared/m3t_shards --num-parts 8
    python -m muco_flow.data.parts_cli format-part --shards /shared/m3t_shards \\
        --backbone /shared/models/Qwen2-VL-2B-Instruct --output /shared/m3t_conversations
    python -m muco_flow.data.parts_cli format-merge --shards /shared/m3t_shards \\
        --output /shared/m3t_conversations --num-parts 8

``--part-index`` and ``--num-parts`` default to SLURM's array variables
(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or torchrun's node variables
(GROUP_RANK, GROUP_WORLD_SIZE). Each part runs ``num_workers`` processes
(``ingest.num_workers``, ``format.num_workers`` in the parameter files). The merge runs once, after
every part, and writes the manifest the pipelines read. ``--params`` may be
given several times: later files override earlier keys, as Kedro's
environments do (conf/base, then conf/<env>).

A step is a pair of commands in COMMANDS (``<step>-part``, ``<step>-merge``):
another step joins by adding its own ``Command`` entries.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from muco_flow.data import schema

PART_INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "GROUP_RANK")
NUM_PARTS_VARIABLES = ("SLURM_ARRAY_TASK_COUNT", "GROUP_WORLD_SIZE")


def _from_environment(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise SystemExit(f"{name}={value!r} is not a whole number") from None
    return None


def num_parts(args: argparse.Namespace) -> int:
    """``--num-parts``, else the SLURM array's or torchrun's count."""
    count = args.num_parts if args.num_parts is not None else _from_environment(NUM_PARTS_VARIABLES)
    if count is None:
        raise SystemExit(
            f"give --num-parts (or run in a SLURM array or under torchrun: {', '.join(NUM_PARTS_VARIABLES)})"
        )
    return count


def part(args: argparse.Namespace) -> tuple[int, int]:
    """(part index, number of parts) from the arguments, else the SLURM array's or torchrun's variables."""
    index = args.part_index if args.part_index is not None else _from_environment(PART_INDEX_VARIABLES)
    if index is None:
        raise SystemExit(
            f"give --part-index (or run in a SLURM array or under torchrun: {', '.join(PART_INDEX_VARIABLES)})"
        )
    return index, num_parts(args)


def section_params(paths: list[str], section: str) -> dict[str, Any]:
    """The ``section`` of the parameter files, later files overriding earlier top-level keys of it."""
    merged: dict[str, Any] = {}
    for path in paths:
        params = yaml.safe_load(Path(path).read_text()) or {}
        if section not in params:
            raise SystemExit(f"{path} has no '{section}' section")
        merged |= params[section]
    return merged


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, the arguments beyond the shared ones, and what it does."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    params_section: str  # the section of the parameter files it reads
    is_part: bool  # takes --part-index


def _ingest_part_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="a local snapshot directory or s3://bucket/prefix")
    parser.add_argument("--meta-file", default=schema.TRAIN_META_FILE, help="the meta file below the source")


def _run_ingest_part(args: argparse.Namespace) -> None:
    from muco_flow.data.ingest import IngestConfig
    from muco_flow.data.m3t_ingest import ingest_m3t_part
    from muco_flow.data.sources import open_snapshot

    index, count = part(args)
    config = IngestConfig.from_params(section_params(args.params, "ingest"))
    # S3 credentials and endpoint come from the environment (AWS_* variables, ~/.aws), as boto3 reads them
    source = open_snapshot(args.source, args.meta_file)
    try:
        ingest_m3t_part(source, Path(args.output), config, index, count)
    finally:
        source.close()


def _run_ingest_merge(args: argparse.Namespace) -> None:
    from muco_flow.data.ingest import merge_ingest_parts

    merge_ingest_parts(Path(args.output), num_parts(args))


def _format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="the ingest output directory (its manifest.json)")


def _format_part_arguments(parser: argparse.ArgumentParser) -> None:
    _format_arguments(parser)
    parser.add_argument("--backbone", required=True, help="the backbone checkpoint: its tokenizer and image processor")
    parser.add_argument(
        "--backbone-params",
        action="append",
        help="a parameter file with the backbone section, repeatable (default: conf/base/parameters_backbone.yml)",
    )


def _run_format_part(args: argparse.Namespace) -> None:
    from muco_flow.data.conversations import FormatConfig
    from muco_flow.data.formatting import format_m3t_part
    from muco_flow.modeling.backbone import BackboneConfig, load_processors

    index, count = part(args)
    config = FormatConfig.from_params(section_params(args.params, "format"))
    backbone = BackboneConfig.from_params(
        section_params(args.backbone_params or ["conf/base/parameters_backbone.yml"], "backbone")
    )
    tokenizer, image_processor = load_processors(
        args.backbone, trust_remote_code=backbone.trust_remote_code, image_limits=backbone.image
    )
    format_m3t_part(
        Path(args.shards), Path(args.output), tokenizer, image_processor, config, part_index=index, num_parts=count
    )


def _run_format_merge(args: argparse.Namespace) -> None:
    from muco_flow.data.formatting import merge_format_parts

    merge_format_parts(Path(args.shards), Path(args.output), num_parts(args))


COMMANDS: dict[str, Command] = {
    "ingest-part": Command(
        "ingest one part of the source's row blocks into --output",
        _ingest_part_arguments,
        _run_ingest_part,
        "ingest",
        is_part=True,
    ),
    "ingest-merge": Command(
        "once every ingest part is done: check them and write rejects and the manifest",
        lambda parser: None,
        _run_ingest_merge,
        "ingest",
        is_part=False,
    ),
    "format-part": Command(
        "format one part of the ingest shards (every num-parts-th) into --output",
        _format_part_arguments,
        _run_format_part,
        "format",
        is_part=True,
    ),
    "format-merge": Command(
        "once every format part is done: check them and write the manifest",
        _format_arguments,
        _run_format_merge,
        "format",
        is_part=False,
    ),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help)
        sub.add_argument("--output", required=True, help="the output directory, shared by every part")
        sub.add_argument("--num-parts", type=int, help=f"default: ${' or $'.join(NUM_PARTS_VARIABLES)}")
        if command.is_part:
            sub.add_argument("--part-index", type=int, help=f"default: ${' or $'.join(PART_INDEX_VARIABLES)}")
        sub.add_argument(
            "--params",
            action="append",
            help=f"a parameter file, repeatable (default: conf/base/parameters_{command.params_section}.yml)",
        )
        command.add_arguments(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = COMMANDS[args.command]
    args.params = args.params or [f"conf/base/parameters_{command.params_section}.yml"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command.run(args)


if __name__ == "__main__":
    main()

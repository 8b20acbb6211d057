"""Work split into parts over machines, and work items on several processes of one machine.

A part (a SLURM array task, a torchrun node) takes every ``num_parts``-th
item of a step (ingest's blocks, format's shards); ``check_part`` and
``part_stem`` are the split's rules for every step.

Within a machine, the state (a snapshot source with an S3 client, a
tokenizer) is set before the pool forks, so each worker inherits it instead
of receiving a pickled copy; only the items and the results cross between
processes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_state: dict[str, Any] = {}


def check_part(step: str, part_index: int, num_parts: int) -> None:
    """Refuses a part outside a split into ``num_parts`` (``step`` names the work in the message)."""
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(
            f"{step} part {part_index} of {num_parts}: need num_parts >= 1 and 0 <= part_index < num_parts"
        )


def part_stem(part_index: int, num_parts: int) -> str:
    """The file name, less its suffix, of what part ``part_index`` of ``num_parts`` leaves for the merge."""
    return f"part-{part_index:05d}-of-{num_parts:05d}"


def worker_state() -> dict[str, Any]:
    """The state handed to ``map_in_processes``, in the process running an item."""
    return _state


def map_in_processes(
    function: Callable[[Item], Result], items: Iterable[Item], workers: int, state: dict[str, Any]
) -> Iterator[Result]:
    """``function`` over ``items`` on ``workers`` forked processes (1: this one), results in item order."""
    items = list(items)
    _state.clear()
    _state.update(state)
    try:
        if workers <= 1 or len(items) <= 1:
            yield from map(function, items)
            return
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(items)), mp_context=context) as pool:
            yield from pool.map(function, items)
    finally:
        _state.clear()

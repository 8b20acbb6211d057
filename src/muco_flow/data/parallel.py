"""Work items on several processes of one machine, with unpicklable shared state.

The state (a snapshot source with an S3 client, a tokenizer) is set before
the pool forks, so each worker inherits it instead of receiving a pickled
copy; only the items and the results cross between processes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_state: dict[str, Any] = {}


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

"""Progress of long loops (training steps, evaluation sets): a bar with ETA on a terminal, a line every N s off one.

tqdm's own throttle (``mininterval``) redraws a terminal bar; written to a
file or a SLURM log, each redraw is another line, hundreds per run. Off a
terminal a line goes to the log at most every ``every_s`` seconds, and one
when the loop ends.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

logger = logging.getLogger(__name__)


class ProgressLines:
    """Off-terminal progress: ``update(n)`` logs "desc: done/total unit (p%), rate, ETA" at most every ``every_s``.

    ``clock`` (seconds, monotonic) and ``write`` (one line) are injectable; by
    default time.monotonic and this module's logger.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        every_s: float,
        initial: int = 0,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = logger.info,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self._start_done = initial
        self.clock, self.write = clock, write
        self.postfix = ""
        self._started = self._last = clock()

    def set_postfix(self, **values: object) -> None:
        """Values shown after the count (e.g. the loss), from the next line on, as tqdm's bar does."""
        self.postfix = "".join(f", {name}={value}" for name, value in values.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.write(self.line(now))

    def close(self) -> None:
        """The last line: where the loop ended."""
        now = self.clock()
        self.write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self._started
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f", ETA {_clock_time(left / rate)}" if rate > 0 and left > 0 else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {_clock_time(elapsed)} elapsed, "
            f"{rate:.2f} {self.unit}/s{eta}{self.postfix}"
        )

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def progress(
    total: int,
    *,
    desc: str,
    unit: str,
    every_s: float,
    initial: int = 0,
    disable: bool = False,
    file: IO[str] | None = None,
) -> Any:
    """A tqdm bar with ETA when ``file`` (default stdout) is a terminal, else ProgressLines; both take update/close.

    ``disable``: neither (e.g. every rank but the first).
    """
    stream = file or sys.__stdout__
    if disable or stream is None or stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, mininterval=2.0, disable=disable)
    return ProgressLines(total, desc=desc, unit=unit, every_s=every_s, initial=initial)

"""Progress off a terminal: a line every N seconds of a simulated clock, never one per step."""

from __future__ import annotations

import io
import math

from muco_flow.progress import ProgressLines, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_loop_of_t_seconds_writes_at_most_t_over_n_plus_one_lines():
    for step_s, seconds, every_s in ((0.5, 100.0, 30.0), (0.1, 61.0, 30.0), (7.0, 700.0, 30.0), (2.0, 10.0, 30.0)):
        clock, lines = Clock(), []
        steps = round(seconds / step_s)
        with ProgressLines(steps, desc="train", unit="step", every_s=every_s, clock=clock, write=lines.append) as shown:
            for _ in range(steps):
                clock.now += step_s
                shown.update()
        assert 1 <= len(lines) <= math.ceil(seconds / every_s) + 1, (step_s, seconds, lines)
        assert lines[-1].startswith(f"train: {steps}/{steps} step (100%)")


def test_a_line_states_count_share_rate_eta_and_postfix():
    clock, lines = Clock(), []
    shown = ProgressLines(10, desc="train", unit="step", every_s=30, clock=clock, write=lines.append)
    clock.now += 29.0
    shown.update(3)
    assert lines == []  # within the first 30 s: nothing yet
    clock.now += 1.0
    shown.set_postfix(loss="1.234")
    shown.update()
    # 4 steps in 30 s: 0.13 step/s, 6 steps left take 45 s
    assert lines == ["train: 4/10 step (40%), 0:30 elapsed, 0.13 step/s, ETA 0:45, loss=1.234"]
    resumed = ProgressLines(100, desc="train", unit="step", every_s=30, initial=40, clock=clock, write=lines.append)
    clock.now += 3600.0
    resumed.update(30)  # a resumed run's rate counts its own steps: 30 in an hour, 30 left
    assert lines[-1] == "train: 70/100 step (70%), 1:00:00 elapsed, 0.01 step/s, ETA 1:00:00"


def test_a_terminal_gets_a_bar_and_a_file_gets_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = progress(4, desc="evaluate", unit="set", every_s=30, file=terminal)
    bar.update(4)
    bar.close()
    assert "evaluate: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert isinstance(progress(4, desc="evaluate", unit="set", every_s=30, file=io.StringIO()), ProgressLines)
    quiet = io.StringIO()
    silent = progress(4, desc="evaluate", unit="set", every_s=30, file=quiet, disable=True)
    silent.update(4)
    silent.close()
    assert quiet.getvalue() == ""

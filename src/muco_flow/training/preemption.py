"""Stopping a training on request: SLURM's preemption or time limit, `scancel`, `kill`.

SLURM sends SIGTERM to every process of a job when it preempts it or its
time limit comes, then SIGKILL ``KillWait`` seconds later (30 by default), and
``sbatch --signal=B:USR1@N`` sends SIGUSR1 ``N`` seconds before the limit.
Each rank takes SIGTERM and SIGUSR1 as a request to stop (``StopRequest``);
the ranks agree after every step whether any of them got one
(``agreed_stop``, one small all-reduce), so all stop after the same step and
none waits in a collective for a rank that has left. They then write a
checkpoint of that step if it is newer than the last one and still fits in
``training.preemption.grace_s`` (``checkpoint_fits``), rank 0 ends the MLflow
run KILLED with the tag ``muco_flow.stopped=preempted``, and every rank exits
with ``PREEMPTED_EXIT_CODE`` after printing a ``PREEMPTED_MARKER`` line, from
which the launcher tells the user the step (``Preemption.from_output``).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from muco_flow.training.distributed import all_reduce_scalar

# What a rank takes as a request to stop: SLURM's preemption and time limit, `scancel`, `kill`; `--signal=USR1@N`
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A preempted rank's exit status: EX_TEMPFAIL of sysexits.h, "try again later", which resumes
PREEMPTED_EXIT_CODE = 75
# The start of the line each preempted rank prints; the launcher reads the step from it
PREEMPTED_MARKER = "muco-flow training preempted"
# Seconds of the grace kept for what follows the checkpoint: ending the MLflow run, the processes exiting
EXIT_RESERVE_S = 3.0


class StopRequest:
    """The first stop signal this process received, and when; ``install`` makes the handlers set it.

    The handler only records: the training loop decides where to stop, so a
    signal never interrupts a step, a collective or a checkpoint save halfway.
    """

    def __init__(self) -> None:
        self.signal_number = 0
        self.received_at: float | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.record)

    def record(self, signum: int, frame: Any = None) -> None:
        if not self.signal_number:
            self.signal_number, self.received_at = signum, time.monotonic()

    def seconds_since(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A batch worker's start (DataLoader ``worker_init_fn``): stop signals are its rank's to act on.

    SLURM signals every process of the job, batch workers included; one dying
    of it would fail its rank's next batch, or the rank itself through the
    DataLoader's SIGCHLD handler, in the middle of the step it is finishing.
    The rank ends its workers when it stops.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def agreed_stop(request: StopRequest) -> str | None:
    """The stop signal's name if any rank received one, on every rank alike; None to go on.

    One all-reduce (MAX) of each rank's signal number: cheap next to a step,
    and it keeps every rank in step with the others, so that none is left
    waiting in a collective for a rank that has stopped.
    """
    number = int(all_reduce_scalar(request.signal_number, "max", torch.int64))
    return signal.Signals(number).name if number else None


def checkpoint_fits(request: StopRequest, grace_s: float, save_seconds: float) -> bool:
    """Whether every rank can still write a checkpoint (as long as the last one took) within the grace.

    The grace runs from the signal: the launcher kills what is left after
    ``grace_s`` and SLURM after its KillWait. ``EXIT_RESERVE_S`` stays for
    ending the MLflow run and exiting. All ranks get the same answer (MIN).
    """
    fits = int(request.seconds_since() + save_seconds + EXIT_RESERVE_S <= grace_s)
    return bool(all_reduce_scalar(fits, "min", torch.int64))


@dataclass(frozen=True)
class Preemption:
    """Where a training stopped on a signal: after ``step``; a new start resumes from ``resume_step``."""

    step: int
    signal_name: str
    resume_step: int

    def outcome(self) -> str:
        """What the stop kept of the training: a checkpoint of its step, or which one it resumes from."""
        if self.resume_step == self.step:
            return f"checkpoint step {self.step} holds it"
        if self.resume_step == 0:
            return "no checkpoint of it fitted in training.preemption.grace_s and there is none before it"
        return f"no checkpoint of it fitted in training.preemption.grace_s; the newest is of step {self.resume_step}"

    def describe(self) -> str:
        """One line, the same from every rank; ``from_output`` reads it back."""
        return (
            f"stopped at step {self.step} by {self.signal_name}: {self.outcome()}; resumes from step {self.resume_step}"
        )

    @classmethod
    def from_output(cls, lines: Iterable[str]) -> Preemption | None:
        """The preemption a rank reported in ``lines`` (the training's output), or None."""
        for line in lines:
            if PREEMPTED_MARKER in line:
                found = _DESCRIBED.search(line)
                if found:
                    return cls(int(found["step"]), found["signal"], int(found["resume"]))
        return None


_DESCRIBED = re.compile(r"stopped at step (?P<step>\d+) by (?P<signal>\w+): .*; resumes from step (?P<resume>\d+)")


class PreemptedError(Exception):
    """Raised by a rank that stopped on a signal, once its checkpoint and MLflow run are done."""

    def __init__(self, preemption: Preemption) -> None:
        super().__init__(preemption.describe())
        self.preemption = preemption

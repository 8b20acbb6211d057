"""A module run under torchrun on this node or several: the command, the environment, its output streamed.

Training (``training.launch``) and multi-process evaluation
(``evaluation.ranks``) both start their ranks here.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

# Signals that stop a launch: `kill PID`, `timeout`, SLURM's scancel, preemption and time limit, Ctrl-C, and the
# SIGUSR1 that `sbatch --signal=USR1@N` sends ahead of the time limit.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What torchrun passes on to its ranks (its default and SIGUSR1, which would otherwise end torchrun alone)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# How long the ranks have, once signalled, to end on their own before the group is killed.
STOP_GRACE_S = 30.0


class LaunchInterrupted(SystemExit):
    """The launcher was told to stop (SIGTERM or SIGINT); torchrun and every rank have ended.

    A SystemExit, as an interrupt should be: no node-failure handler takes it
    for a bug, ``finally`` blocks (the training lock) run once the ranks are
    gone, and the run ends with this one line, not a traceback.
    """

    def __init__(self, signal_name: str, tail: list[str] | None = None, message: str | None = None) -> None:
        super().__init__(
            message or f"stopped by {signal_name}: passed on to torchrun and its ranks, which have all ended"
        )
        self.signal_name = signal_name
        self.tail = tail or []  # the last lines the processes wrote: what they did with the signal


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def torchrun_command(
    config_path: Path, launcher: dict[str, Any], module: str, grace_s: float = STOP_GRACE_S
) -> list[str]:
    """torchrun of ``module`` on the config file: one process per GPU (or per `processes_per_node` on CPU).

    A signal torchrun gets (TORCHRUN_SIGNALS) is passed on to the ranks, which
    then have ``grace_s`` to end before torchrun kills them: the same grace
    as the launcher's (``run_process_group``), so neither cuts the other's short.

    A single node with no master_port uses torchrun's `--standalone`
    rendezvous, which binds a free port itself and keeps it (choosing one here
    and closing it would race with other runs on the machine). Several nodes
    must agree on an address and port: a static rendezvous on them.
    """
    port = launcher.get("master_port")
    nodes = launcher.get("nodes", 1)
    if port is None and nodes > 1:
        raise ValueError("training.launcher.master_port must be set when training on several nodes")
    if port is None:
        rendezvous = ["--standalone", "--nnodes=1"]
    else:
        rendezvous = [
            f"--nnodes={nodes}",
            f"--node_rank={launcher.get('node_rank', 0)}",
            f"--master_addr={launcher.get('master_addr', '127.0.0.1')}",
            f"--master_port={port}",
        ]
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={launcher['processes_per_node']}",
        *rendezvous,
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={math.ceil(grace_s)}",
        "-m", module, str(config_path),
    ]  # fmt: skip


def run_torchrun(
    config_path: Path,
    launcher: dict[str, Any],
    module: str,
    stream: TextIO | None = None,
    error_marker: str | None = None,
    grace_s: float = STOP_GRACE_S,
) -> tuple[int, list[str], list[str]]:
    """Runs ``module`` under torchrun, streaming its output; returns the exit code, the ranks' one-line causes
    (lines holding ``error_marker``) and the last 200 lines. A SIGTERM or SIGINT stops them all
    (``run_process_group``)."""
    env = dict(os.environ)
    if on_cpu():
        cores = os.cpu_count() or 1
        env.setdefault("DS_ACCELERATOR", "cpu")
        # one thread per process: two processes on two cores do not fight over them
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // launcher["processes_per_node"])))
    command = torchrun_command(config_path, launcher, module, grace_s)
    return run_process_group(command, env, stream, error_marker, grace_s)


def run_process_group(
    command: list[str],
    env: dict[str, str],
    stream=None,
    error_marker: str | None = None,
    grace_s: float = STOP_GRACE_S,
) -> tuple[int, list[str], list[str]]:
    """Runs ``command`` in a process group of its own, streaming its output; see ``run_torchrun``.

    SIGTERM or SIGINT to this process is passed on to the whole group (torchrun
    and its ranks), and this process waits until they have all ended: up to
    ``grace_s`` seconds, then the group is killed; a second signal kills it at
    once. Then LaunchInterrupted is raised. Without this, `kill PID` ended
    the launcher alone, releasing the training lock while the ranks trained on.
    """
    env = {**env, "PYTHONUNBUFFERED": "1"}
    stream = stream or sys.stdout
    # Only the main thread may install signal handlers. Off it (Kedro's
    # ThreadRunner) torchrun stays in this process's group, as before: Ctrl-C
    # on a terminal then reaches it directly, but `kill PID` does not.
    own_group = threading.current_thread() is threading.main_thread()
    received: list[int] = []
    process: subprocess.Popen[str] | None = None

    def kill() -> None:
        if process is not None and own_group:
            _signal_group(process, signal.SIGKILL)
        elif process is not None:
            process.kill()

    killer = threading.Timer(grace_s, kill)
    killer.daemon = True

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if process is None:
            return  # not started yet: it will not be
        if len(received) == 1:
            _signal_group(process, signum)
            killer.start()
        else:
            kill()

    with _signal_handlers(forward if own_group else None):
        if received:
            raise LaunchInterrupted(signal.Signals(received[0]).name, [])
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            process_group=0 if own_group else None,
        )
        tail: list[str] = []
        causes: list[str] = []
        try:
            assert process.stdout is not None
            for line in process.stdout:  # ends when every process of the group has closed the pipe
                stream.write(line)
                tail = [*tail[-199:], line]
                if error_marker and error_marker in line:
                    causes.append(line.strip())
            returncode = process.wait()
        finally:
            if process.poll() is None:  # the loop itself failed (a closed stream): leave no rank behind
                kill()
                process.wait()
            killer.cancel()
    if received:
        raise LaunchInterrupted(signal.Signals(received[0]).name, tail)
    return returncode, causes, tail


@contextmanager
def _signal_handlers(handler: Any) -> Iterator[None]:
    """``handler`` for FORWARDED_SIGNALS inside the block (none if it is None), the previous ones after it."""
    if handler is None:
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    with suppress(ProcessLookupError):  # every process of the group has ended already
        os.killpg(process.pid, signum)  # its group: torchrun was started as the group's leader

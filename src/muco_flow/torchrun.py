"""A module run under torchrun on this node or several: the command, the environment, its output streamed.

Training (``training.launch``) and multi-process evaluation
(``evaluation.ranks``) both start their ranks here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def torchrun_command(config_path: Path, launcher: dict[str, Any], module: str) -> list[str]:
    """torchrun of ``module`` on the config file: one process per GPU (or per `processes_per_node` on CPU).

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
        "-m", module, str(config_path),
    ]  # fmt: skip


def run_torchrun(
    config_path: Path,
    launcher: dict[str, Any],
    module: str,
    stream: TextIO | None = None,
    error_marker: str | None = None,
) -> tuple[int, list[str], list[str]]:
    """Runs ``module`` under torchrun, streaming its output; returns the exit code, the ranks' one-line causes
    (lines holding ``error_marker``) and the last 200 lines."""
    env = dict(os.environ)
    if on_cpu():
        cores = os.cpu_count() or 1
        env.setdefault("DS_ACCELERATOR", "cpu")
        # one thread per process: two processes on two cores do not fight over them
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // launcher["processes_per_node"])))
    env["PYTHONUNBUFFERED"] = "1"
    stream = stream or sys.stdout
    process = subprocess.Popen(
        torchrun_command(config_path, launcher, module),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: list[str] = []
    causes: list[str] = []
    assert process.stdout is not None  # stdout=PIPE
    for line in process.stdout:
        stream.write(line)
        tail = [*tail[-199:], line]
        if error_marker and error_marker in line:
            causes.append(line.strip())
    return process.wait(), causes, tail

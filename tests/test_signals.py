"""SIGTERM or SIGINT to the launching process stops every process it started: none outlives it.

A launcher process (standing in for `kedro`) runs a real process tree
through ``run_process_group``, or torchrun through ``run_torchrun``; the
test signals the launcher alone, as `kill PID` and `timeout` do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from muco_flow.torchrun import LaunchInterrupted, run_process_group

REPO = Path(__file__).resolve().parents[1]

# A parent that starts a child; both write their pid, their group and then sleep; IGNORE makes both ignore SIGTERM.
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    pids, role = Path(sys.argv[1]), sys.argv[2]
    if sys.argv[3] == "IGNORE":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "parent":
        subprocess.Popen([sys.executable, "-c", sys.argv[4], str(pids), "child", sys.argv[3], sys.argv[4]])
    (pids / role).write_text(f"{os.getpid()} {os.getpgid(0)}")
    print(role, "ready", flush=True)
    time.sleep(600)
    """
)

LAUNCHER = textwrap.dedent(
    """
    import os, sys
    from muco_flow.torchrun import run_process_group
    command = [sys.executable, "-c", sys.argv[1], sys.argv[2], "parent", sys.argv[3], sys.argv[1]]
    run_process_group(command, dict(os.environ), grace_s=float(sys.argv[4]))
    """
)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its exit status is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_files(folder: Path, names: list[str], timeout_s: float = 120) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {name: (folder / name).read_text() for name in names if (folder / name).exists()}
        if len(found) == len(names) and all(text.strip() for text in found.values()):
            return {name: [int(n) for n in text.split()] for name, text in found.items()}
        time.sleep(0.1)
    raise AssertionError(f"no pid files {names} in {folder} after {timeout_s} s")


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    # a session of its own, so that nothing the test sends reaches pytest
    return subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_launcher(launcher: subprocess.Popen, signum: int, timeout_s: float) -> tuple[float, str]:
    """Sends ``signum`` to the launcher alone; the seconds it took to end and its stderr."""
    sent = time.monotonic()
    launcher.send_signal(signum)
    try:
        _, stderr = launcher.communicate(timeout=timeout_s)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    return time.monotonic() - sent, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_ends_the_whole_tree_first(tmp_path, signum):
    launcher = start([sys.executable, "-c", LAUNCHER, TREE, str(tmp_path), "DIE", "20"])
    pids = wait_for_files(tmp_path, ["parent", "child"])
    (parent, parent_group), (child, child_group) = pids["parent"], pids["child"]
    assert parent_group == child_group == parent != os.getpgid(launcher.pid)  # a group of its own, led by it

    took, stderr = stop_launcher(launcher, signum, timeout_s=20)
    assert launcher.returncode == 1 and took < 10, stderr
    assert not alive(parent) and not alive(child)
    name = signal.Signals(signum).name
    expected = f"stopped by {name}: passed on to torchrun and its ranks, which have all ended"
    assert stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in stderr


def test_processes_that_ignore_sigterm_are_killed_after_the_grace(tmp_path):
    grace_s = 2.0
    launcher = start([sys.executable, "-c", LAUNCHER, TREE, str(tmp_path), "IGNORE", str(grace_s)])
    pids = wait_for_files(tmp_path, ["parent", "child"])
    time.sleep(0.2)  # both have installed SIG_IGN before writing their pid; keep clear of interpreter start-up

    took, stderr = stop_launcher(launcher, signal.SIGTERM, timeout_s=grace_s + 15)
    assert launcher.returncode == 1, stderr
    assert grace_s <= took < grace_s + 8
    assert not alive(pids["parent"][0]) and not alive(pids["child"][0])


def test_a_second_signal_kills_the_group_at_once(tmp_path):
    launcher = start([sys.executable, "-c", LAUNCHER, TREE, str(tmp_path), "IGNORE", "60"])
    pids = wait_for_files(tmp_path, ["parent", "child"])
    time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert alive(pids["parent"][0]) and alive(pids["child"][0])  # they ignore SIGTERM; the grace is 60 s
    took, _ = stop_launcher(launcher, signal.SIGINT, timeout_s=15)
    assert took < 8 and launcher.returncode == 1
    assert not alive(pids["parent"][0]) and not alive(pids["child"][0])


def test_a_run_that_ends_by_itself_restores_the_handlers_and_returns():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    lines: list[str] = []

    class Stream:
        def write(self, line: str) -> None:
            lines.append(line)

    code = "import os; print(os.getpgid(0) == os.getpid()); print('E1 bad'); raise SystemExit(3)"
    returncode, causes, tail = run_process_group([sys.executable, "-c", code], dict(os.environ), Stream(), "E1")
    assert (returncode, causes, lines) == (3, ["E1 bad"], ["True\n", "E1 bad\n"]) and tail == lines
    assert {s: signal.getsignal(s) for s in before} == before


def test_off_the_main_thread_no_handler_is_installed_and_the_group_is_shared():
    before = signal.getsignal(signal.SIGTERM)
    results: list = []
    code = "import os; print(os.getpgid(0))"

    def run() -> None:
        results.append(run_process_group([sys.executable, "-c", code], dict(os.environ), Stream()))

    lines: list[str] = []

    class Stream:
        def write(self, line: str) -> None:
            lines.append(line)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert results and results[0][0] == 0
    assert lines == [f"{os.getpgid(0)}\n"]  # this process's group: Ctrl-C on a terminal still reaches it
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_interruption_is_a_system_exit_naming_the_signal():
    error = LaunchInterrupted("SIGTERM")
    assert isinstance(error, SystemExit) and not isinstance(error, Exception)  # Kedro's `except Exception` lets it pass
    assert error.signal_name == "SIGTERM" and error.code.startswith("stopped by SIGTERM: ")


TORCHRUN_LAUNCHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from muco_flow.torchrun import run_torchrun
    run_torchrun(Path(sys.argv[1]), {"processes_per_node": 2}, "tests.sleeping_ranks", grace_s=30)
    """
)


@pytest.mark.slow
def test_sigterm_to_the_launcher_ends_torchrun_and_both_ranks(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    config = tmp_path / "config"
    config.write_text(str(pid_dir))
    launcher = start([sys.executable, "-c", TORCHRUN_LAUNCHER, str(config)], env={"OMP_NUM_THREADS": "1"})
    pids = wait_for_files(pid_dir, ["rank0", "rank1"], timeout_s=180)
    (rank0, torchrun0), (rank1, torchrun1) = pids["rank0"], pids["rank1"]
    assert torchrun0 == torchrun1 and alive(torchrun0)

    took, stderr = stop_launcher(launcher, signal.SIGTERM, timeout_s=60)
    assert launcher.returncode == 1 and took < 30, stderr[-3000:]
    assert not any(alive(pid) for pid in (rank0, rank1, torchrun0))
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: ")

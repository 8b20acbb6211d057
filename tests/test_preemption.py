"""Preemption on the rank side (training/preemption.py): the stop request, the agreement, the line the launcher reads.

A whole training stopped by SIGTERM and resumed is in tests/test_training.py.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch.multiprocessing as mp

from muco_flow.training.distributed import all_reduce_scalar
from muco_flow.training.launch import TrainingPreempted
from muco_flow.training.preemption import (
    EXIT_RESERVE_S,
    PREEMPTED_MARKER,
    STOP_SIGNALS,
    Preemption,
    StopRequest,
    agreed_stop,
    checkpoint_fits,
)


def test_the_line_a_stopped_rank_prints_tells_the_launcher_the_step_and_the_checkpoint():
    kept = Preemption(step=6, signal_name="SIGTERM", resume_step=6)
    assert kept.describe() == "stopped at step 6 by SIGTERM: checkpoint step 6 holds it; resumes from step 6"
    older = Preemption(step=7, signal_name="SIGUSR1", resume_step=4)
    assert older.describe() == (
        "stopped at step 7 by SIGUSR1: no checkpoint of it fitted in training.preemption.grace_s; "
        "the newest is of step 4; resumes from step 4"
    )
    output = [
        "train:  50%|#####     | 6/12 [00:09<00:09, loss=3.1]\n",
        f"{PREEMPTED_MARKER} (rank 1): {older.describe()}\n",
        "torch.distributed.elastic.multiprocessing.api.SignalException: Process 12 got signal: 15\n",
    ]
    assert Preemption.from_output(output) == older
    assert Preemption.from_output(["muco-flow training error (rank 0): ValueError: x\n"]) is None
    # what `kedro run` ends with: a SystemExit with one line, no traceback
    error = TrainingPreempted(older)
    assert isinstance(error, SystemExit) and not isinstance(error, Exception)
    assert error.code == (
        "training preempted at step 7 by SIGUSR1: every rank stopped after it and no checkpoint of it fitted in "
        "training.preemption.grace_s; the newest is of step 4; run the same command again to resume from step 4"
    )


@pytest.fixture
def stop_request():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    request = StopRequest()
    request.install()
    yield request
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_a_stop_signal_is_recorded_and_the_first_one_counts(stop_request):
    assert agreed_stop(stop_request) is None and stop_request.seconds_since() == 0.0
    os.kill(os.getpid(), signal.SIGUSR1)  # the process goes on: the handler only records
    os.kill(os.getpid(), signal.SIGTERM)
    assert agreed_stop(stop_request) == "SIGUSR1"  # one process, no group: its own
    assert 0.0 < stop_request.seconds_since() < 5.0


def test_a_checkpoint_fits_when_the_last_save_and_the_exit_reserve_fit_in_the_grace(stop_request):
    stop_request.record(signal.SIGTERM)
    assert checkpoint_fits(stop_request, grace_s=25.0, save_seconds=20.0)
    assert not checkpoint_fits(stop_request, grace_s=25.0, save_seconds=25.0 - EXIT_RESERVE_S + 0.5)


def _rank(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    request = StopRequest()
    if rank == 1:  # only rank 1 was signalled, long ago; rank 0 was not signalled at all
        request.record(signal.SIGTERM)
        request.received_at -= 30.0
    results[rank] = (agreed_stop(request), checkpoint_fits(request, grace_s=25.0, save_seconds=1.0))
    results[f"sum{rank}"] = all_reduce_scalar(rank + 1.5)  # 1.5 + 2.5 on both ranks
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_agrees_on_the_stop_and_on_whether_a_checkpoint_fits():
    from tests.servers import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2, join=True)
        # rank 0 stops too, and no rank checkpoints: rank 1 has no time left
        assert {rank: results[rank] for rank in (0, 1)} == {0: ("SIGTERM", False), 1: ("SIGTERM", False)}
        assert (results["sum0"], results["sum1"]) == (4.0, 4.0)

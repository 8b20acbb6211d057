"""Evaluation on several processes (one per GPU): torchrun ranks split every pool's encoding between them.

    evaluate:
      processes: 8                      # one per GPU of the node
      pool_cache_dir: data/07_model_output/pool_encodings

The evaluate node writes the settings to a work folder and runs this module
under torchrun. Each rank reads the sets from their data root, as the node
did, loads the model on its own GPU and runs the
same scoring (``score_model``) as one process does, except that it encodes
only its share of each pool's blocks (r, r + n, ...) to the pool cache, then
waits for the others' at a barrier and reads the whole pool from disk. Each
rank then encodes and scores its r-th of every set's queries against the
whole pool, on its GPU (on the CPU, with the cores shared out: torchrun's
OMP_NUM_THREADS), and the ranks gather each other's parts, so each ends
with the same metrics; rank 0 writes them. The pools are the ones a
one-process run writes and reads (the key names the kind of device, not the
GPU), so a re-run, on any number of processes, encodes only the queries.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from muco_flow.evaluation.config import EvaluationConfig

logger = logging.getLogger(__name__)

# a rank may wait at a barrier while another encodes its share of a 5.6M-candidate pool
BARRIER_TIMEOUT = timedelta(hours=12)


class EvaluationFailedError(RuntimeError):
    """A rank of a multi-process evaluation failed."""


def score_on_ranks(
    model_dir: str,
    data_root: str,
    config: EvaluationConfig,
    format_params: dict[str, Any],
    backbone: dict[str, Any],
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """``score_model``'s metrics on the sets under ``data_root``, computed by `evaluate.processes` torchrun ranks."""
    from muco_flow.torchrun import run_torchrun

    processes = config.processes
    if not config.pool_cache_dir:
        raise ValueError(
            f"evaluate.processes is {processes}: evaluation on several processes shares pools through "
            "evaluate.pool_cache_dir; set it (conf/cluster sets data/07_model_output/pool_encodings)"
        )
    with tempfile.TemporaryDirectory(prefix="muco-evaluate-") as folder:
        work = Path(folder)
        settings = {
            "model_dir": model_dir,
            "data_root": str(data_root),
            "evaluate": config.to_dict(),
            "format": format_params,
            "backbone": backbone,
            "result": str(work / "metrics.json"),
        }
        (work / "config.json").write_text(json.dumps(settings))
        launcher = {"processes_per_node": processes}
        returncode, causes, tail = run_torchrun(work / "config.json", launcher, __name__, stream)
        if returncode != 0:
            raise EvaluationFailedError(
                "\n".join([f"evaluation on {processes} processes failed (exit {returncode})", *causes, *tail[-40:]])
            )
        return json.loads((work / "metrics.json").read_text())


def main() -> None:
    """One rank: its GPU (or the CPU), its share of the pools, and rank 0's metrics file."""
    import torch
    import torch.distributed as dist

    from muco_flow.evaluation.config import EvaluationConfig
    from muco_flow.evaluation.scoring import read_evaluation_sets, score_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(Path(sys.argv[1]).read_text())
    evaluate = EvaluationConfig.from_dict(config["evaluate"])  # each rank checks the settings, as the node did
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=BARRIER_TIMEOUT)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    def gather(mine: Any) -> list[Any]:
        parts: list[Any] = [None] * ranks
        dist.all_gather_object(parts, mine)
        return parts

    metrics = score_model(
        config["model_dir"],
        read_evaluation_sets(config["data_root"], evaluate),
        evaluate,
        config["format"],
        config["backbone"],
        device=device,
        share=(rank, ranks),
        barrier=dist.barrier,
        gather=gather,
    )
    if rank == 0:
        staging = Path(config["result"] + ".tmp")
        staging.write_text(json.dumps(metrics))
        staging.replace(config["result"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Collectives used by training."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order; gradients flow back to each rank.

    With one process (or none initialised) it is the tensor itself.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():
        # torch 2.13 points to a private replacement; this public one still works
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated.*")
        return torch.cat(dist_nn.all_gather(tensor.contiguous()))


def all_gather_without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each) concatenated in rank order, for values that need no gradient."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_scalar(value: float, op: str = "sum", dtype: torch.dtype = torch.float64) -> float:
    """``value`` reduced over every rank (``op``: "sum", "max" or "min"); the value itself without a process group.

    The one-element tensor goes where the process group's backend takes it:
    NCCL reduces only CUDA tensors, gloo CPU ones.
    """
    if not dist.is_available() or not dist.is_initialized():
        return value
    on_nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
    tensor = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.item()

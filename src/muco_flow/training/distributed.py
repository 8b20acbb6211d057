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

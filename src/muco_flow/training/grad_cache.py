"""GradCache: a contrastive step over a batch larger than fits in memory with a graph.

Contrastive losses want many in-batch negatives, but a graph for every
sequence of a large batch does not fit. GradCache (Gao et al., 2021) splits
the step in three:

1. embed every chunk of the batch without a graph, remembering the random
   state before each (dropout);
2. compute the loss over all embeddings (gathered across ranks inside the
   loss function, with gradient) and its gradient with respect to this
   rank's embeddings only;
3. embed each chunk again, with a graph and the same random state, and
   back-propagate the cached gradient of its embeddings into the model.

The parameter gradients equal those of one backward through the whole batch,
while at most one chunk's activations are alive at a time. The loss function
runs once; it sees the embeddings as one batch, so the same function serves
the uncached step.

Nothing here knows the model or the loss: ``embed`` turns a chunk into a
sequence of embedding tensors (stage 1: query and target, and hard negatives;
stage 2: the main and auxiliary embedding of each side), and ``loss`` turns
the chunk-wise concatenation of those tensors into the loss and the terms to
log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

Chunk = TypeVar("Chunk")
# the loss to differentiate, and the values to log (detached by the caller)
LossFunction = Callable[[list[torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class RandomState:
    """The CPU generator's state and, when CUDA is in use, every device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _embeddings(outputs: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def grad_cache_step(
    chunks: Sequence[Chunk],
    embed: Callable[[Chunk], Sequence[torch.Tensor]],
    loss: LossFunction,
    backward: Callable[[torch.Tensor], object] = torch.Tensor.backward,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One GradCache forward/backward over ``chunks``; returns the loss and its terms, detached.

    Args:
        chunks: this rank's batch, split into parts that each fit with a graph.
        embed: a chunk's embeddings; every chunk gives the same number of
            tensors, each with one row per item of the chunk.
        loss: the loss over the batch: it gets, for each of ``embed``'s
            outputs, the concatenation over chunks, and returns the scalar
            loss of this rank and the terms to log. Every rank calls it once
            per step, so it may use collectives (all-gather with gradient).
        backward: runs the backward pass of a scalar; DeepSpeed's
            ``engine.backward`` under ZeRO, wrapped by the caller in
            ``engine.coalesce_grad_reduction()`` so that ranks reduce the
            accumulated gradients once per step, not once per chunk.

    The gradients of a chunk's embeddings are the loss's, so the parameter
    gradients accumulated over the chunks are those of one backward through
    the whole batch (up to float rounding), dropout included: each chunk is
    re-embedded with the random state it was first embedded with.
    """
    if not chunks:
        raise ValueError("grad_cache_step needs at least one chunk")
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState.capture())
            cached.append([e.detach() for e in _embeddings(embed(chunk))])
    after = RandomState.capture()  # where the uncached step would leave the generators
    widths = {len(outputs) for outputs in cached}
    if len(widths) != 1:
        raise ValueError(f"embed returned different numbers of tensors for different chunks: {sorted(widths)}")

    # The loss and its gradient with respect to this rank's embeddings. The
    # all-gather's backward sums what every rank's loss owes these rows.
    whole = [torch.cat(parts).requires_grad_() for parts in zip(*cached, strict=True)]
    value, terms = loss(whole)
    found = torch.autograd.grad(value, whole, allow_unused=True)
    gradients = [torch.zeros_like(w) if g is None else g for w, g in zip(whole, found, strict=True)]
    sizes = [[len(outputs[i]) for outputs in cached] for i in range(len(whole))]
    per_chunk = list(zip(*(g.split(s) for g, s in zip(gradients, sizes, strict=True)), strict=True))
    del whole, cached

    for chunk, state, chunk_gradients in zip(chunks, states, per_chunk, strict=True):
        state.restore()
        outputs = _embeddings(embed(chunk))
        # d(surrogate)/d(output) is the cached gradient, so backward delivers it into the model
        surrogate = sum((o * g).sum() for o, g in zip(outputs, chunk_gradients, strict=True))
        backward(surrogate)
    after.restore()
    return value.detach(), {name: term.detach() for name, term in terms.items()}

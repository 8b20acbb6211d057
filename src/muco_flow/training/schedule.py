"""The learning-rate schedule: the factor the peak rate is multiplied by at each optimizer step.

Every schedule starts with a linear warmup: step s (counted from 0) of
``warmup_steps`` gets (s + 1) / warmup_steps, so the last warmup step runs at
the peak. Then:

- ``constant``: the peak until the end (MuCo's official code,
  ``get_constant_schedule_with_warmup``; docs/recipe.md);
- ``cosine``: half a cosine from the peak down to ``min_ratio`` of it (the
  sample's default, ``min_ratio`` 0.1);
- ``linear``: a straight line from the peak down to ``min_ratio`` of it.

The decay reaches ``min_ratio`` at step ``total_steps`` (one past the last
step, so the last step runs just above it) and stays there after.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(name: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The factor of step s (from 0), for ``torch.optim.lr_scheduler.LambdaLR``.

    ``min_ratio`` is where the decaying schedules end (a fraction of the peak);
    ``constant`` ignores it. Raises ValueError naming the bad argument.
    """
    if name not in SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {SCHEDULES}, got '{name}'")
    if warmup_steps < 0:
        raise ValueError(f"warmup steps must be at least 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"the schedule's minimum ratio must be within [0, 1], got {min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        # 0 on the first step after warmup, 1 at step total_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor

"""The learning-rate schedule of every distillation run (the benchmark's, the probe's): linear warmup, then cosine
decay to a floor at the run's own last step, so runs of different budgets each get a whole schedule."""
from __future__ import annotations

import math


def cosine_rate(step: int, steps: int, lr: float, warmup: int, floor_ratio: float = 0.05) -> float:
    """The rate at `step` of `steps`: lr * (step + 1) / warmup during the warmup, then cosine from lr down to
    lr * floor_ratio at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = lr * floor_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(steps: int, share: float = 0.1) -> int:
    """A budget's warmup: `share` of its steps, at least one."""
    return max(1, round(share * steps))

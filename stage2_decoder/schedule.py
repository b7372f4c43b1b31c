"""The learning-rate schedule as a pure function of the step (nanoGPT's ``get_lr``).

Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then a cosine from ``lr`` down to
``min_lr_ratio * lr`` at ``total`` steps. Nothing depends on history, so a resumed run gets the
same rate at the same step.
"""

from __future__ import annotations

import math


def default_warmup(total_steps: int, requested: int = -1) -> int:
    """``requested`` when >= 0, else ``min(250, 5 % of total_steps)`` (SAM warms up 250 steps)."""
    if requested >= 0:
        return requested
    return min(250, int(0.05 * total_steps))


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total`` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))  # last step: floor
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))

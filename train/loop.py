"""What every `rau-rt train` loop shares: the learning-rate schedule and the history that the
record and the curve show."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


class Schedule(Protocol):
    lr: float
    warmup: int

    @property
    def steps(self) -> int: ...


@dataclass
class History:
    """What the record and the curve show."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean over the last `every` steps
    validation: list[dict[str, float]] = field(default_factory=list)  # with "step"
    wall_s: float = 0.0


def learning_rate(cfg: Schedule, step: int) -> float:
    """Linear warm-up over `cfg.warmup` steps, then a cosine decay to 2 % over the rest."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))

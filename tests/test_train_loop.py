"""The step loop both trainers share (`rau_rt.train.loop.run_steps`), on a one-weight model."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest
import torch

from rau_rt.train.loop import Position, run_steps


@dataclass
class Config:
    steps: int = 10
    lr: float = 0.1
    warmup: int = 1
    grad_clip: float = 1.0
    validate_every: int = 100
    checkpoint_minutes: float = 60.0


def test_sigterm_stops_a_run_with_a_checkpoint_like_ctrl_c():
    """A run in the background ignores SIGINT; SIGTERM (kill, a scheduler) must still keep
    the steps done: checkpoint, then KeyboardInterrupt; the previous handler comes back."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    at = Position(0, 0)
    saved = []

    def loss(example):
        if at.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return (model(torch.ones(1, 1)) ** 2).sum(), {}

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_steps(Config(), at, model, optimizer, example=lambda step, seed: (None, seed + 1),
                  loss=loss, evaluate=dict, checkpoint=lambda: saved.append(at.step),
                  minutes=None, progress=None)
    assert saved == [3] and at.next_seed == 3  # three steps done, the fourth never applied
    assert signal.getsignal(signal.SIGTERM) is before

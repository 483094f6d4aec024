"""What both trainers share (`rau_rt.train.loop`): the step loop, on a one-weight model, and
the examples drawn ahead on a thread."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import pytest
import torch

from rau_rt.train.loop import Position, prefetched, run_steps


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


def test_examples_drawn_ahead_keep_the_stream_order_and_its_end():
    """A resumed run must draw the same examples: prefetching changes when they are drawn,
    never which or in what order."""
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))


def test_an_error_while_drawing_reaches_the_training_loop():
    def stream():
        yield 1
        raise ValueError("bad seed")

    drawn = prefetched(stream())
    assert next(drawn) == 1
    with pytest.raises(ValueError, match="bad seed"):
        next(drawn)


def test_closing_the_examples_stops_their_thread():
    """The curriculum swaps the stream at each stage: the old thread must not keep drawing."""
    drawn_up_to = []

    def endless():
        n = 0
        while True:
            drawn_up_to.append(n)
            yield n
            n += 1

    drawn = prefetched(endless(), depth=2, name="test-examples")
    assert next(drawn) == 0
    drawn.close()  # a thread still drawing at exit aborted a run stopped by SIGTERM
    assert not any(t.name == "test-examples" for t in threading.enumerate())
    assert len(drawn_up_to) <= 4  # the item taken, the queue's two and the one in hand

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


def test_a_step_of_several_examples_averages_their_gradients():
    """`per_step`: one optimizer step on the mean of its examples' losses, the examples
    drawn in seed order, the logged loss and terms their means."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    twin = torch.nn.Linear(1, 1)
    twin.load_state_dict(model.state_dict())
    cfg = Config(steps=1, lr=0.1, grad_clip=1e9)
    at = Position(0, 5)
    drawn, shown = [], []

    def example(step, seed):
        drawn.append(seed)
        return float(seed), seed + 1

    def loss(x):
        value = (model(torch.tensor([[x]])) - 1.0).pow(2).sum()
        return value, {"x": x}

    run_steps(cfg, at, model, torch.optim.SGD(model.parameters(), lr=1.0), example=example,
              loss=loss, evaluate=dict, checkpoint=lambda: None, minutes=None,
              progress=lambda step, values: shown.append(values), per_step=3)
    assert drawn == [5, 6, 7] and at.step == 1 and at.next_seed == 8
    mean = sum((twin(torch.tensor([[x]])) - 1.0).pow(2).sum() for x in (5.0, 6.0, 7.0)) / 3
    optimizer = torch.optim.SGD(twin.parameters(), lr=1.0)
    for group in optimizer.param_groups:
        group["lr"] = 0.1  # the schedule's first step (warm-up 1)
    mean.backward()
    optimizer.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert shown[0]["x"] == pytest.approx(6.0)
    assert shown[0]["loss"] == pytest.approx(mean.item())

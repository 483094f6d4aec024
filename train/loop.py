"""What every `rau-rt train` run shares: the run folder's state file, the step loop, the
learning-rate schedule, the examples drawn ahead and the history that the record and the
curve show."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


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


@dataclass
class Position:
    """Where a run stands (saved in train_state.pt, so a resumed run goes on from here)."""

    step: int
    next_seed: int
    history: History = field(default_factory=History)
    window: list[float] = field(default_factory=list)  # losses since the last logged mean


def state_file(out: Path, resume: bool) -> Path:
    """`out`'s train_state.pt, checked against `resume` (a run folder is never overwritten,
    and only an existing run resumes); `out` is made."""
    from rau_rt.errors import InputError

    path = out / "train_state.pt"
    if path.exists() and not resume:
        raise InputError(f"{out} holds a training run (train_state.pt): pass --resume to "
                         "continue it, or choose another --out")
    if resume and not path.exists():
        raise InputError(f"--resume: {path} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    return path


def prefetched(stream: Iterator, depth: int = 2, name: str = "train-examples") -> Iterator:
    """`stream`'s items, drawn `depth` ahead by a daemon thread: rendering a synthetic example
    (numpy and OpenCV, which release the GIL) overlaps the step's forward and backward passes,
    where it took a quarter (8-frame SAM2 clips) to half (single frames) of a step on 2 cores.
    The items and their order are the stream's, so a resumed run draws the same examples; an
    error in the stream is raised here. Closing the returned generator (or dropping it) stops
    the thread and waits for the item it is drawing."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in stream:
                if not hand_over((item, None)):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            hand_over((None, error))
        else:
            hand_over((end, None))

    def drain() -> Iterator:
        try:
            while True:
                item, error = ready.get()
                if error is not None:
                    raise error
                if item is end:
                    return
                yield item
        finally:  # a thread left drawing when the interpreter exits can abort it in C++
            stop.set()
            thread.join(timeout=60)

    thread = threading.Thread(target=fill, daemon=True, name=name)
    thread.start()
    return drain()


def run_steps(cfg, at: Position, model, optimizer, *,
              example: Callable[[int, int], tuple[object, int]],
              loss: Callable[[object], tuple[object, dict[str, float]]],
              evaluate: Callable[[], dict[str, float]], checkpoint: Callable[[], None],
              minutes: float | None,
              progress: Callable[[int, dict[str, float]], None] | None,
              per_step: int = 1) -> None:
    """The steps of a run from `at` to `cfg.steps` (or until `minutes` have passed):
    `per_step` examples a step (their gradients averaged), AdamW at `learning_rate`, gradients
    clipped at `cfg.grad_clip`; the loss logged as a mean every 50 steps, `evaluate` every
    `cfg.validate_every`, `checkpoint` every `cfg.checkpoint_minutes`, at the end and on Ctrl-C
    or SIGTERM (then re-raised as KeyboardInterrupt): a run started in the background, where
    SIGINT is ignored, or stopped by a scheduler keeps its steps too.

    Args:
        example: (step, next seed) -> (an example of the step, the seed after it).
        loss: example -> (loss tensor, its terms as floats).
        per_step: examples per optimizer step (the step's loss and terms are their means).
    """
    import torch

    started = last_save = time.monotonic()
    history = at.history
    on_term = _stop_on_sigterm()
    try:
        while at.step < cfg.steps:
            if minutes is not None and time.monotonic() - started > minutes * 60:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, at.step)
            optimizer.zero_grad(set_to_none=True)
            seed_after, values, summed = at.next_seed, [], {}
            for _ in range(per_step):  # one backward each: memory stays one example's
                drawn, seed_after = example(at.step, seed_after)
                value, terms = loss(drawn)
                (value / per_step).backward()
                values.append(value.item())
                for key, term in terms.items():
                    summed[key] = summed.get(key, 0.0) + term / per_step
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            at.step, at.next_seed = at.step + 1, seed_after
            current, terms = float(np.mean(values)), summed
            at.window.append(current)
            if at.step % 50 == 0 or at.step == cfg.steps:
                history.steps.append(at.step)
                history.losses.append(float(np.mean(at.window)))
                at.window.clear()
            if at.step % cfg.validate_every == 0 or at.step == cfg.steps:
                history.validation.append({"step": at.step, **evaluate()})
            if progress is not None:
                progress(at.step, {"loss": current, **terms,
                                   **(history.validation[-1] if history.validation else {})})
            if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                checkpoint()
                last_save = time.monotonic()
    except KeyboardInterrupt:  # Ctrl-C keeps the steps done so far (continue with --resume)
        checkpoint()
        raise
    finally:
        on_term()
    checkpoint()


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)

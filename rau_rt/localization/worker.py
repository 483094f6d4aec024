"""`LocalizerWorker`: keyframe queries on a thread, so the tracker never waits for the VLM.

The caller submits keyframes and polls for results every frame. One request waits at most: a
newer keyframe replaces a waiting one (latest keyframe wins; the dropped count says how many).
A query that outlives `timeout_s` is reported as timed out on the next poll and cancelled
(`Localizer.cancel`: the decode loop stops at its next step; an engine call already running
finishes first); its late answer is discarded, and the next request starts when it returns.
A query that raises (anything, `SystemExit` included) is reported with the error; the worker
keeps serving, and a thread that died anyway is started again on the next `submit` (`restarts`
counts it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rau_rt.errors import InputError
from rau_rt.types import Frame


class Locates(Protocol):
    """What the worker drives (`Localizer` is one)."""

    def locate_result(self, frame: Frame | np.ndarray, regions: Sequence[str] | None = None,
                      ) -> object: ...


@dataclass(frozen=True)
class WorkerResult:
    """The outcome of one keyframe query.

    Attributes:
        frame_index: the frame the query was computed on (its boxes describe that frame).
        result: the `LocateResult`, None on error or timeout.
        error: "ExceptionType: message" when the query raised.
        timed_out: the query ran past the worker's timeout.
        elapsed_ms: from the query's start to its end (or to the timeout).
    """

    frame_index: int
    result: object | None
    error: str | None
    timed_out: bool
    elapsed_ms: float

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class _Job:
    frame_index: int
    frame: Frame | np.ndarray
    regions: tuple[str, ...] | None
    started: float = 0.0
    abandoned: bool = False


class LocalizerWorker:
    """Runs `localizer.locate_result` on one background thread.

    Args:
        localizer: the localizer (used only from the worker thread).
        timeout_s: a query running longer is reported as timed out.
    """

    def __init__(self, localizer: Locates, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise InputError(f"timeout_s must be > 0, got {timeout_s}")
        self.localizer = localizer
        self.timeout_s = timeout_s
        self.dropped = 0  # keyframes replaced by a newer one before they started
        self.restarts = 0  # worker threads started again after dying
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._running: _Job | None = None
        self._results: deque[WorkerResult] = deque()
        self._closed = False
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve, name="rau-rt-localizer", daemon=True)
        thread.start()
        return thread

    @property
    def stuck(self) -> bool:
        """Whether the running query outlived its timeout (nothing starts until it returns)."""
        with self._cond:
            return self._running is not None and self._running.abandoned

    @property
    def busy(self) -> bool:
        """Whether a query is running or waiting."""
        with self._cond:
            return self._running is not None or self._pending is not None

    def submit(self, frame_index: int, frame: Frame | np.ndarray,
               regions: Sequence[str] | None = None) -> None:
        """Queue a keyframe, replacing (dropping) one still waiting."""
        with self._cond:
            if self._closed:
                raise InputError("LocalizerWorker.submit after close()")
            if self._pending is not None:
                self.dropped += 1
            self._pending = _Job(frame_index, frame, None if regions is None else tuple(regions))
            if not self._thread.is_alive():  # a bug in the worker itself; serve on regardless
                self._running = None
                self.restarts += 1
                self._thread = self._start()
            self._cond.notify_all()

    def poll(self) -> WorkerResult | None:
        """The oldest result not yet returned, or None; reports an overdue query first."""
        with self._cond:
            self._check_timeout()
            return self._results.popleft() if self._results else None

    def wait(self, timeout_s: float) -> WorkerResult | None:
        """Block until a result (or a timeout report) is there, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._check_timeout()
                if self._results:
                    return self._results.popleft()
                now = time.monotonic()
                if now >= deadline:
                    return None
                until = deadline
                job = self._running
                if job is not None and not job.abandoned:
                    until = min(until, job.started + self.timeout_s)
                self._cond.wait(max(until - now, 0.0) + 1e-3)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop taking requests, drop a waiting one, and join the thread (idempotent).

        Returns whether the thread ended within `timeout_s` (False: a query is still running,
        so the localizer's engines must stay open until it returns).
        """
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def __enter__(self) -> LocalizerWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_timeout(self) -> None:
        # caller holds the lock
        job = self._running
        if job is None or job.abandoned:
            return
        elapsed = time.monotonic() - job.started
        if elapsed >= self.timeout_s:
            job.abandoned = True
            self._results.append(WorkerResult(job.frame_index, None, None, True,
                                              elapsed * 1e3))
            cancel = getattr(self.localizer, "cancel", None)
            if cancel is not None:  # a Localizer ends the query at its next decoder step
                cancel()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._pending = self._pending, None
                job.started = time.monotonic()
                self._running = job
                self._cond.notify_all()
            result, error = None, None
            try:
                result = self.localizer.locate_result(job.frame, job.regions)
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                elapsed = (time.monotonic() - job.started) * 1e3
                if not job.abandoned:
                    self._results.append(WorkerResult(job.frame_index, result, error, False,
                                                      elapsed))
                self._running = None
                self._cond.notify_all()

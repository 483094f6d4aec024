"""`LocalizerWorker` with stand-in localizers: results tagged with their frame, latest keyframe
wins, timeouts and exceptions reported on the result while the worker keeps serving."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.localization import LocalizerWorker

FRAME = np.zeros((8, 8, 3), np.uint8)


class Scripted:
    """Answers frame k with {"k": k}; the frames in `slow` wait for `release` (a query as slow
    as the test needs, without racing a sleep), those in `fail` raise; a gate can hold the
    first call until the test releases it."""

    def __init__(self, slow=(), fail=(), gate: threading.Event | None = None):
        self.slow, self.fail, self.gate = set(slow), set(fail), gate
        self.release = threading.Event()
        self.seen: list[int] = []

    def locate_result(self, frame, regions=None):
        k = int(frame[0, 0, 0])
        self.seen.append(k)
        if self.gate is not None:
            self.gate.wait(5)
        if k in self.slow:
            assert self.release.wait(30), "the test never released the slow query"
        if k in self.fail:
            raise RuntimeError(f"engine failed on {k}")
        return {"k": k, "regions": regions}


def frame(k: int) -> np.ndarray:
    out = FRAME.copy()
    out[0, 0, 0] = k
    return out


def test_results_carry_their_frame_index_and_regions():
    with LocalizerWorker(Scripted(), timeout_s=5) as worker:
        worker.submit(3, frame(3), ["lad"])
        result = worker.wait(5)
    assert result.frame_index == 3 and result.ok and not result.timed_out
    assert result.result == {"k": 3, "regions": ("lad",)} and result.elapsed_ms >= 0


def test_latest_keyframe_wins():
    gate = threading.Event()
    localizer = Scripted(gate=gate)
    with LocalizerWorker(localizer, timeout_s=5) as worker:
        worker.submit(1, frame(1))
        while not localizer.seen:  # frame 1 is running (held by the gate)
            time.sleep(0.005)
        for k in (2, 3, 4):
            worker.submit(k, frame(k))
        gate.set()
        first, second = worker.wait(5), worker.wait(5)
        assert worker.wait(0.2) is None
    assert (first.frame_index, second.frame_index) == (1, 4)
    assert localizer.seen == [1, 4] and worker.dropped == 2


def test_timeout_is_reported_and_the_late_answer_dropped():
    localizer = Scripted(slow={1})
    with LocalizerWorker(localizer, timeout_s=0.15) as worker:
        worker.submit(1, frame(1))
        # frame 1 cannot answer before the test releases it: what comes is the timeout report,
        # at the deadline, not at the query's end
        result = worker.wait(30)
        assert result.frame_index == 1 and result.timed_out and result.result is None
        worker.submit(2, frame(2))  # starts once the overdue query returns
        localizer.release.set()
        after = worker.wait(30)
        assert after.frame_index == 2 and after.ok
        assert worker.wait(0.2) is None  # frame 1's late answer never shows


def test_exception_is_reported_and_the_worker_keeps_serving():
    with LocalizerWorker(Scripted(fail={5}), timeout_s=5) as worker:
        worker.submit(5, frame(5))
        failed = worker.wait(5)
        worker.submit(6, frame(6))
        ok = worker.wait(5)
    assert failed.frame_index == 5 and not failed.ok and not failed.timed_out
    assert failed.error == "RuntimeError: engine failed on 5"
    assert ok.frame_index == 6 and ok.ok


def test_poll_does_not_block_and_close_is_idempotent():
    localizer = Scripted(slow={1})
    worker = LocalizerWorker(localizer, timeout_s=5)
    assert worker.poll() is None and not worker.busy
    worker.submit(1, frame(1))
    assert worker.poll() is None and worker.busy  # frame 1 is held: nothing to return yet
    localizer.release.set()
    worker.close()
    worker.close()
    with pytest.raises(InputError, match="after close"):
        worker.submit(2, frame(2))
    with pytest.raises(InputError, match="timeout_s"):
        LocalizerWorker(Scripted(), timeout_s=0)

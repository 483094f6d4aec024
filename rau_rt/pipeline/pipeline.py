"""`Pipeline`: one stream's per-frame loop, tracker on every frame and the VLM on keyframes.

Per frame: take the newest finished localizer answer (if any) and prompt the tracker with its
boxes on this frame (the newest: the tracker cannot go back), track, then let the keyframe
policy decide whether this frame goes to the localizer worker. The tracker never waits for the
VLM, so a keyframe's boxes land some frames later; each result says how many
(`vlm_staleness`). `PipelineConfig.wait_for_localizer` makes a keyframe's answer land on the
very next frame (offline runs, tests and reproducible benchmarks: the results then do not
depend on how fast the VLM was).

A pipeline owns its tracker, policy and worker; pipelines on separate threads share nothing
mutable (a loaded bundle's engines are stateless and may be shared).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rau_rt.errors import InputError
from rau_rt.localization.worker import LocalizerWorker, WorkerResult
from rau_rt.pipeline.keyframes import KeyframeConfig, KeyframePolicy
from rau_rt.reference import ReferenceBank
from rau_rt.tracking.tracker import Tracker, TrackStep
from rau_rt.types import Frame, FrameResult, RegionResult


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings (`rau-rt run --keyframe-every K ...`).

    Attributes:
        keyframes: when frames go to the VLM.
        wait_for_localizer: block on a keyframe's answer so that it prompts the next frame
            (offline); False (live): the tracker goes on and the boxes land when they come.
        localizer_timeout_s: how long `wait_for_localizer` waits for one answer.
        realtime: `run` reads the source on its own thread at the frames' timestamps and
            processes only the newest frame (latest wins; the others are counted as dropped),
            as on a live feed; False processes every frame (offline).
    """

    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    wait_for_localizer: bool = False
    localizer_timeout_s: float = 30.0
    realtime: bool = False

    def __post_init__(self) -> None:
        if self.localizer_timeout_s <= 0:
            raise InputError(f"localizer_timeout_s: expected > 0, got {self.localizer_timeout_s}")


class EventLog(list):
    """A list of events that keeps the most recent `limit` (a day of keyframes at 1 Hz is
    86,400): memory stays flat on a stream that never ends; `total` counts every event."""

    def __init__(self, limit: int = 100_000) -> None:
        super().__init__()
        self.limit, self.total = limit, 0

    def append(self, event: object) -> None:
        super().append(event)
        self.total += 1
        if len(self) > self.limit + self.limit // 10:  # trim in chunks, not on every append
            del self[:len(self) - self.limit]


@dataclass
class PipelineStats:
    """What happened on the way (not per frame); each log keeps its latest `EventLog.limit`
    events and counts all."""

    keyframes: EventLog = field(default_factory=EventLog)  # (frame index, reason)
    prompts: EventLog = field(default_factory=EventLog)  # (prompted at, computed on)
    localizer_errors: EventLog = field(default_factory=EventLog)  # (frame, error)
    # every answer that arrived: (frame computed on, query ms, {region: box or None})
    answers: EventLog = field(default_factory=EventLog)
    frames_dropped: int = 0  # realtime: frames a newer one replaced before they were processed
    views: EventLog = field(default_factory=EventLog)  # (frame, reference) per switch
    localizer_wait_ms: float = 0.0  # wait_for_localizer: time spent waiting for answers
    # what became of every keyframe sent to the localizer: answered, failed (raised or a box
    # the tracker refused), timed_out, dropped (a newer keyframe replaced it before it
    # started); the rest were still running or waiting when the stream ended
    fates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("sent", "answered", "failed", "timed_out", "dropped"), 0))

    def to_dict(self) -> dict[str, object]:
        logs = {"keyframes": self.keyframes, "prompts": self.prompts,
                "localizer_errors": self.localizer_errors, "answers": self.answers,
                "views": self.views}
        trimmed = {name: log.total for name, log in logs.items() if log.total > len(log)}
        return {**({"events_total": trimmed} if trimmed else {}),
                "keyframes": [{"frame": f, "reason": r} for f, r in self.keyframes],
                "prompts": [{"frame": at, "computed_on": on} for at, on in self.prompts],
                "localizer_errors": [{"frame": f, "error": e} for f, e in self.localizer_errors],
                "answers": [{"frame": f, "query_ms": ms,
                             "boxes": sum(b is not None for b in found.values()),
                             "located": {n: None if b is None else [int(v) for v in b]
                                         for n, b in found.items()}}
                            for f, ms, found in self.answers],
                "frames_dropped": self.frames_dropped,
                "views": [{"frame": f, "reference": r} for f, r in self.views],
                "localizer_wait_ms": self.localizer_wait_ms,
                "keyframe_fates": {**self.fates, "unfinished": self.fates["sent"] - sum(
                    v for k, v in self.fates.items() if k != "sent")}}


class Pipeline:
    """Tracker + localizer worker + keyframe policy for one stream.

    Args:
        tracker: the stream's Tracker (regions come from the localizer's boxes).
        worker: a LocalizerWorker over the stream's Localizer; None tracks only what the
            caller prompts or references on the tracker itself. With `bank`: one worker per
            bank reference, in the bank's order (each localizer holds its reference's cache).
        regions: the reference regions to follow.
        config: PipelineConfig.
        bank: several references (views) of the anatomy: every frame's pooled encoder
            features (`TrackStep.descriptor`) choose one (`ReferenceBank.select`); a switch is
            a "view_change" keyframe, and keyframes go to the chosen reference's worker.
    """

    def __init__(self, tracker: Tracker,
                 worker: LocalizerWorker | Sequence[LocalizerWorker] | None,
                 regions: Sequence[str], config: PipelineConfig | None = None, *,
                 bank: ReferenceBank | None = None) -> None:
        if not regions:
            raise InputError("regions: at least one region to follow")
        workers = (() if worker is None else tuple(worker) if isinstance(worker, Sequence)
                   else (worker,))
        if bank is not None and len(workers) != len(bank.references):
            raise InputError(f"bank: expected one worker per reference "
                             f"({len(bank.references)}), got {len(workers)}")
        if bank is None and len(workers) > 1:
            raise InputError("several localizer workers need a ReferenceBank to choose among "
                             "them")
        self.tracker = tracker
        self.workers = workers
        self.bank = bank
        self._view = 0  # the bank's chosen reference
        self.regions = tuple(regions)
        self.config = config or PipelineConfig()
        self.policy = KeyframePolicy(self.config.keyframes)
        self.stats = PipelineStats()
        self._vlm_frame: int | None = None
        self._ready: WorkerResult | None = None
        self._keyframe_descriptor: np.ndarray | None = None
        self._last_index: int | None = None  # of the last frame processed
        # the bundles `open_pipeline` opened ("sam2", "vlm"), closed by `close`
        self.bundles: dict[str, object] = {}

    @property
    def worker(self) -> LocalizerWorker | None:
        """The localizer worker keyframes go to now (the chosen view's), None without a VLM."""
        return self.workers[self._view] if self.workers else None

    def close(self) -> None:
        """Stop the localizer workers and close the bundles this pipeline opened."""
        finished = [w.close(self.config.localizer_timeout_s) for w in self.workers]
        for worker, done in zip(self.workers, finished, strict=True):
            close = getattr(worker.localizer, "close", None)  # a RemoteLocalizer's connection
            if done and close is not None:
                close()
        if not all(finished):
            return  # a query still runs on the VLM's engines: leave them open
        while self.bundles:
            self.bundles.popitem()[1].close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def process(self, frame: Frame) -> FrameResult:
        """Track one frame (and maybe send it to the localizer); never waits for the VLM
        unless `wait_for_localizer`."""
        arrived = time.perf_counter()
        if not isinstance(frame, Frame):
            raise InputError(f"process: expected a rau_rt.Frame (index, timestamp, image, "
                             f"channel order, bits), got {type(frame).__name__}; wrap an array "
                             "as Frame(index, timestamp_s, image, 'bgr' | 'rgb' | 'gray', bits)")
        if self._last_index is not None and frame.index <= self._last_index:
            raise InputError(f"frame {frame.index}: frames must come in increasing index order "
                             f"(the last one was {self._last_index}); nothing was changed")
        finished = [self._ready] if self._ready is not None else []
        self._ready = None
        for worker in self.workers:
            while (done := worker.poll()) is not None:
                finished.append(done)
        prompt_ms = 0.0
        if finished:
            started = time.perf_counter()
            for done in sorted(finished, key=lambda d: d.frame_index):  # the newest last
                self._apply(done, frame.index)
            prompt_ms = (time.perf_counter() - started) * 1e3
        step = self.tracker.step(frame)
        self._last_index = frame.index
        confidence = {name: (1 / (1 + math.exp(-step.object_scores[name]))
                             if step.regions[name].present else None)
                      for name in step.regions}
        # a followed region the tracker does not have yet counts as lost
        confidence.update({n: None for n in self.regions if n not in confidence})
        reason = None
        if self.workers:
            view_changed = (self._select_view(frame, step) if self.bank is not None
                            else self._view_changed(step))
            reason = self.policy.decide(frame.index, confidence, view_changed)
        if reason is not None:
            self.stats.keyframes.append((frame.index, reason))
            self._keyframe_descriptor = step.descriptor  # None: taken from the next frame
            names = self.regions
            if self.bank is not None:  # the regions the chosen reference marks
                marked = self.bank.references[self._view].region_names
                names = tuple(n for n in self.regions if n in marked)
            self.worker.submit(frame.index, frame, names)
            self.stats.fates["sent"] += 1
            self.stats.fates["dropped"] = sum(w.dropped for w in self.workers)
        absent = RegionResult(False, None, None, 0.0, "track")
        result = FrameResult(
            index=frame.index, timestamp_s=frame.timestamp_s, frame_size=step.frame_size,
            regions={n: step.regions.get(n, absent) for n in self.regions},
            stage_ms={**step.stage_ms, "prompt": prompt_ms},
            latency_ms=(time.perf_counter() - arrived) * 1e3,
            vlm_staleness=None if self._vlm_frame is None else frame.index - self._vlm_frame)
        if reason is not None and self.config.wait_for_localizer and not self.worker.stuck:
            # after the result is complete: the wait is for the next frame's prompt, not part
            # of this frame's latency (it is counted in stats.localizer_wait_ms). Behind a query
            # that already timed out, nothing can arrive before it returns: no wait then.
            started = time.perf_counter()
            self._ready = self.worker.wait(self.config.localizer_timeout_s)
            self.stats.localizer_wait_ms += (time.perf_counter() - started) * 1e3
        return result

    def _select_view(self, frame: Frame, step: TrackStep) -> bool:
        """The bank's choice for this frame; True when it switched from an earlier one."""
        descriptor = step.descriptor
        if descriptor is None:  # nothing tracked yet (no encoder pass): encode for the choice
            descriptor = self.tracker.describe(frame)
        first = self.bank.current is None
        selection = self.bank.select(descriptor)
        self._view = selection.index
        if selection.switched:
            self.stats.views.append((frame.index, self.bank.references[selection.index].name))
        return selection.switched and not first

    def _view_changed(self, step: TrackStep) -> bool:
        threshold = self.config.keyframes.view_similarity
        last = self._keyframe_descriptor
        if threshold is None or step.descriptor is None:
            return False
        if last is None:  # the keyframe had nothing tracked (no encoder pass): this view
            self._keyframe_descriptor = step.descriptor
            return False
        current = step.descriptor
        denominator = float(np.linalg.norm(current) * np.linalg.norm(last))
        return denominator > 0 and float(current @ last) / denominator < threshold

    def _apply(self, done: WorkerResult, index: int) -> None:
        if not done.ok:
            why = "timed out" if done.timed_out else done.error
            self.stats.localizer_errors.append((done.frame_index, str(why)))
            self.stats.fates["timed_out" if done.timed_out else "failed"] += 1
            return
        found = {n: b for n, b in done.result.boxes.items() if n in self.regions}
        boxes = {n: b for n, b in found.items() if b is not None}
        self.stats.answers.append((done.frame_index, done.elapsed_ms, found))
        if boxes:
            try:
                self.tracker.prompt(self.tracker.frame_index, boxes, source="vlm")
            except InputError as exc:  # a box the tracker refuses: reported, tracking goes on
                self.stats.localizer_errors.append((done.frame_index, f"prompt: {exc}"))
                self.stats.fates["failed"] += 1
                return
            self.stats.prompts.append((index, done.frame_index))
        self.stats.fates["answered"] += 1
        self._vlm_frame = done.frame_index

    def stream(self, frames: Iterable[Frame], sinks: Sequence[object] = ()
               ) -> Iterator[FrameResult]:
        """Process a source lazily: each frame's result, as it is made, after the sinks'
        `write`; nothing is kept (a long or live stream).

        Offline: every frame. Realtime (`config.realtime`): a reader thread releases frames at
        their timestamps into a one-frame slot; the newest frame wins and the replaced ones
        count in `stats.frames_dropped`.
        """
        for frame in self._realtime(frames) if self.config.realtime else frames:
            result = self.process(frame)
            for sink in sinks:
                sink.write(frame, result)
            yield result

    def run(self, frames: Iterable[Frame], sinks: Sequence[object] = (), *,
            collect: bool = True) -> list[FrameResult]:
        """`stream` to the end; returns every result (`collect=False`: none, nothing kept)."""
        results = []
        for result in self.stream(frames, sinks):
            if collect:
                results.append(result)
        return results

    def _realtime(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        slot: list[Frame] = []
        done = threading.Event()
        lock = threading.Condition()
        failure: list[BaseException] = []

        def read() -> None:
            start, first = time.monotonic(), None
            try:
                for frame in frames:
                    first = frame.timestamp_s if first is None else first
                    delay = start + (frame.timestamp_s - first) - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    with lock:
                        if slot:
                            self.stats.frames_dropped += 1
                            slot.clear()
                        slot.append(frame)
                        lock.notify()
            except BaseException as exc:  # surfaced on the processing thread
                failure.append(exc)
            finally:
                with lock:
                    done.set()
                    lock.notify()

        reader = threading.Thread(target=read, name="rau-rt-source", daemon=True)
        reader.start()
        while True:
            with lock:
                while not slot and not done.is_set():
                    lock.wait()
                if slot:
                    frame = slot.pop()
                elif failure:
                    raise failure[0]
                else:
                    break
            yield frame
        reader.join()

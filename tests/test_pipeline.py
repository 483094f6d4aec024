"""Pipeline: keyframes to the localizer worker, its boxes prompting the tracker, staleness.

The tracker is real (the micro SAM2 bundle); the VLM is a stand-in that answers with the
synthetic sequence's true boxes of the frame it was asked about (the real Localizer is tested
in tests/test_localization_*.py), so what is checked here is the plumbing: which frame's boxes
prompt which frame, what the results say, and that streams on threads do not interfere.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.localization import LocalizerWorker
from rau_rt.pipeline import KeyframeConfig, Pipeline, PipelineConfig
from rau_rt.synthetic import generate_sequence
from rau_rt.tracking import Tracker
from rau_rt.types import Frame

SIZE = 256
REGIONS = ("6", "7")


@pytest.fixture(scope="module")
def bundle(micro_bundle):
    return micro_bundle


@pytest.fixture(scope="module")
def sequence():
    # the classic look: the view tests' similarity margins were measured on it
    return generate_sequence(seed=4, frames=24, size=SIZE, contrast_delay_frames=1,
                             segments=("5", "6", "7"), look="classic")


class TruthLocalizer:
    """Answers at once with the true boxes of the asked frame."""

    def __init__(self, sequence, fail_on=()):
        self.sequence, self.fail_on = sequence, set(fail_on)
        self.asked: list[int] = []

    def locate_result(self, frame, regions=None):
        self.asked.append(frame.index)
        if frame.index in self.fail_on:
            raise RuntimeError("vlm failed")
        truth = self.sequence.truth[frame.index].segments
        return SimpleNamespace(boxes={n: truth[n].box for n in regions})


def frames(sequence, start=0):
    return [Frame(i, i / 15, sequence.frames[i], "gray", 12)
            for i in range(start, len(sequence.frames))]


def run(bundle, sequence, config, localizer):
    with LocalizerWorker(localizer, timeout_s=10) as worker:
        pipeline = Pipeline(Tracker(bundle), worker, REGIONS, config)
        return pipeline, pipeline.run(frames(sequence))


def test_keyframe_boxes_prompt_the_next_frame_offline(bundle, sequence):
    config = PipelineConfig(KeyframeConfig(every=8, min_gap=100), wait_for_localizer=True)
    localizer = TruthLocalizer(sequence)
    pipeline, results = run(bundle, sequence, config, localizer)
    first_visible = min(i for i, t in enumerate(sequence.truth)
                        if all(t.segments[n].box for n in REGIONS))
    # frame 0 (no contrast yet: no boxes, nothing to track) and the schedule: 8, 16
    assert pipeline.stats.keyframes == [(0, "first"), (8, "scheduled"), (16, "scheduled")]
    assert localizer.asked == [0, 8, 16]
    prompted = {at: on for at, on in pipeline.stats.prompts}
    for at, on in prompted.items():
        assert at == on + 1  # offline: a keyframe's answer prompts the very next frame
        assert results[at].vlm_staleness == 1
        assert {r.source for n, r in results[at].regions.items()
                if sequence.truth[on].segments[n].box} == {"vlm"}
    assert any(on >= first_visible for on in prompted.values())
    for result in results:
        assert set(result.regions) == set(REGIONS) and result.latency_ms > 0
        assert "prompt" in result.stage_ms and "memory_attention" in result.stage_ms
    assert all(r.vlm_staleness is None for r in results[:1])
    tracked = [r for r in results if r.vlm_staleness and r.vlm_staleness > 1]
    assert tracked and all(r.regions[n].source == "track" for r in tracked for n in REGIONS
                           if r.regions[n].present)


class HeldLocalizer(TruthLocalizer):
    """Answers only once `release` is set: a VLM slower than any number of frames."""

    def __init__(self, sequence):
        super().__init__(sequence)
        self.release = threading.Event()

    def locate_result(self, frame, regions=None):
        assert self.release.wait(30), "the test never released the localizer"
        return super().locate_result(frame, regions)


def test_live_mode_never_waits_for_a_slow_localizer(bundle, sequence):
    """The tracker keeps its own pace while the VLM is busy; the boxes land frames later.
    Event-driven: the VLM answers when the test says, not after a race against sleeps."""
    config = PipelineConfig(KeyframeConfig(every=0, min_gap=1000))
    localizer = HeldLocalizer(sequence)
    stream = frames(sequence, start=10)  # contrast-filled: the regions are visible
    with LocalizerWorker(localizer, timeout_s=60) as worker:
        pipeline = Pipeline(Tracker(bundle), worker, REGIONS, config)
        # the VLM is held: these frames finishing at all shows that none waited for it
        results = [pipeline.process(frame) for frame in stream[:3]]
        localizer.release.set()
        deadline = time.monotonic() + 30
        while worker.busy and time.monotonic() < deadline:  # the answer is in the worker
            time.sleep(0.005)
        results += [pipeline.process(frame) for frame in stream[3:6]]
    assert pipeline.stats.keyframes == [(10, "first")]
    # the answer about frame 10 arrived after frame 12: it prompts the next frame, 13
    assert pipeline.stats.prompts == [(13, 10)]
    assert [r.vlm_staleness for r in results] == [None, None, None, 3, 4, 5]
    assert {r.source for r in results[3].regions.values()} == {"vlm"}


def test_localizer_errors_are_reported_and_tracking_goes_on(bundle, sequence):
    config = PipelineConfig(KeyframeConfig(every=4, min_gap=1000), wait_for_localizer=True)
    pipeline, results = run(bundle, sequence, config, TruthLocalizer(sequence, fail_on={4}))
    assert pipeline.stats.localizer_errors == [(4, "RuntimeError: vlm failed")]
    assert len(results) == len(sequence.frames)


def test_two_streams_on_threads_match_sequential_runs(bundle, sequence):
    """Deterministic (offline) pipelines: threads must not change a single mask."""
    config = PipelineConfig(KeyframeConfig(every=6, min_gap=100), wait_for_localizer=True)
    other = generate_sequence(seed=9, frames=24, size=SIZE, contrast_delay_frames=1,
                              segments=("5", "6", "7"), look="classic")
    alone = [run(bundle, s, config, TruthLocalizer(s))[1] for s in (sequence, other)]
    together: dict[int, list] = {}

    def stream(k, s):
        together[k] = run(bundle, s, config, TruthLocalizer(s))[1]

    threads = [threading.Thread(target=stream, args=(k, s))
               for k, s in enumerate((sequence, other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in (0, 1):
        for a, b in zip(alone[k], together[k], strict=True):
            for name in REGIONS:
                ra, rb = a.regions[name], b.regions[name]
                assert ra.present == rb.present and ra.source == rb.source
                if ra.present:
                    np.testing.assert_array_equal(ra.mask, rb.mask)


def test_realtime_mode_processes_the_newest_frame_and_counts_drops(bundle, sequence):
    """Frames every 1 ms against a consumer that needs 20 ms per frame.

    The slowness is a sink's sleep, not the tracker's: frame 0's truth has no opacified
    segment, so nothing is tracked and `process` alone can keep up with the source on an idle
    machine (a CI run once saw 0 drops that way).
    """

    class SlowDisplay:
        def write(self, frame, result):
            time.sleep(0.02)

    fast = [Frame(i, i * 0.001, sequence.frames[10 + i % 14], "gray", 12) for i in range(40)]
    config = PipelineConfig(KeyframeConfig(every=0, min_gap=1000), wait_for_localizer=True,
                            realtime=True)
    with LocalizerWorker(TruthLocalizer(sequence), timeout_s=10) as worker:
        pipeline = Pipeline(Tracker(bundle), worker, REGIONS, config)
        results = pipeline.run(fast, [SlowDisplay()])
    processed = [r.index for r in results]
    # (not "frame 0 is processed": on a loaded machine frame 1 can replace it before the
    # processing thread wakes; that is the rule working, not a fault)
    assert processed == sorted(set(processed))
    assert pipeline.stats.frames_dropped > 0
    assert len(processed) + pipeline.stats.frames_dropped == len(fast)
    assert processed[-1] == len(fast) - 1  # the newest frame is never the one dropped


def test_realtime_mode_surfaces_a_failing_source(bundle, sequence):
    def broken():
        yield Frame(0, 0.0, sequence.frames[12], "gray", 12)
        raise OSError("camera unplugged")

    config = PipelineConfig(KeyframeConfig(every=0), realtime=True)
    pipeline = Pipeline(Tracker(bundle), None, REGIONS, config)
    with pytest.raises(OSError, match="camera unplugged"):
        pipeline.run(broken())


def test_a_view_change_triggers_a_keyframe(bundle, sequence):
    """Another patient's run in another view replaces the feed mid-stream: the frame's pooled
    encoder features leave the last keyframe's, and the VLM is asked again."""
    other = generate_sequence(seed=9, frames=24, size=SIZE, contrast_delay_frames=1,
                              segments=("5", "6", "7"), look="classic")
    shown = [sequence.frames[10 + i] for i in range(8)] + [other.frames[10 + i] for i in range(6)]
    feed = [Frame(i, i / 15, image, "gray", 12) for i, image in enumerate(shown)]
    truth = [sequence.truth[10 + i] for i in range(8)] + [other.truth[10 + i] for i in range(6)]
    localizer = TruthLocalizer(SimpleNamespace(truth=truth))
    config = PipelineConfig(KeyframeConfig(every=0, min_score=0.0, min_gap=2,
                                           view_similarity=0.99), wait_for_localizer=True)
    with LocalizerWorker(localizer, timeout_s=10) as worker:
        pipeline = Pipeline(Tracker(bundle), worker, REGIONS, config)
        pipeline.run(feed)
    # the margins the 0.99 threshold sits between (random-init micro weights)
    tracker = Tracker(bundle)
    tracker.prompt(0, {"6": truth[0].segments["6"].box})
    pooled = [tracker.step(frame).descriptor for frame in feed]

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert min(cos(pooled[0], p) for p in pooled[:8]) > 0.995
    assert max(cos(pooled[0], p) for p in pooled[8:]) < 0.985
    keyframes = pipeline.stats.keyframes
    # the policy ranks a view change above a lost region: the first keyframe in the new view
    # is the view change; keyframes within one view never are
    assert next(r for i, r in keyframes if i >= 8) == "view_change"
    assert all(r != "view_change" for i, r in keyframes if i < 8)
    assert [r for i, r in keyframes if i >= 8].count("view_change") == 1


def test_a_reference_bank_switches_the_vlm_to_the_matching_view(bundle, sequence):
    """Two references (two patients/views); the feed shows the first, then the second: the
    bank switches after its patience, the switch is a keyframe, and keyframes go to the
    chosen reference's localizer only."""
    from rau_rt.reference import BankConfig, Reference, ReferenceBank
    from rau_rt.types import Region

    other = generate_sequence(seed=9, frames=24, size=SIZE, contrast_delay_frames=1,
                              segments=("5", "6", "7"), look="classic")
    shown = [sequence.frames[10 + i] for i in range(8)] + [other.frames[10 + i] for i in range(8)]
    feed = [Frame(i, i / 15, image, "gray", 12) for i, image in enumerate(shown)]
    truth = [sequence.truth[10 + i] for i in range(8)] + [other.truth[10 + i] for i in range(8)]
    references = [Reference((s.frames[20] >> 4).astype(np.uint8),  # 12 -> 8 bits, linear
                            tuple(Region(n, s.truth[20].segments[n].box) for n in REGIONS),
                            name=name)
                  for s, name in ((sequence, "view A"), (other, "view B"))]
    tracker = Tracker(bundle)
    bank = ReferenceBank(references, [tracker.describe(Frame(0, 0.0, r.image, "gray", 8))
                                      for r in references], BankConfig(patience=3))
    localizers = [TruthLocalizer(SimpleNamespace(truth=truth)) for _ in references]
    config = PipelineConfig(KeyframeConfig(every=4, min_score=0.0, min_gap=1),
                            wait_for_localizer=True)
    workers = [LocalizerWorker(loc, timeout_s=10) for loc in localizers]
    with Pipeline(tracker, workers, REGIONS, config, bank=bank) as pipeline:
        pipeline.run(feed)
    assert pipeline.stats.views == [(0, "view A"), (10, "view B")]  # 8, 9, 10: patience 3
    assert (10, "view_change") in pipeline.stats.keyframes
    asked = [i for i, _ in pipeline.stats.keyframes]
    assert localizers[0].asked == [i for i in asked if i < 10]
    assert localizers[1].asked == [i for i in asked if i >= 10]
    with pytest.raises(InputError, match="one worker per reference"):
        Pipeline(tracker, workers[:1], REGIONS, config, bank=bank)
    with pytest.raises(InputError, match="ReferenceBank"):
        Pipeline(tracker, workers, REGIONS, config)

"""The bad-input and fault corpus (issue 17): what a new user, a PACS and a GPU host hit first.

Every case is generated here, in code (nothing is stored): malformed frames and odd memory
layouts, damaged DICOM (edited from a synthetic XA cine), image folders, annotation JSON and
COCO (hypothesis fuzzing), bundles and tokenizers, region names that would leave `--out`,
non-finite windows and memories, a VLM query that hangs, dies or outlives its timeout, a stream that
stalls, a full disk, SIGTERM and a second Ctrl-C, stateful engines under threads. Each asserts
its typed error or documented fallback, that nothing is written outside the output folder, and
that no partial output looks complete; each was a traceback, a hang or a wrong answer before
its fix. Cases that belong with one module's tests live there (bundles in test_bundle.py,
the tokenizer in test_localization_localizer.py, TensorRT in test_tensorrt_plumbing.py)."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rau_rt import ops
from rau_rt.errors import InputError, NumericsError
from rau_rt.io.sinks import MaskArchiveSink, OverlayVideoSink, region_file_name
from rau_rt.pipeline import Pipeline
from rau_rt.synthetic import generate_sequence
from rau_rt.tracking import Tracker
from rau_rt.types import Frame, FrameResult, Region, RegionResult

SIZE = 256


@pytest.fixture(scope="module")
def bundle(micro_bundle):
    return micro_bundle


@pytest.fixture(scope="module")
def sequence():
    return generate_sequence(seed=3, frames=8, size=SIZE, contrast_delay_frames=1,
                             segments=("6",), look="classic")


def _opacified(sequence):
    """8-bit frames from the first one where segment 6 shows, and its box there."""
    first = next(k for k, t in enumerate(sequence.truth) if t.segments["6"].box)
    return sequence.frames_8bit()[first:], sequence.truth[first].segments["6"].box


def _result(index: int, shape: tuple[int, int], name: str = "6") -> FrameResult:
    mask = np.zeros(shape, bool)
    mask[20:60, 30:90] = True
    region = RegionResult(True, mask, (30, 20, 90, 60), 0.9, "track")
    return FrameResult(index, index / 15, shape, {name: region}, {}, 1.0)


# outputs and data integrity


def test_frames_are_read_only_views_so_no_sink_can_draw_into_a_shared_frame(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (120, 160, 3), np.uint8)
    frame = Frame(0, 0.0, pixels, "bgr", 8)
    before = pixels.copy()
    assert not frame.image.flags.writeable
    assert pixels.flags.writeable  # the caller's own array stays theirs
    sink = OverlayVideoSink(tmp_path / "overlay.mp4")
    sink.write(frame, _result(0, (120, 160)))
    sink.close()
    np.testing.assert_array_equal(frame.image, before)
    with pytest.raises(ValueError, match="read-only"):
        frame.image[0, 0] = 0


@pytest.mark.parametrize("name", ["../escape", "..", "a/../../b", "/etc/passwd", "C:\\x",
                                  "LAD proximal", "6"])
def test_region_names_never_name_a_file_outside_the_output(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    sink = MaskArchiveSink(out / "masks")
    sink.write(Frame(0, 0.0, np.zeros((120, 160), np.uint8), "gray", 8),
               _result(0, (120, 160), name))
    sink.close()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out / "masks" in p.parents for p in written)
    folder = region_file_name(name)
    assert (out / "masks" / folder / "000000.png").is_file()
    assert "/" not in folder and "\\" not in folder and folder not in ("", ".", "..")


def test_distinct_region_names_get_distinct_file_names():
    names = ["LAD/D1", "LAD_D1", "LAD D1", "lad d1", "../x", "_x"]
    assert len({region_file_name(n) for n in names}) == len(names)
    assert region_file_name("LAD proximal") == "LAD proximal"  # plain names stay readable


@pytest.mark.parametrize("name, why", [("a\x00b", "control"), ("seg\\1", "backslash"),
                                       ("x" * 65, "64"), ("", "empty"), ("   ", "empty"),
                                       (7, "string")])
def test_region_names_a_seg_or_a_prompt_cannot_carry_are_refused(name, why):
    with pytest.raises(InputError, match=why):
        Region(name, box=(0, 0, 4, 4))


# bad input that ended in a traceback, a hang or a wrong answer


@pytest.mark.parametrize("window", [(math.nan, 100.0), (100.0, math.inf), (math.inf, 10.0),
                                    (100.0, math.nan), (100.0, 0.0)])
def test_a_non_finite_window_is_refused_where_it_enters(window):
    image = np.full((32, 32), 1000, np.uint16)
    with pytest.raises(InputError, match="window"):
        Frame(0, 0.0, image, "gray", 12, window)
    with pytest.raises(InputError, match="window"):
        ops.preprocess(image, (16, 16), window=window, bits_stored=12)


@pytest.mark.parametrize("image", [None, [[0, 1], [2, 3]], np.zeros((4, 4), np.float64)])
def test_a_frame_without_an_image_array_is_a_typed_error(image):
    with pytest.raises(InputError, match="frame 0"):
        Frame(0, 0.0, image, "gray", 8)


class Poisoned:
    """The bundle, with `graph` answering `value` (NaN, +inf) in every float output when
    `poison` is set (a fault in an engine or a bad graph): the tracker must refuse it."""

    def __init__(self, bundle, graph, value):
        self._bundle, self.graph, self.value, self.poison = bundle, graph, value, False

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def run(self, graph, feeds):
        out = self._bundle.run(graph, feeds)
        if graph == self.graph and self.poison:
            out = {k: np.full_like(v, self.value) if v.dtype.kind == "f" else v
                   for k, v in out.items()}
        return out


@pytest.mark.parametrize("graph, value", [("memory_encoder", np.nan), ("mask_decoder", np.inf),
                                          ("mask_decoder", np.nan)])
def test_the_tracker_refuses_non_finite_outputs_and_its_state_stays_usable(bundle, sequence,
                                                                           graph, value):
    graphs = Poisoned(bundle, graph, value)
    tracker = Tracker(graphs)
    frames, box = _opacified(sequence)
    tracker.prompt(0, {"6": box})
    tracker.step(frames[0])
    memory_bytes = tracker.memory_nbytes
    graphs.poison = True
    with pytest.raises(NumericsError, match=graph):
        tracker.step(frames[1])
    assert tracker.frame_index == 1 and tracker.memory_nbytes == memory_bytes
    graphs.poison = False
    later = tracker.step(frames[1])  # the same frame goes through now
    assert later.index == 1 and "6" in later.regions
    clean = Tracker(bundle)
    clean.prompt(0, {"6": box})
    clean.step(frames[0])
    again = clean.step(frames[1])
    assert again.regions["6"].present == later.regions["6"].present
    if later.regions["6"].present:  # random weights: the region may or may not show
        np.testing.assert_array_equal(again.regions["6"].mask, later.regions["6"].mask)
    assert again.object_scores == later.object_scores


def test_a_repeated_or_past_frame_is_refused_before_the_tracker_steps(bundle, sequence):
    tracker = Tracker(bundle)
    frames, box = _opacified(sequence)
    tracker.prompt(0, {"6": box})
    pipeline = Pipeline(tracker, None, ("6",))
    gray = frames
    pipeline.process(Frame(5, 0.3, gray[0], "gray", 8))
    assert tracker.frame_index == 1
    for index in (5, 4):
        with pytest.raises(InputError, match=f"frame {index}"):
            pipeline.process(Frame(index, 0.4, gray[1], "gray", 8))
        assert tracker.frame_index == 1
    assert pipeline.process(Frame(6, 0.4, gray[1], "gray", 8)).index == 6


def test_a_bare_array_given_to_the_pipeline_is_a_typed_error(bundle, sequence):
    tracker = Tracker(bundle)
    pipeline = Pipeline(tracker, None, ("6",))
    with pytest.raises(InputError, match="Frame"):
        pipeline.process(sequence.frames[0])
    assert tracker.frame_index == 0


def test_one_run_at_a_time_holds_an_output_folder(tmp_path):
    from rau_rt.io.outdir import claim_output

    with claim_output(tmp_path / "out") as out:
        assert out.is_dir()
        with pytest.raises(InputError, match="another rau-rt run"):
            with claim_output(tmp_path / "out"):
                pass
    with claim_output(tmp_path / "out"):  # released when the first run ends
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        with claim_output(tmp_path / "file"):
            pass


def test_a_second_process_cannot_take_a_held_output_folder(tmp_path):
    import subprocess
    import sys

    from rau_rt.io.outdir import claim_output

    code = ("import sys\nfrom rau_rt.io.outdir import claim_output\n"
            "try:\n    with claim_output(sys.argv[1]): pass\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
    with claim_output(tmp_path / "out"):
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")],
                               capture_output=True, text=True, timeout=60)
    assert other.returncode == 3 and "InputError" in other.stdout
    assert "another rau-rt run" in other.stdout


# DICOM and folders: refused when opened, with the actual cause, not mid-stream


@pytest.fixture(scope="module")
def cine_dicom(tmp_path_factory):
    from rau_rt.synthetic import formats

    path = tmp_path_factory.mktemp("dicom") / "cine.dcm"
    formats.write_dicom(path, generate_sequence(seed=4, frames=4, size=64, fps=15.0))
    return path


def _edited(cine_dicom, tmp_path, edit):
    import pydicom

    ds = pydicom.dcmread(cine_dicom)
    with warnings.catch_warnings():  # pydicom warns about the invalid values we write
        warnings.simplefilter("ignore")
        edit(ds)
        path = tmp_path / "edited.dcm"
        ds.save_as(path)
    return path


def _set(**values):
    def edit(ds):
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return edit


def _truncate(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _drop_pixels(ds):
    del ds.PixelData


@pytest.mark.parametrize("edit, message", [
    (_set(NumberOfFrames=0), "NumberOfFrames is 0"),
    (_drop_pixels, "no PixelData"),
    (_set(SamplesPerPixel=3), "SamplesPerPixel 3 contradicts"),
    (_set(PhotometricInterpretation="PALETTE COLOR"), "without its colour lookup"),
    (_truncate, "truncated: the pixel data holds"),
    (_set(WindowCenter="NaN"), "finite window"),
    (_set(WindowWidth="inf"), "finite window"),
    (_set(Rows=20000, Columns=20000), "20000x20000 frames"),
    (_set(FrameTime="1e9"), "not a cine's"),  # a --realtime replay waited 11 days per frame
    (_set(FrameTime="-66.7"), "not a cine's"),
])
def test_a_damaged_dicom_is_refused_at_open_with_its_cause(cine_dicom, tmp_path, edit, message):
    from rau_rt.io.sources import open_source

    path = _edited(cine_dicom, tmp_path, edit)
    with pytest.raises(InputError, match=message):
        open_source(path)


def test_an_image_folder_with_mixed_frame_sizes_names_the_odd_file(tmp_path):
    import cv2

    from rau_rt.io.sources import open_source

    for i, shape in enumerate([(48, 64), (48, 64), (64, 64), (48, 64)]):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.zeros(shape, np.uint8))
    with open_source(tmp_path) as source:
        frames = iter(source)
        next(frames), next(frames)
        with pytest.raises(InputError, match=r"f2\.png.*first frame \(f0\.png\)"):
            next(frames)


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    from PIL import Image

    from rau_rt.io.sources import open_source

    Image.new("L", (9000, 10)).save(tmp_path / "wide.png")  # small file, too wide a frame
    with open_source(tmp_path) as source, pytest.raises(InputError, match="9000x10 frames"):
        next(iter(source))
    with pytest.raises(InputError, match="9000x8 frames"):
        Frame(0, 0.0, np.zeros((8, 9000), np.uint8), "gray", 8)


def test_a_synthetic_source_renders_frames_as_they_are_read(monkeypatch):
    from rau_rt.io.sources import open_source
    from rau_rt.synthetic import sequence as module

    rendered = []
    real = module._render

    def counting(scene, cfg, segments, index, *args):
        rendered.append(index)
        return real(scene, cfg, segments, index, *args)

    monkeypatch.setattr(module, "_render", counting)
    with open_source("synthetic:frames=3000&size=64&look=classic") as source:
        assert source.frame_count == 3000
        frames = iter(source)
        first, second = next(frames), next(frames)
    assert rendered == [0, 1]  # not 3000 frames up front (67 s and 2.8 GB at 512 px)
    expected = generate_sequence(frames=2, size=64, look="classic").frames
    np.testing.assert_array_equal(np.stack([first.image, second.image]), expected)


def test_pipeline_event_logs_stay_bounded_and_count_everything():
    from rau_rt.pipeline.pipeline import EventLog, PipelineStats

    log = EventLog(limit=100)
    for i in range(1000):
        log.append((i, "scheduled"))
    assert len(log) <= 110 and log.total == 1000 and log[-1] == (999, "scheduled")
    stats = PipelineStats(keyframes=log)
    assert stats.to_dict()["events_total"] == {"keyframes": 1000}
    assert "events_total" not in PipelineStats().to_dict()


# the VLM worker: every keyframe's fate is counted, a hung or dying query never disables it


class Gate:
    """A localizer whose first query hangs until `release`, later ones answer at once (no
    boxes) or raise `error` when set."""

    def __init__(self, hang_first=True, error=None):
        import threading

        self.release, self.hang_first, self.error = threading.Event(), hang_first, error
        self.asked = []

    def locate_result(self, frame, regions=None):
        from types import SimpleNamespace

        self.asked.append(frame.index if hasattr(frame, "index") else None)
        if self.hang_first and len(self.asked) == 1:
            self.release.wait(60)
        if self.error is not None:
            raise self.error
        return SimpleNamespace(boxes={})


def test_a_query_raising_system_exit_is_reported_and_the_worker_serves_on():
    from rau_rt.localization import LocalizerWorker

    gate = Gate(hang_first=False, error=SystemExit(3))
    with LocalizerWorker(gate, timeout_s=30) as worker:
        worker.submit(0, np.zeros((4, 4), np.uint8))
        first = worker.wait(30)
        assert first is not None and first.error == "SystemExit: 3"
        gate.error = None
        worker.submit(1, np.zeros((4, 4), np.uint8))
        second = worker.wait(30)
        assert second is not None and second.ok and second.frame_index == 1
        assert worker.restarts == 0


def test_a_dead_worker_thread_is_started_again_on_submit():
    from rau_rt.localization import LocalizerWorker

    gate = Gate(hang_first=False)
    worker = LocalizerWorker(gate, timeout_s=30)
    with worker._cond:  # end the thread as a bug in the worker itself would
        worker._closed = True
        worker._cond.notify_all()
    worker._thread.join(10)
    worker._closed = False
    worker.submit(7, np.zeros((4, 4), np.uint8))
    done = worker.wait(30)
    assert done is not None and done.ok and worker.restarts == 1
    worker.close()


def test_a_hung_vlm_query_is_counted_and_never_stalls_an_offline_run(bundle, sequence):
    from rau_rt.localization import LocalizerWorker
    from rau_rt.pipeline import KeyframeConfig, PipelineConfig

    frames, box = _opacified(sequence)
    gray = [Frame(i, i / 15, frames[i % len(frames)], "gray", 8) for i in range(10)]
    gate = Gate(hang_first=True)
    timeout = 2.0
    config = PipelineConfig(KeyframeConfig(every=2), wait_for_localizer=True,
                            localizer_timeout_s=timeout)
    worker = LocalizerWorker(gate, timeout_s=timeout)
    try:
        tracker = Tracker(bundle)
        tracker.prompt(0, {"6": box})
        pipeline = Pipeline(tracker, worker, ("6",), config)
        pipeline.run(gray)
        fates = pipeline.stats.to_dict()["keyframe_fates"]
    finally:
        gate.release.set()
        worker.close()
    # the first keyframe hangs: it times out once; the later ones wait behind it, each
    # replacing the one before (dropped), the last still waiting when the stream ends
    assert fates["sent"] == 5 and fates["timed_out"] == 1 and fates["answered"] == 0
    assert fates["dropped"] == 3 and fates["unfinished"] == 1
    # one timeout's wait, not one per keyframe (before: 5 x the timeout)
    assert pipeline.stats.localizer_wait_ms < 2 * timeout * 1e3


def test_a_seg_from_a_dicom_source_joins_its_study_and_references_the_source_frame(
        cine_dicom, tmp_path):
    import pydicom

    from rau_rt.io.sinks import DicomSegSink
    from rau_rt.io.sources import open_source

    source_ds = pydicom.dcmread(cine_dicom, stop_before_pixels=True)
    name = "Ramus intermédius ✓"
    with open_source(cine_dicom) as source:
        frames = list(source)
        sink = DicomSegSink(tmp_path / "seg", keyframes={2}, source_dataset=source.header)
        for frame in frames:
            sink.write(frame, _result(frame.index, frame.image.shape, name))
        sink.close()
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["000002_seg.dcm"]
    seg = pydicom.dcmread(tmp_path / "seg" / "000002_seg.dcm")
    # filed with the images it describes, for the same patient
    assert seg.StudyInstanceUID == source_ds.StudyInstanceUID
    assert seg.PatientID == source_ds.PatientID and seg.PatientName == source_ds.PatientName
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source_ds.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source_ds.SOPInstanceUID
    references = [seg.SourceImageSequence[0]] + [
        item for group in seg.PerFrameFunctionalGroupsSequence
        for derivation in group.DerivationImageSequence for item in derivation.SourceImageSequence]
    assert len(references) == 1 + int(seg.NumberOfFrames)
    for reference in references:  # the source's frame 3 (index 2, counted from 1)
        assert reference.ReferencedSOPClassUID == source_ds.SOPClassUID
        assert reference.ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
        assert reference.ReferencedFrameNumber == 3
    assert (seg.Rows, seg.Columns) == (source_ds.Rows, source_ds.Columns)
    # a reader finds the mask by the source instance and frame number
    import highdicom as hd

    found = hd.seg.segread(tmp_path / "seg" / "000002_seg.dcm").get_pixels_by_source_frame(
        source_sop_instance_uid=source_ds.SOPInstanceUID, source_frame_numbers=[3])
    assert found.shape[:3] == (1, seg.Rows, seg.Columns) and found.any()
    assert seg.SegmentSequence[0].SegmentLabel == name  # UTF-8 survives the round trip
    assert sink.written == [2]


# shared engines under threads (the CPU twin of a TensorRT context or a CUDA IO binding)


def _one_buffer_engine(serialize: bool):
    """An Engine whose `_run` goes through one staging buffer, as a TensorRT context or an
    ONNX Runtime IO binding does."""
    import threading
    import time

    from rau_rt.config import EngineConfig
    from rau_rt.engines.base import Engine
    from rau_rt.types import TensorSpec

    class Staged(Engine):
        name = "staged-test"

        @classmethod
        def available(cls):
            return True

        @classmethod
        def load(cls, path, config=None, *, precision=None):
            raise NotImplementedError

        def __init__(self):
            spec = TensorSpec("x", (1,), "float32")
            super().__init__((spec,), (TensorSpec("y", (1,), "float32"),), "fp32",
                             EngineConfig())
            self._serialize = serialize
            self._buffer = np.zeros(1, np.float32)
            self.overlaps = 0
            self._inside = threading.Semaphore(1)

        def _run(self, feeds):
            if not self._inside.acquire(blocking=False):
                self.overlaps += 1  # another call is between its copy in and copy out
            else:
                self._inside.release()
            self._buffer[:] = feeds["x"]  # copy in ...
            time.sleep(0.002)  # ... the device runs ...
            return {"y": self._buffer * 2}  # ... copy out

        def _release(self):
            pass

    return Staged()


def _hammer(engine, threads=4, calls=25):
    from concurrent.futures import ThreadPoolExecutor

    def worker(k):
        wrong = 0
        for i in range(calls):
            value = np.array([k * 1000 + i], np.float32)
            wrong += int(engine.run({"x": value})["y"][0] != 2 * value[0])
        return wrong

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(worker, range(threads)))


def test_a_shared_stateful_engine_serves_threads_one_call_at_a_time():
    assert _hammer(_one_buffer_engine(serialize=True)) == 0
    # the same engine without the lock mixes the threads' feeds: what the lock prevents
    assert _hammer(_one_buffer_engine(serialize=False)) > 0


# annotation files: any JSON reads as a reference or fails with an AnnotationError naming the
# item, never a traceback from deep inside (hypothesis fuzzing over JSON-shaped documents)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e400, -1e400]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=5),
    max_leaves=20)
_numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 600)
_region = st.fixed_dictionaries({"name": _json_values | st.text(max_size=70)}, optional={
    "box": st.lists(_numbers, min_size=0, max_size=5) | _json_values,
    "polygon": st.lists(st.lists(_numbers, min_size=1, max_size=3), max_size=6) | _json_values,
})
_reference = st.fixed_dictionaries({
    "format": st.just("rau-rt.reference-annotation"), "version": st.just(1),
    "image": st.just("ref.png") | _json_values,
    "image_size": st.lists(_numbers, min_size=0, max_size=3) | _json_values,
    "regions": st.lists(_region, max_size=4) | _json_values,
})


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_reference)
def test_fuzzed_reference_annotations_read_or_fail_typed(tmp_path, doc):
    import json

    from rau_rt.errors import AnnotationError
    from rau_rt.io.annotations import read_reference_annotation

    path = tmp_path / "ref.json"
    path.write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    try:
        annotation = read_reference_annotation(path)
    except AnnotationError as exc:
        assert str(exc).startswith(f"{path}")
        return
    width, height = annotation.image_size
    for region in annotation.regions:
        assert region.box is None or (0 <= region.box[0] < region.box[2] <= width
                                      and 0 <= region.box[1] < region.box[3] <= height)


_coco = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"id": st.integers(0, 3),
                                              "file_name": st.text(max_size=5)}), max_size=3)
    | _json_values,
    "categories": st.lists(st.fixed_dictionaries({"id": st.integers(0, 3),
                                                  "name": _json_values}), max_size=3)
    | _json_values,
    "annotations": st.lists(st.fixed_dictionaries({
        "image_id": st.integers(0, 3), "category_id": st.integers(0, 3),
        "bbox": st.lists(_numbers, max_size=5) | _json_values}), max_size=4) | _json_values,
})


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_coco)
def test_fuzzed_coco_files_read_or_fail_typed(tmp_path, doc):
    import json

    from rau_rt.errors import AnnotationError
    from rau_rt.io.annotations import read_coco

    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc))
    try:
        boxes = read_coco(path)
    except AnnotationError:
        return
    for by_category in boxes.values():
        for found in by_category.values():
            assert all(x1 < x2 and y1 < y2 for x1, y1, x2, y2 in found)


# ending a run: SIGTERM publishes like Ctrl-C, a second signal never leaves .partial files,
# a full disk leaves every output partial with one typed error


class StubPipeline:
    """Feeds `frames` results to the sinks; `during(k)` runs before frame k."""

    def __init__(self, frames=6, during=None):
        from types import SimpleNamespace

        self.frames, self.during = frames, during or (lambda k: None)
        self.stats = SimpleNamespace(frames_dropped=0)

    def run(self, frames, sinks, collect=False):
        for k, frame in enumerate(frames):
            if k >= self.frames:
                break
            self.during(k)
            result = _result(frame.index, frame.image.shape[:2])
            for sink in sinks:
                sink.write(frame, result)


class StubSource:
    frame_count, fps, uri = 6, 15.0, "stub"

    def __iter__(self):
        for i in range(6):
            yield Frame(i, i / 15, np.zeros((120, 160), np.uint8), "gray", 8)


def _sinks(out):
    from rau_rt.io.sinks import JsonlSink

    out.mkdir(exist_ok=True)
    return [JsonlSink(out / "results.jsonl"), MaskArchiveSink(out / "masks")]


def test_sigterm_ends_a_run_and_publishes_its_outputs(tmp_path):
    import os
    import signal

    from rau_rt.commands.run import stream

    def terminate(k):
        if k == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    sinks = _sinks(tmp_path)
    profile, _, interrupted = stream(StubPipeline(during=terminate), StubSource(), sinks,
                                     progress=False)
    assert interrupted and len(profile) == 3
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "masks").is_dir()
    assert not list(tmp_path.glob("*.partial"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run


def test_a_second_signal_while_publishing_is_held_until_all_are_published(tmp_path):
    import os
    import signal

    from rau_rt.commands.run import stream

    class ImpatientSink:
        def write(self, frame, result):
            pass

        def close(self):  # a second Ctrl-C arrives while the outputs are published
            os.kill(os.getpid(), signal.SIGINT)

    sinks = [ImpatientSink(), *_sinks(tmp_path)]
    with pytest.raises(KeyboardInterrupt, match="SIGINT while publishing"):
        stream(StubPipeline(), StubSource(), sinks, progress=False)
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "masks").is_dir()
    assert not list(tmp_path.glob("*.partial"))


def test_a_full_disk_leaves_every_output_partial_with_one_typed_error(tmp_path):
    import errno

    from rau_rt.commands.run import stream
    from rau_rt.errors import OutputError

    sinks = _sinks(tmp_path)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "masks.partial"))

    sinks[1]._finish = disk_full  # the second output fails as it is flushed
    with pytest.raises(OutputError, match=r"No space left on device.*nothing was published"):
        stream(StubPipeline(), StubSource(), sinks, progress=False)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "masks").exists()
    assert (tmp_path / "results.jsonl.partial").is_file()  # all left partial, named so


# a live network source that stalls ends the run with a typed error, outputs published


def _mpegts_bytes(frames=60) -> bytes:
    import io as bytes_io

    import av

    buffer = bytes_io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=15)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), (i * 4) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


@pytest.fixture
def stalling_server():
    """An HTTP server that sends the head of an MPEG-TS stream, then nothing."""
    import socket
    import threading

    data = _mpegts_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()
    held = []

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n\r\n"
                         + data[:len(data) // 2])
            held.append(conn)  # open, silent: a stalled camera or encoder

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/live.ts"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_stalled_stream_ends_with_a_typed_error_and_publishes_what_came(stalling_server,
                                                                           tmp_path):
    from rau_rt.commands.run import stream
    from rau_rt.io.sinks import JsonlSink
    from rau_rt.io.sources import SourceStalledError, VideoSource

    source = VideoSource(stalling_server, live=True, timeout_s=1.0)
    sink = JsonlSink(tmp_path / "results.jsonl")
    with source, pytest.raises(SourceStalledError, match="stalled: no data for 1 s") as caught:
        stream(StubPipeline(frames=10_000), source, [sink], progress=False)
    profile, _ = caught.value.run
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(profile) > 0  # every frame before the stall, published


def test_a_stream_that_never_answers_is_a_typed_error(tmp_path):
    import socket

    from rau_rt.io.sources import SourceStalledError, VideoSource

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (the kernel does), never answers
    try:
        with pytest.raises(SourceStalledError, match="no answer within 1 s"):
            VideoSource(f"http://127.0.0.1:{silent.getsockname()[1]}/x.ts", live=True,
                        timeout_s=1.0)
    finally:
        silent.close()


def test_a_timed_out_query_is_cancelled_so_the_worker_serves_the_next(tmp_path):
    import threading

    from rau_rt.localization import LocalizerWorker

    class Cancellable:
        """Answers at once, except a query that runs until cancelled (a decode loop)."""

        def __init__(self):
            self.cancelled, self.answered = threading.Event(), []

        def cancel(self):
            self.cancelled.set()

        def locate_result(self, frame, regions=None):
            from types import SimpleNamespace

            if not self.answered:
                assert self.cancelled.wait(30), "the worker never cancelled the overdue query"
            self.answered.append(frame.shape)
            return SimpleNamespace(boxes={})

    localizer = Cancellable()
    with LocalizerWorker(localizer, timeout_s=0.2) as worker:
        worker.submit(0, np.zeros((4, 4), np.uint8))
        first = worker.wait(30)
        assert first.timed_out and localizer.cancelled.is_set()
        worker.submit(1, np.zeros((5, 5), np.uint8))
        second = worker.wait(30)  # served once the cancelled query returned
        assert second is not None and second.ok and second.frame_index == 1


def test_a_slow_sink_in_the_background_never_blocks_the_frame_path(tmp_path):
    import threading

    from rau_rt.io.sinks import BackgroundSink, JsonlSink

    writing, release = threading.Event(), threading.Event()

    class Slow(JsonlSink):  # a DICOM SEG writer taking longer than frames arrive
        def write(self, frame, result):
            writing.set()
            release.wait(30)
            super().write(frame, result)

    sink = BackgroundSink(Slow(tmp_path / "slow.jsonl"), capacity=2)
    frame = Frame(0, 0.0, np.zeros((120, 160), np.uint8), "gray", 8)
    sink.write(frame, _result(0, (120, 160)))
    assert writing.wait(30)
    for i in range(1, 20):  # returns at once: frame 0 in the writer, two queued, 17 dropped
        sink.write(replace(frame, index=i), _result(i, (120, 160)))
    assert sink.dropped == 17
    release.set()
    sink.close()
    assert len((tmp_path / "slow.jsonl").read_text().splitlines()) == 3


def test_a_background_sink_error_reaches_the_run(tmp_path):
    from rau_rt.io.sinks import BackgroundSink, JsonlSink

    class Broken(JsonlSink):
        def write(self, frame, result):
            raise OSError(28, "No space left on device")

    sink = BackgroundSink(Broken(tmp_path / "broken.jsonl"))
    sink.write(Frame(0, 0.0, np.zeros((8, 8), np.uint8), "gray", 8), _result(0, (8, 8)))
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    assert (tmp_path / "broken.jsonl.partial").exists() and not (tmp_path / "broken.jsonl").exists()


# frames: every malformed array is a typed error where it enters; odd but valid memory
# layouts (flipped, sliced, Fortran-ordered) give exactly the contiguous frame's result

_BAD_FRAMES = [
    ("float32 pixels", np.zeros((8, 8), np.float32), "gray", 8, "uint8 or uint16"),
    ("int16 pixels", np.zeros((8, 8), np.int16), "gray", 8, "uint8 or uint16"),
    ("bool pixels", np.zeros((8, 8), bool), "gray", 8, "uint8 or uint16"),
    ("4-D array", np.zeros((1, 8, 8, 3), np.uint8), "bgr", 8, r"\(H, W, 3\)"),
    ("four channels", np.zeros((8, 8, 4), np.uint8), "bgr", 8, r"\(H, W, 3\)"),
    ("one channel as rgb", np.zeros((8, 8, 1), np.uint8), "rgb", 8, r"\(H, W, 3\)"),
    ("colour as gray", np.zeros((8, 8, 3), np.uint8), "gray", 8, r"\(H, W\)"),
    ("empty frame", np.zeros((0, 8), np.uint8), "gray", 8, "0 frames|8x0|1 to"),
    ("unknown order", np.zeros((8, 8, 3), np.uint8), "bgra", 8, "channel_order"),
    ("12 bits in uint8", np.zeros((8, 8), np.uint8), "gray", 12, "bits_stored 12"),
    ("0 bits", np.zeros((8, 8), np.uint16), "gray", 0, "bits_stored 0"),
]


@pytest.mark.parametrize("image, order, bits, message",
                         [case[1:] for case in _BAD_FRAMES], ids=[c[0] for c in _BAD_FRAMES])
def test_malformed_frames_are_typed_errors(image, order, bits, message):
    with pytest.raises(InputError, match=message):
        Frame(0, 0.0, image, order, bits)


@pytest.mark.parametrize("layout", ["flipped", "sliced", "fortran", "read-only"])
def test_odd_memory_layouts_track_exactly_like_contiguous_frames(bundle, sequence, layout):
    frames, box = _opacified(sequence)
    base = np.stack([frames[0]] * 3, axis=-1)  # (H, W, 3) uint8
    odd = {"flipped": base[::-1, ::-1][::-1, ::-1],
           "sliced": np.pad(base, ((0, 0), (0, 7), (0, 0)))[:, :base.shape[1]],
           "fortran": np.asfortranarray(base),
           "read-only": Frame(0, 0.0, base, "rgb", 8).image}[layout]
    assert np.array_equal(odd, base)
    steps = []
    for image in (base, odd):
        tracker = Tracker(bundle)
        tracker.prompt(0, {"6": box})
        steps.append(tracker.step(image))
    assert steps[0].object_scores == steps[1].object_scores
    for name, region in steps[0].regions.items():
        other = steps[1].regions[name]
        assert region.present == other.present
        if region.present:
            np.testing.assert_array_equal(region.mask, other.mask)


# DICOM display: a linear window rides on the frame in raw units (a rescale undone); anything
# else (a VOI LUT table, SIGMOID) is applied by pydicom and the frame carries displayed values


def test_a_rescaled_dicoms_window_is_converted_to_raw_units(cine_dicom, tmp_path):
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from rau_rt.io.sinks import to_bgr8
    from rau_rt.io.sources import open_source

    plain = pydicom.dcmread(cine_dicom)
    center, width = float(plain.WindowCenter), float(plain.WindowWidth)
    path = _edited(cine_dicom, tmp_path, _set(RescaleSlope="2", RescaleIntercept="-100",
                                             WindowCenter=f"{2 * center - 100:.1f}",
                                             WindowWidth=f"{2 * width:.1f}"))
    with open_source(path) as source:
        frame = next(iter(source))
    assert frame.window == pytest.approx((center, width), abs=0.05)
    with open_source(cine_dicom) as source:  # the same display as the unscaled file
        np.testing.assert_array_equal(to_bgr8(frame), to_bgr8(next(iter(source))))
    modality = apply_modality_lut(frame.image, pydicom.dcmread(path))
    assert modality.max() == 2 * frame.image.max() - 100  # what the window's units are


@pytest.mark.parametrize("edit", ["sigmoid", "lut table"])
def test_a_voi_function_or_table_is_applied_by_pydicom(cine_dicom, tmp_path, edit):
    import pydicom
    from pydicom.pixels import apply_voi_lut

    from rau_rt.io.sources import open_source

    def sigmoid(ds):
        ds.VOILUTFunction = "SIGMOID"

    def table(ds):
        from pydicom.dataset import Dataset

        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.add_new(0x00283006, "US", [int(4095 * (v / 4095) ** 0.5) for v in range(4096)])
        ds.VOILUTSequence = [item]
        del ds.WindowCenter, ds.WindowWidth

    path = _edited(cine_dicom, tmp_path, {"sigmoid": sigmoid, "lut table": table}[edit])
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array[1]
    with open_source(path) as source:
        frames = list(source)
    assert frames[1].window is None  # already displayed: nothing left to window
    expected = np.clip(np.rint(apply_voi_lut(raw, ds, index=0)), 0, 4095).astype(np.uint16)
    np.testing.assert_array_equal(frames[1].image, expected)
    assert not np.array_equal(frames[1].image, raw)


def test_a_running_onnx_runtime_call_can_be_terminated(tmp_path):
    """What `Localizer.cancel` does to a query's call in flight (a long prefill): ONNX Runtime
    stops between nodes and the call raises a typed error instead of running to its end."""
    import threading

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rau_rt.engines import registry
    from rau_rt.engines.base import EngineTerminatedError

    weight = numpy_helper.from_array(np.eye(512, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", [f"h{i}" if i else "x", "w"], [f"h{i + 1}"])
             for i in range(400)]  # seconds of work on 2 cores
    nodes.append(helper.make_node("Identity", ["h400"], ["y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [512, 512])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [512, 512])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "slow.onnx")
    engine = registry.open_engine(tmp_path / "slow.onnx", "onnxruntime")
    outcome = []

    def call():
        try:
            engine.run({"x": np.ones((512, 512), np.float32)})
            outcome.append("finished")
        except EngineTerminatedError:
            outcome.append("terminated")

    thread = threading.Thread(target=call)
    thread.start()
    while thread.is_alive() and not engine._running:
        threading.Event().wait(0.001)
    engine.terminate(thread.ident)
    thread.join(60)
    assert outcome == ["terminated"]
    # the engine serves the next call normally
    np.testing.assert_allclose(engine.run({"x": np.ones((512, 512), np.float32)})["y"], 1.0)
    engine.close()

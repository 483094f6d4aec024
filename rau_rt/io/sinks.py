"""Result sinks: JSONL, mask archive, overlay video, DICOM SEG for keyframes.

A sink takes `(frame, result)` pairs. Every sink writes to `<name>.partial` and renames it onto
the final name only on `close()` after a clean run, so a crash never leaves a truncated file that
looks complete; on an exception (`with` block) the `.partial` stays for inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from rau_rt import ops
from rau_rt._version import __version__
from rau_rt.errors import InputError
from rau_rt.io import rle
from rau_rt.types import Frame, FrameResult


class Sink(ABC):
    """Writes results to `path` atomically (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.closed = False

    @abstractmethod
    def write(self, frame: Frame, result: FrameResult) -> None:
        """Add one frame's result."""

    def _finish(self) -> None:  # noqa: B027 (a folder of finished files holds nothing open)
        """Flush and close what the sink holds open (before the rename)."""

    def finish(self) -> None:
        """Flush and close what the sink holds, under the `.partial` name (idempotent)."""
        if not self.closed:
            self.closed = True
            self._finish()

    def publish(self) -> None:
        """Finish, then rename the `.partial` to the final name (idempotent). Publishing
        several sinks all-or-nothing: `finish` every one first, then `publish` them."""
        self.finish()
        if self.partial.exists():
            if self.path.is_dir():
                shutil.rmtree(self.path)
            os.replace(self.partial, self.path)

    def close(self) -> None:
        """Finish and publish under the final name (idempotent)."""
        self.publish()

    def abort(self) -> None:
        """Stop without publishing; the `.partial` stays."""
        self.finish()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def result_record(result: FrameResult) -> dict[str, object]:
    """The JSON form of a FrameResult (masks as COCO RLE)."""
    return {
        "index": result.index,
        "timestamp_s": result.timestamp_s,
        "frame_size": list(result.frame_size),
        "latency_ms": result.latency_ms,
        "stage_ms": dict(result.stage_ms),
        "vlm_staleness": result.vlm_staleness,
        "regions": {
            name: {"present": r.present, "source": r.source, "score": float(r.score),
                   "box": list(r.box) if r.box is not None else None,
                   "mask": rle.encode(r.mask) if r.mask is not None else None}
            for name, r in result.regions.items()},
    }


class JsonlSink(Sink):
    """One JSON line per frame (`result_record`)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._file = open(self.partial, "w")

    def write(self, frame: Frame, result: FrameResult) -> None:
        self._file.write(json.dumps(result_record(result)) + "\n")
        self._file.flush()

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


_FILE_SAFE = re.compile(r"[^A-Za-z0-9 ._-]")


def region_file_name(name: str) -> str:
    """A file or folder name for region `name` that stays inside its folder on any OS: the name
    itself when it is plain (letters, digits, space, `._-`, not leading with a dot or space);
    otherwise the other characters as `_`, plus a digest of the name, so distinct names never
    share a file."""
    safe = _FILE_SAFE.sub("_", name).strip(" ")
    if safe == name and not name.startswith("."):
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe.lstrip('.')[:48]}-{digest}"


class MaskArchiveSink(Sink):
    """Per-region masks of every frame: `.npz` (members `<region>/<index>`, uint8 0/1,
    deflated; `numpy.load` reads it) or a folder of `<region>/<index>.png` (0/255); `<region>`
    is `region_file_name` of the region's name."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._npz = self.path.suffix == ".npz"
        if self._npz:
            self._zip = zipfile.ZipFile(self.partial, "w", zipfile.ZIP_DEFLATED)
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)

    def write(self, frame: Frame, result: FrameResult) -> None:
        for name, region in result.regions.items():
            if region.mask is None:
                continue
            mask = region.mask.astype(np.uint8)
            if self._npz:
                member_name = f"{region_file_name(name)}/{result.index:06d}.npy"
                with self._zip.open(member_name, "w") as member:
                    np.lib.format.write_array(member, mask, allow_pickle=False)
            else:
                folder = self.partial / region_file_name(name)
                folder.mkdir(exist_ok=True)
                cv2.imwrite(str(folder / f"{result.index:06d}.png"), mask * 255)

    def _finish(self) -> None:
        if self._npz:
            self._zip.close()


def to_bgr8(frame: Frame) -> np.ndarray:
    """An 8-bit BGR view of a frame for display (gray replicated): through its VOI window
    ([c - w/2, c + w/2] -> [0, 255], as the models see it) if it has one, else high bits kept."""
    image = frame.image
    if frame.window is not None:
        center, width = frame.window
        scaled = (image.astype(np.float32) - (center - width / 2)) * (255.0 / width)
        image = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype == np.uint16:
        scale = 255.0 / ((1 << frame.bits_stored) - 1)
        image = np.clip(image * scale + 0.5, 0, 255).astype(np.uint8)
    if frame.channel_order == "gray":
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if frame.channel_order == "rgb":
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return np.array(image, order="C")  # a new array: callers draw on it


class OverlayVideoSink(Sink):
    """The frames with masks, boxes, labels and a latency HUD, as H.264/MPEG-4 video."""

    def __init__(self, path: str | Path, alpha: float = 0.45) -> None:
        super().__init__(path)
        import av

        codecs = av.codecs_available
        self._codec = next((c for c in ("libx264", "mpeg4") if c in codecs), None)
        if self._codec is None:
            raise InputError("overlay video: this PyAV build has neither libx264 nor mpeg4")
        self._container = av.open(str(self.partial), "w", format=_container_format(self.path))
        self._stream = None
        self._alpha = alpha
        self._t0: float | None = None

    def write(self, frame: Frame, result: FrameResult) -> None:
        import av

        image = to_bgr8(frame)
        names = [n for n, r in result.regions.items() if r.present]
        if names:
            masks = np.stack([result.regions[n].mask for n in names])
            labels = [f"{n} {result.regions[n].score:.2f} {result.regions[n].source}"
                      for n in names]
            ops.overlay(image, masks, alpha=self._alpha, boxes=[result.regions[n].box
                                                                for n in names],
                        labels=labels, out=image)
        stale = "-" if result.vlm_staleness is None else str(result.vlm_staleness)
        hud = (f"#{result.index}  {result.latency_ms:.1f} ms  VLM age {stale} frames  "
               f"{len(names)}/{len(result.regions)} regions")
        cv2.putText(image, hud, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        if self._stream is None:
            self._open_stream(image.shape[1], image.shape[0])
        height, width = self._stream.height, self._stream.width
        padded = cv2.copyMakeBorder(image, 0, height - image.shape[0], 0,
                                    width - image.shape[1], cv2.BORDER_CONSTANT)
        video_frame = av.VideoFrame.from_ndarray(padded, format="bgr24")
        video_frame.time_base = self._stream.codec_context.time_base  # 1 ms: exact timestamps
        if self._t0 is None:
            self._t0 = frame.timestamp_s
        video_frame.pts = max(self._last_pts + 1, round((frame.timestamp_s - self._t0) * 1000))
        self._last_pts = video_frame.pts
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)

    def _open_stream(self, width: int, height: int) -> None:
        from fractions import Fraction

        # yuv420p needs even sides; pad by one pixel rather than resample
        self._stream = self._container.add_stream(self._codec, rate=30)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = Fraction(1, 1000)
        self._last_pts = -1

    def _finish(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        self._container.close()


def _container_format(path: Path) -> str:
    formats = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi", ".mov": "mov"}
    if path.suffix.lower() not in formats:
        raise InputError(f"{path}: overlay video must end in one of {sorted(formats)}")
    return formats[path.suffix.lower()]


class DicomSegSink(Sink):
    """DICOM SEG objects for chosen keyframes, in a folder (`<index>_seg.dcm`, one binary
    segment per present region).

    With `source_dataset` (the header of a DICOM source) the SEG joins the source's study (its
    patient and study modules copied) and references the source directly: the instance in its
    Referenced Series Sequence, and the keyframe as ReferencedFrameNumber (index + 1) in its
    Source Image Sequence and in every frame's Derivation Image Sequence, so a PACS files the
    SEG with the cine it segments and a viewer overlays it on that frame. highdicom builds SEGs
    only over single-frame sources when there is no Frame of Reference (an XA cine has none), so
    the SEG is built over the keyframe as a single-frame Secondary Capture in memory and then
    pointed at the source frame; the capture itself is not written.

    Without one (a video, a folder) there is no instance to reference: the keyframe is written
    as a Secondary Capture (`<index>_sc.dcm`, 8-bit monochrome or RGB, the frame as displayed)
    that the SEG references, both in a new study for `patient_id`. Keyframes: the given
    indices, or by default every frame whose result holds a VLM box.
    """

    def __init__(self, path: str | Path, keyframes: set[int] | None = None,
                 patient_id: str = "ANONYMOUS", source_dataset: object | None = None) -> None:
        super().__init__(path)
        self.keyframes = keyframes
        self.patient_id = patient_id
        self.source = source_dataset
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        from pydicom.uid import generate_uid

        self._study_uid: str | None = None
        # one series for this run's Secondary Captures and one for its SEGs
        self._series = {"sc": generate_uid(), "seg": generate_uid()}
        self.written: list[int] = []

    def _point_at_source(self, seg, index: int) -> None:
        """Re-target the SEG's references from the in-memory capture to frame `index` of the
        source instance (DICOM frames count from 1)."""
        source = self.source
        items = [seg.SourceImageSequence[0]]
        for group in seg.PerFrameFunctionalGroupsSequence:
            for derivation in group.DerivationImageSequence:
                items += list(derivation.SourceImageSequence)
        for item in items:
            item.ReferencedSOPClassUID = source.SOPClassUID
            item.ReferencedSOPInstanceUID = source.SOPInstanceUID
            item.ReferencedFrameNumber = index + 1
        (series,) = seg.ReferencedSeriesSequence
        series.SeriesInstanceUID = source.SeriesInstanceUID
        (instance,) = series.ReferencedInstanceSequence
        instance.ReferencedSOPClassUID = source.SOPClassUID
        instance.ReferencedSOPInstanceUID = source.SOPInstanceUID

    def _is_keyframe(self, result: FrameResult) -> bool:
        if self.keyframes is not None:
            return result.index in self.keyframes
        return any(r.source == "vlm" and r.present for r in result.regions.values())

    def write(self, frame: Frame, result: FrameResult) -> None:
        present = [(n, r) for n, r in result.regions.items() if r.present]
        if not present or not self._is_keyframe(result):
            return
        import highdicom as hd
        from pydicom.sr.codedict import codes

        image = to_bgr8(frame)
        gray = frame.channel_order == "gray"
        pixels = image[:, :, 0] if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        common = {"pixel_array": pixels,
                  "photometric_interpretation": "MONOCHROME2" if gray else "RGB",
                  "bits_allocated": 8, "coordinate_system": "PATIENT",
                  # series numbers high above a modality's, so they never read as the source's
                  "series_instance_uid": self._series["sc"], "series_number": 9901,
                  "sop_instance_uid": hd.UID(), "instance_number": result.index + 1,
                  "manufacturer": "rau-rt", "patient_orientation": ("L", "F")}
        if self.source is not None:
            with warnings.catch_warnings():
                # the patient and study modules are copied as the source has them; highdicom's
                # advice on a name's format (e.g. one component, "PLA") is for new names
                warnings.filterwarnings("ignore", message=".*unlikely to represent the "
                                        "intended person name", category=UserWarning)
                sc = hd.sc.SCImage.from_ref_dataset(self.source, **common)
        else:
            self._study_uid = self._study_uid or hd.UID()
            sc = hd.sc.SCImage(study_instance_uid=self._study_uid, patient_id=self.patient_id,
                               **common)
        algorithm = hd.AlgorithmIdentificationSequence(
            name="rau-rt", version=__version__, family=codes.cid7162.ArtificialIntelligence)
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=k + 1, segment_label=name[:64],
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.AnatomicalStructure,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm)
            for k, (name, _) in enumerate(present)]
        masks = np.stack([r.mask for _, r in present], axis=-1)[None]  # (1, H, W, segments)
        with warnings.catch_warnings():  # the names copied from the source, as above
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended "
                                    "person name", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=[sc], pixel_array=masks.astype(bool),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions, series_instance_uid=self._series["seg"],
                series_number=9902, sop_instance_uid=hd.UID(),
                instance_number=result.index + 1, manufacturer="rau-rt",
                manufacturer_model_name="rau-rt", software_versions=__version__,
                device_serial_number="0", omit_empty_frames=False)
        seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: region names as typed
        if self.source is not None:
            self._point_at_source(seg, result.index)
        else:
            sc.save_as(self.partial / f"{result.index:06d}_sc.dcm")
        seg.save_as(self.partial / f"{result.index:06d}_seg.dcm")
        self.written.append(result.index)


class BackgroundSink(Sink):
    """Another sink, written on its own thread: a live run's frame path only queues.

    For sinks that can take longer than a frame interval (a DICOM SEG keyframe is hundreds of
    milliseconds of highdicom work). The queue holds `capacity` frames; a frame that finds it
    full is not written and is counted in `dropped` (the summary reports it), so a slow sink
    never delays the frames or grows memory. `finish` waits until the queue is written; an
    error in the writer is raised there (or by the next `write`).
    """

    def __init__(self, inner: Sink, capacity: int = 64) -> None:
        import queue
        import threading

        super().__init__(inner.path)
        self.inner, self.partial = inner, inner.partial
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(capacity)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"rau-rt-sink-{inner.path.name}",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.inner.write(*item)
                except BaseException as exc:  # raised on the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, frame: Frame, result: FrameResult) -> None:
        import queue

        self._raise()
        try:
            self._queue.put_nowait((frame, result))
        except queue.Full:
            self.dropped += 1

    def _finish(self) -> None:
        self._queue.put(None)  # after every queued frame
        self._thread.join()
        if self._error is not None:
            self.inner.abort()  # closes what it holds; its .partial stays
            self._raise()
        self.inner.finish()

    def publish(self) -> None:
        self.finish()
        self.inner.publish()

    def abort(self) -> None:
        try:
            self.finish()
        except BaseException:  # aborting: the inner sink stays partial either way
            pass
        self.inner.abort()

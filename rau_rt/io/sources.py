"""Frame sources: one `open_source(uri)` for files, folders, DICOM cines, cameras and streams.

| uri | source |
|---|---|
| `path/to/cine.dcm` (or any file starting with a DICOM preamble) | multi-frame DICOM via pydicom |
| `path/to/video.mkv`, `.mp4`, `.avi`, ... | video file via PyAV (exact presentation timestamps) |
| `path/to/folder/` | image folder (PNG/JPEG/TIFF/BMP, natural sort, 16-bit kept) |
| `camera:0` | camera through OpenCV (timestamps from the capture clock) |
| `rtsp://...`, `http(s)://...` | network stream via PyAV |
| `synthetic:seed=0&frames=64&size=512&fps=15` | the synthetic angiography generator |

Sources stream: they decode one frame at a time and never load a whole video. Unreadable input
raises `InputError` naming the file and the reason, never a bare PyAV/pydicom/OpenCV traceback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.io.source import Source
from rau_rt.types import MAX_FRAME_SIDE, Frame, check_frame_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
# A decoded video may end this many frame intervals before the container's declared duration
# before we call it truncated (last-frame duration and rounding of the declared duration).
TRUNCATION_SLACK_FRAMES = 1.5


# A network source that neither opens nor delivers data for this long is stalled: the run
# ends with SourceStalledError and publishes what it has (Ctrl-C is seen within this long too).
NETWORK_TIMEOUT_S = 10.0


class SourceStalledError(InputError):
    """A live source stopped delivering (no data within its timeout)."""


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class ImageFolderSource(Source):
    """Every image file in a folder, in natural order (frame_2 before frame_10)."""

    def __init__(self, folder: Path, fps: float | None = None, bits_stored: int | None = None):
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                       key=_natural_key)
        if not files:
            raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        super().__init__(str(folder), fps, len(files))
        self.files = files
        self.bits_stored = bits_stored

    def __iter__(self) -> Iterator[Frame]:
        first: tuple[tuple[int, ...], Path] | None = None
        for index, path in enumerate(self.files):
            _check_image_header(path, index, self.uri)
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise InputError(f"{path}: not a readable image (frame {index} of {self.uri})")
            if first is None:
                first = image.shape, path
            elif image.shape != first[0]:  # a cine has one frame size
                raise InputError(f"{path}: a {image.shape} image in a folder whose first frame "
                                 f"({first[1].name}) is {first[0]}; a frame source needs one "
                                 "size and channel count (move or resize the odd files)")
            yield _frame_from_opencv(image, index, index / self.fps if self.fps else float(index),
                                     self.bits_stored, path)


def _check_image_header(path: Path, index: int, uri: str) -> None:
    """Refuse a too-large image from its header, before decoding allocates it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:  # far over any frame size
        raise InputError(f"{path} (frame {index} of {uri}): {exc}; rau-rt takes frames of 1 "
                         f"to {MAX_FRAME_SIDE} pixels a side") from None
    except (UnidentifiedImageError, OSError):
        return  # OpenCV decides (it reads formats PIL does not); an unreadable file fails there
    check_frame_size(height, width, f"{path} (frame {index} of {uri})")


def _frame_from_opencv(image: np.ndarray, index: int, timestamp: float, bits: int | None,
                       path: object) -> Frame:
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: expected 8- or 16-bit pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # drop alpha
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    order = "gray" if image.ndim == 2 else "bgr"
    return Frame(index, timestamp, image, order, bits or 8 * image.dtype.itemsize)


class VideoSource(Source):
    """A video file or network stream decoded by PyAV, with its presentation timestamps."""

    def __init__(self, uri: str, live: bool = False, options: dict[str, str] | None = None,
                 timeout_s: float | None = None):
        import av

        self._timeout_s = timeout_s
        try:
            self._container = av.open(uri, options=options or {},
                                      timeout=None if timeout_s is None else (timeout_s,
                                                                              timeout_s))
        except av.error.ExitError as exc:  # the timeout's interrupt
            raise SourceStalledError(f"{uri}: no answer within {timeout_s:g} s when opening "
                                     "(server down, wrong address, or a firewall)") from exc
        except av.error.FFmpegError as exc:
            raise InputError(f"{uri}: cannot open as video ({exc.strerror or exc})") from exc
        except OSError as exc:
            raise InputError(f"{uri}: cannot open ({exc})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise InputError(f"{uri}: has no video stream")
        stream = self._container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.name is None:
            self._container.close()
            raise InputError(f"{uri}: no decoder for its video codec in this PyAV build")
        context = stream.codec_context
        if context.width and context.height:
            try:
                check_frame_size(context.height, context.width, uri)
            except InputError:
                self._container.close()
                raise
        rate = stream.average_rate or stream.guessed_rate
        frames = int(stream.frames) or None
        super().__init__(uri, float(rate) if rate else None, None if live else frames)
        self._stream = stream
        self._live = live
        metadata = {**self._container.metadata, **stream.metadata}
        bits = metadata.get("BITS_STORED") or metadata.get("bits_stored")
        self._bits = int(bits) if bits and str(bits).isdigit() else None

    def __iter__(self) -> Iterator[Frame]:
        import av

        index, last_time = 0, None
        try:
            for decoded in self._container.decode(self._stream):
                fmt = decoded.format.name
                if fmt.startswith("gray16"):
                    image, order, bits = decoded.to_ndarray(format="gray16le"), "gray", 16
                elif fmt.startswith("gray"):
                    image, order, bits = decoded.to_ndarray(format="gray"), "gray", 8
                else:
                    image, order, bits = decoded.to_ndarray(format="bgr24"), "bgr", 8
                if self._live or decoded.time is None:
                    timestamp = time.monotonic() if self._live else index / (self.fps or 1.0)
                else:
                    timestamp = float(decoded.time)
                last_time = timestamp
                yield Frame(index, timestamp, image, order, self._bits or bits)
                index += 1
        except av.error.ExitError as exc:  # a network read outlived the timeout
            raise SourceStalledError(f"{self.uri}: the stream stalled: no data for "
                                     f"{self._timeout_s:g} s after {index} frames") from exc
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.uri}: decoding failed after {index} frames "
                             f"({exc.strerror or exc}); the file is corrupt or truncated") from exc
        if index == 0:
            raise InputError(f"{self.uri}: zero frames decoded (empty, truncated or "
                             "unsupported codec)")
        self._check_complete(index, last_time)

    def _check_complete(self, decoded: int, last_time: float | None) -> None:
        """Raise when decoding stopped well before the container's declared end."""
        if self._live or self.fps is None or last_time is None:
            return
        declared = self._container.duration  # microseconds (AV_TIME_BASE), None if unknown
        if declared is None:
            return
        end = last_time + 1.0 / self.fps
        if declared / 1e6 - end > TRUNCATION_SLACK_FRAMES / self.fps:
            raise InputError(f"{self.uri}: truncated: the container declares "
                             f"{declared / 1e6:.3f} s but decoding ended at {end:.3f} s after "
                             f"{decoded} frames")

    def close(self) -> None:
        self._container.close()


class CameraSource(Source):
    """A camera through OpenCV; timestamps from the capture clock (time.monotonic)."""

    def __init__(self, index: int) -> None:
        self._capture = cv2.VideoCapture(index)
        if not self._capture.isOpened():
            raise InputError(f"camera:{index}: cannot open the device")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        super().__init__(f"camera:{index}", fps if fps > 0 else None, None)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while self._capture.isOpened():
            ok, image = self._capture.read()
            stamp = time.monotonic()
            if not ok:
                return
            yield _frame_from_opencv(image, index, stamp, None, self.uri)
            index += 1

    def close(self) -> None:
        self._capture.release()


class SyntheticSource(Source):
    """The synthetic angiography generator as a source (12-bit gray frames), rendered frame by
    frame as the stream is read (`rau_rt.synthetic.SequenceStream`)."""

    def __init__(self, uri: str, params: dict[str, str]) -> None:
        from rau_rt.synthetic import SequenceStream, sequence_config

        known = {"seed": int, "frames": int, "size": int, "fps": float, "dominance": str,
                 "artery": str, "stenoses": int, "look": str}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InputError(f"{uri}: unknown parameters {unknown}; known: {sorted(known)}")
        try:
            kwargs = {key: known[key](value) for key, value in params.items()}
        except ValueError as exc:
            raise InputError(f"{uri}: {exc}") from exc
        self._stream = SequenceStream(sequence_config(**kwargs))
        self.meta = self._stream.meta
        super().__init__(uri, self.meta.config.fps, self.meta.config.frames)

    def __iter__(self) -> Iterator[Frame]:
        window = tuple(float(v) for v in self.meta.window)
        for index, (image, _) in enumerate(self._stream):
            yield Frame(index, index / self.fps, image, "gray", 12, window)


def open_source(uri: str | Path, *, fps: float | None = None) -> Source:
    """The source for `uri` (see the module docstring for the forms).

    Args:
        uri: a path, `camera:N`, a stream URL or a `synthetic:` URI.
        fps: frame rate for an image folder (default: timestamps are frame indices).

    Raises:
        InputError: the uri names nothing readable; the message says why.
    """
    text = str(uri)
    if text.startswith("synthetic:"):
        query = text[len("synthetic:"):].lstrip("/?")
        return SyntheticSource(text, dict(parse_qsl(query, strict_parsing=bool(query))))
    if text.startswith("camera:"):
        index = text[len("camera:"):]
        if not index.isdigit():
            raise InputError(f"{text}: expected camera:N with a device number N")
        return CameraSource(int(index))
    if text.startswith(STREAM_SCHEMES):
        return VideoSource(text, live=True, timeout_s=NETWORK_TIMEOUT_S)
    path = Path(text)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return ImageFolderSource(path, fps=fps)
    if path.suffix.lower() == ".dcm" or _has_dicom_preamble(path):
        from rau_rt.io.dicom import DicomSource

        return DicomSource(path)
    return VideoSource(str(path))


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"

"""Multi-frame DICOM cines (XA, US, any modality) as a frame source, through pydicom.

Frames are decoded one at a time (`pydicom.pixels.iter_pixels`). MONOCHROME1 is inverted to
MONOCHROME2 so that higher always means brighter; YBR colour is converted to RGB; BitsStored
(12 for most X-ray) travels with each frame. Frame timing comes from FrameTimeVector,
FrameTime or CineRate, in that order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.io.source import Source
from rau_rt.types import Frame, check_frame_size, window_ok

# Longest gap between two frames of a cine this source accepts (fluoroscopy runs at 0.5 fps
# at the slowest); a larger one is a broken header, and a --realtime replay would wait it out.
MAX_FRAME_INTERVAL_S = 10.0


class DicomSource(Source):
    """A single- or multi-frame DICOM image file."""

    def __init__(self, path: Path) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:  # everything but large values (the pixel data: its length, not its bytes)
            header = pydicom.dcmread(path, defer_size="64 KB")
        except InvalidDicomError as exc:
            raise InputError(f"{path}: not a DICOM file ({exc})") from exc
        except (OSError, EOFError, ValueError) as exc:
            raise InputError(f"{path}: unreadable DICOM ({exc})") from exc
        for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
            if keyword not in header:
                raise InputError(f"{path}: a DICOM file without pixel data attributes "
                                 f"({keyword} missing): not an image")
        frames = _number_of_frames(header, path)
        _check_pixel_module(header, path, frames)
        try:
            self._times = _frame_times(header, frames)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: unreadable frame timing ({exc})") from None
        if self._times is not None and (
                not all(np.isfinite(self._times)) or np.any(np.diff(self._times) < 0)
                or (frames > 1 and np.max(np.diff(self._times)) > MAX_FRAME_INTERVAL_S)):
            raise InputError(f"{path}: frame timing (FrameTimeVector / FrameTime / CineRate) "
                             f"is not a cine's: intervals must be finite, increasing and at "
                             f"most {MAX_FRAME_INTERVAL_S:g} s (a --realtime replay waits them)")
        fps = None if self._times is None or frames < 2 else (frames - 1) / (
            self._times[-1] - self._times[0]) if self._times[-1] > self._times[0] else None
        super().__init__(str(path), fps, frames)
        self.path = path
        self.header = header  # what derived objects copy (patient, study); pixel data unread
        self.photometric = str(header.PhotometricInterpretation)
        self.bits_stored = int(header.get("BitsStored", header.BitsAllocated))
        if int(header.BitsAllocated) > 16:
            raise InputError(f"{path}: {header.BitsAllocated}-bit pixels; frame sources take "
                             "8- to 16-bit images")
        if int(header.get("PixelRepresentation", 0)) != 0:
            raise InputError(f"{path}: signed pixels (PixelRepresentation 1) are not a "
                             "supported cine format")
        # How a frame is displayed. A linear window (the usual XA case) rides on each Frame in
        # raw units, so the models and overlays apply it exactly; what is not a linear window
        # (a VOI LUT table, a SIGMOID or LINEAR_EXACT function, a Modality LUT table) is applied
        # here by pydicom, and those frames carry the displayed values with no window.
        self.display_lut = _needs_display_lut(header, self.photometric)
        self.window = None if self.display_lut else _voi_window(
            header, path, self.bits_stored, self.photometric == "MONOCHROME1")

    def __iter__(self) -> Iterator[Frame]:
        from pydicom.pixels import iter_pixels

        try:
            for index, pixels in enumerate(iter_pixels(self.path, as_rgb=True)):
                yield self._frame(index, np.asarray(pixels))
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot decode its pixel data ({exc}); a compressed "
                             "transfer syntax may need a pydicom decoder plugin") from exc

    def _frame(self, index: int, pixels: np.ndarray) -> Frame:
        time_s = self._times[index] if self._times is not None else float(index)
        if pixels.ndim == 3:
            image = np.ascontiguousarray(pixels.astype(_dtype(self.bits_stored), copy=False))
            return Frame(index, time_s, image, "rgb", min(self.bits_stored, 16))
        if self.display_lut:
            pixels = _displayed(pixels, self.header, self.bits_stored)
        image = pixels.astype(_dtype(self.bits_stored), copy=False)
        if self.photometric == "MONOCHROME1":  # 0 is white: invert so higher is brighter
            image = (np.uint32((1 << self.bits_stored) - 1) - image).astype(image.dtype)
        return Frame(index, time_s, image, "gray", self.bits_stored, self.window)


def _number_of_frames(header, path: Path) -> int:
    """NumberOfFrames (1 when the attribute is absent, as for a single-frame image)."""
    if "NumberOfFrames" not in header or header.NumberOfFrames in (None, ""):
        return 1
    try:
        frames = int(header.NumberOfFrames)
    except (TypeError, ValueError):
        raise InputError(f"{path}: NumberOfFrames {header.NumberOfFrames!r} is not a "
                         "number") from None
    if frames < 1:
        raise InputError(f"{path}: NumberOfFrames is {frames}: the file says it holds no "
                         "frames (a damaged or hand-edited header)")
    return frames


def _check_pixel_module(header, path: Path, frames: int) -> None:
    """Refuse, at open, what would fail or mislead mid-stream: no pixel data, a frame too
    large, samples that contradict the photometric interpretation, a palette without its
    lookup table, and uncompressed pixel data shorter than its frames."""
    if "PixelData" not in header:
        raise InputError(f"{path}: no PixelData (a DICOM object without an image, e.g. a "
                         "report or a presentation state)")
    rows, columns = int(header.Rows), int(header.Columns)
    check_frame_size(rows, columns, str(path))
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    photometric = str(header.PhotometricInterpretation)
    expected_samples = 3 if photometric.startswith(("RGB", "YBR")) else 1
    if samples != expected_samples:
        raise InputError(f"{path}: SamplesPerPixel {samples} contradicts "
                         f"PhotometricInterpretation {photometric}")
    if photometric == "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" not in header:
        raise InputError(f"{path}: PALETTE COLOR without its colour lookup tables")
    if not header.file_meta.TransferSyntaxUID.is_compressed:
        expected = rows * columns * samples * (int(header.BitsAllocated) // 8) * frames
        raw = header.get_item("PixelData")  # deferred when large: its length, unread
        held = len(raw.value) if raw.value is not None else raw.length
        if held < expected:
            raise InputError(f"{path}: truncated: the pixel data holds {held} bytes, "
                             f"{frames} frames of {columns}x{rows}x{samples} need {expected}")


def _needs_display_lut(header, photometric: str) -> bool:
    """Whether the grayscale display is more than one linear window over the raw values."""
    if not photometric.startswith("MONOCHROME"):
        return False
    function = str(header.get("VOILUTFunction", "LINEAR")).upper()
    return ("VOILUTSequence" in header or "ModalityLUTSequence" in header
            or function not in ("", "LINEAR"))


def _displayed(pixels: np.ndarray, header, bits: int) -> np.ndarray:
    """pydicom's Modality LUT, then its first VOI LUT or window, rounded into 0..2**bits - 1
    (pydicom's output range for the window functions)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(pixels, header), header, index=0)
    return np.clip(np.rint(values), 0, (1 << bits) - 1)


def _voi_window(header, path: Path, bits: int, inverted: bool) -> tuple[float, float] | None:
    """The first VOI window (WindowCenter, WindowWidth) of a grayscale image, in the raw values
    the frames carry: a window is in modality units, so a Rescale Slope/Intercept is undone
    (center_raw = (center - intercept) / slope), and MONOCHROME1 frames are inverted, so is the
    center. None without one."""
    if "WindowCenter" not in header or "WindowWidth" not in header:
        return None
    from pydicom.multival import MultiValue

    try:  # several windows (MultiValue): the first is the default view
        center, width = (float(v[0]) if isinstance(v, MultiValue) else float(v)
                         for v in (header.WindowCenter, header.WindowWidth))
    except (TypeError, ValueError, IndexError) as exc:
        raise InputError(f"{path}: unreadable WindowCenter/WindowWidth ({exc})") from exc
    if not window_ok((center, width)):
        raise InputError(f"{path}: WindowCenter/WindowWidth ({center}, {width}) is not a "
                         "finite window with a positive width")
    try:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable RescaleSlope/RescaleIntercept ({exc})") from None
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope > 0):
        raise InputError(f"{path}: RescaleSlope {slope} / RescaleIntercept {intercept}: expected "
                         "a finite positive slope")
    center, width = (center - intercept) / slope, width / slope
    if inverted:
        center = (1 << bits) - 1 - center
    return center, width


def _dtype(bits: int) -> type:
    return np.uint8 if bits <= 8 else np.uint16


def _frame_times(header, frames: int) -> list[float] | None:
    """Seconds from the first frame, or None when the header states no timing."""
    vector = header.get("FrameTimeVector")
    if vector is not None and len(vector) == frames:
        # FrameTimeVector holds the increment before each frame (the first is 0), in ms
        return list(np.cumsum([float(v) for v in vector]) / 1000.0)
    if header.get("FrameTime"):
        return [k * float(header.FrameTime) / 1000.0 for k in range(frames)]
    if header.get("CineRate"):
        return [k / float(header.CineRate) for k in range(frames)]
    return None

"""Frozen value types shared by the layers: tensor specs, frames, regions and results."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError

# A dimension is a fixed size (int) or symbolic: a name ("num_frames") or None (unnamed).
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a graph.

    Attributes:
        name: The tensor name in the graph.
        shape: One entry per axis: an int for a fixed size, a str or None for a dynamic one.
        dtype: NumPy dtype name ("float32", "float16", "int64", "bool", ...).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        try:
            canonical = np.dtype(self.dtype).name
        except TypeError as exc:
            raise InputError(f"tensor {self.name!r}: dtype {self.dtype!r} is not a NumPy dtype "
                             "name (e.g. 'float32')") from exc
        object.__setattr__(self, "dtype", canonical)
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if not (dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim >= 0)):
                raise InputError(f"tensor {self.name!r}: dimension {dim!r} must be a size >= 0, a "
                                 "name or None")

    @property
    def is_static(self) -> bool:
        """Whether every dimension is a fixed size."""
        return all(isinstance(dim, int) for dim in self.shape)

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a concrete `shape` fits this spec (same rank, fixed dims equal)."""
        if len(shape) != len(self.shape):
            return False
        return all(not isinstance(want, int) or want == got for want, got in zip(
            self.shape, shape, strict=True))

    def to_dict(self) -> dict[str, object]:
        """The JSON form used in bundle manifests."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TensorSpec:
        """Inverse of `to_dict`."""
        missing = {"name", "shape", "dtype"} - set(data)
        if missing:
            raise InputError(f"tensor spec {dict(data)!r} lacks {sorted(missing)}")
        return cls(str(data["name"]), tuple(data["shape"]), str(data["dtype"]))  # type: ignore[arg-type]


def format_shape(shape: Sequence[Dim]) -> str:
    """`(1, 3, 'h', ?)`: symbolic dims by name, unnamed ones as `?`."""
    return "(" + ", ".join("?" if d is None else repr(d) if isinstance(d, str) else str(d)
                           for d in shape) + ")"


# Largest frame side the runtime takes (8K UHD is 7680 x 4320): a larger source is refused when
# it is opened, before any frame is decoded (a 20000-pixel square would need 4-6 GB on the way).
MAX_FRAME_SIDE = 8192


def check_frame_size(height: int, width: int, what: str) -> None:
    """InputError unless a (height, width) frame fits 1..MAX_FRAME_SIDE on both sides."""
    if not (1 <= height <= MAX_FRAME_SIDE and 1 <= width <= MAX_FRAME_SIDE):
        raise InputError(f"{what}: {width}x{height} frames; rau-rt takes frames of 1 to "
                         f"{MAX_FRAME_SIDE} pixels a side (downscale the source first)")


def window_ok(window: object) -> bool:
    """Whether `window` is a finite VOI window (center, width > 0)."""
    try:
        center, width = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    return math.isfinite(center) and math.isfinite(width) and width > 0


# Longest region name: a DICOM SEG SegmentLabel is an LO value (64 characters).
MAX_REGION_NAME = 64


def check_region_name(name: object) -> str:
    """`name` if it can label a region everywhere it goes (the VLM prompt, a DICOM SEG segment
    label, file names through `io.sinks.region_file_name`), else InputError saying why."""
    if not isinstance(name, str):
        raise InputError(f"region name {name!r}: expected a string, got {type(name).__name__}")
    if not name.strip():
        raise InputError(f"region name {name!r}: empty")
    if len(name) > MAX_REGION_NAME:
        raise InputError(f"region name {name[:20]!r}... ({len(name)} characters): at most "
                         f"{MAX_REGION_NAME} (a DICOM SEG segment label is 64)")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"region name {name!r}: holds a control character (NUL, newline, ...)")
    if "\\" in name:
        raise InputError(f"region name {name!r}: a backslash separates DICOM values; use "
                         "another character")
    return name


# Channel orders a frame can have; ops.preprocess takes "bgr"/"rgb" and ignores it for gray.
CHANNEL_ORDERS = ("gray", "bgr", "rgb")


@dataclass(frozen=True)
class Frame:
    """One input frame as a source delivers it.

    Attributes:
        index: 0-based position in the source.
        timestamp_s: presentation time in seconds from the source's clock: the file's
            timestamps, DICOM frame times, or the capture clock (time.monotonic) for live feeds.
        image: uint8 or uint16, (H, W) for gray or (H, W, 3) in `channel_order`.
        channel_order: "gray", "bgr" or "rgb".
        bits_stored: significant bits per sample (8, 12 for X-ray, 16); what
            ops.preprocess's `bits_stored` takes.
        window: the VOI window (center, width) in raw values the source says the frame is
            viewed with (DICOM WindowCenter/WindowWidth); the models' preprocessing and the
            overlays apply it. None: the full `bits_stored` range.
    """

    index: int
    timestamp_s: float
    image: np.ndarray
    channel_order: str
    bits_stored: int
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, np.ndarray):
            raise InputError(f"frame {self.index}: image must be a numpy.ndarray, got "
                             f"{type(self.image).__name__}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise InputError(f"frame {self.index}: channel_order must be one of "
                             f"{CHANNEL_ORDERS}, got {self.channel_order!r}")
        expected_ndim = 2 if self.channel_order == "gray" else 3
        if self.image.ndim != expected_ndim or (expected_ndim == 3 and self.image.shape[2] != 3):
            raise InputError(f"frame {self.index}: a {self.channel_order} image must be "
                             f"{'(H, W)' if expected_ndim == 2 else '(H, W, 3)'}, got "
                             f"{self.image.shape}")
        if self.image.dtype not in (np.uint8, np.uint16):
            raise InputError(f"frame {self.index}: expected uint8 or uint16, got "
                             f"{self.image.dtype}")
        check_frame_size(*self.image.shape[:2], f"frame {self.index}")
        if not 1 <= self.bits_stored <= 8 * self.image.dtype.itemsize:
            raise InputError(f"frame {self.index}: bits_stored {self.bits_stored} does not fit "
                             f"{self.image.dtype}")
        if self.window is not None and not window_ok(self.window):
            raise InputError(f"frame {self.index}: window must be finite (center, width > 0), "
                             f"got {self.window}")
        # sinks, the overlay and the localizer's worker share this frame: a read-only view
        # (no copy) makes any in-place drawing fail loudly instead of reaching the others
        view = self.image.view()
        view.flags.writeable = False
        object.__setattr__(self, "image", view)


Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels, x2/y2 exclusive (geometry.py)


@dataclass(frozen=True)
class Region:
    """A named region marked on a reference image: a box and/or a polygon and/or a mask.

    Attributes:
        name: the region's name (for coronaries, ARCADE's segment name such as "6").
        box: (x1, y1, x2, y2) pixels, x2/y2 exclusive.
        polygon: ((x, y), ...) pixel vertices.
        mask: (H, W) bool mask of the reference image.
    """

    name: str
    box: Box | None = None
    polygon: tuple[tuple[float, float], ...] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_region_name(self.name)
        if self.box is None and self.polygon is None and self.mask is None:
            raise InputError(f"region {self.name!r}: needs a box, a polygon or a mask")


# Where a region's current result comes from: a VLM box this frame, SAM2 tracking, a user prompt.
RESULT_SOURCES = ("vlm", "track", "user")


@dataclass(frozen=True)
class RegionResult:
    """One region in one frame.

    Attributes:
        present: whether the region is visible; an absent region has no mask and no box.
        mask: (H, W) bool in frame pixels, None when absent.
        box: (x1, y1, x2, y2) frame pixels, x2/y2 exclusive, None when absent.
        score: confidence in [0, 1] (mean mask probability).
        source: "vlm", "track" or "user".
    """

    present: bool
    mask: np.ndarray | None
    box: Box | None
    score: float
    source: str

    def __post_init__(self) -> None:
        if self.source not in RESULT_SOURCES:
            raise InputError(f"source must be one of {RESULT_SOURCES}, got {self.source!r}")
        if not self.present and (self.mask is not None or self.box is not None):
            raise InputError("an absent region carries no mask and no box")


@dataclass(frozen=True)
class FrameResult:
    """Everything rau-rt returns for one frame.

    Attributes:
        index, timestamp_s: the frame's, as its source delivered it.
        frame_size: (height, width) of the frame.
        regions: region name -> RegionResult.
        stage_ms: per-stage wall time (preprocess, encoder, memory attention, decoder, memory
            encoder, postprocess, ...).
        latency_ms: end to end, from the frame's arrival to this result.
        vlm_staleness: frames between the frame the latest VLM boxes were computed on and this
            one; None before the first VLM result.
    """

    index: int
    timestamp_s: float
    frame_size: tuple[int, int]
    regions: Mapping[str, RegionResult]
    stage_ms: Mapping[str, float]
    latency_ms: float
    vlm_staleness: int | None = None

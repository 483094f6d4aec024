"""Pre/post-processing ops: the only importer of `rau_rt._native`.

Each op has a NumPy reference (`*_reference`), used when the extension is absent and as the test
oracle. `RAU_RT_NATIVE=0` forces the reference path; `RAU_RT_STRICT_NATIVE=1` makes a missing
extension an error instead of a fallback. Native kernels run on `num_threads()` OpenMP threads:
`RAU_RT_THREADS`, or `set_num_threads`, or the number of physical cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import numpy as np

from rau_rt.errors import InputError, NativeUnavailableError

# SAM2's normalization (sam2/utils/misc.py: img_mean, img_std), the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MAX_VALUE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
_CHANNEL_ORDERS = ("rgb", "bgr")


@cache
def _load_native() -> ModuleType | None:
    if os.environ.get("RAU_RT_NATIVE", "1") == "0":
        return None
    try:
        from rau_rt import _native
    except ImportError as exc:
        if os.environ.get("RAU_RT_STRICT_NATIVE") == "1":
            raise NativeUnavailableError(
                f"RAU_RT_STRICT_NATIVE=1 but rau_rt._native does not import ({exc}); "
                "reinstall with a C++17 compiler: pip install -e ."
            ) from exc
        return None
    return _native


def native_available() -> bool:
    """Whether ops run the compiled kernels (False: the NumPy reference path)."""
    return _load_native() is not None


def native_info() -> dict[str, object]:
    """What the extension is: built or not, OpenMP or not, and the thread count ops will use."""
    native = _load_native()
    if native is None:
        return {"built": False, "openmp": False, "threads": 1, "path": None}
    return {
        "built": True,
        "openmp": bool(native.has_openmp()),
        "threads": num_threads() if native.has_openmp() else 1,
        "path": native.__file__,
    }


def physical_cores() -> int:
    """Physical cores available to this process (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


_threads: int | None = None


def set_num_threads(threads: int | None) -> None:
    """Threads for native kernels; None restores the default (RAU_RT_THREADS or physical cores)."""
    global _threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InputError(f"threads: expected an integer >= 1 or None, got {threads!r}")
    _threads = threads


def num_threads() -> int:
    """Threads the native kernels use on the next call."""
    if _threads is not None:
        return _threads
    env = os.environ.get("RAU_RT_THREADS")
    if env is None or env == "":
        return physical_cores()
    try:
        value = int(env)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"RAU_RT_THREADS: expected an integer >= 1, got {env!r}")
    return value


@dataclass(frozen=True)
class _PreprocessPlan:
    source_channel: tuple[int, int, int]
    value_scale: float
    value_offset: float
    clamp: bool
    plane_scale: tuple[float, float, float]
    plane_offset: tuple[float, float, float]


def _check_image(image: object, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy.ndarray, got {type(image).__name__}")
    if image.dtype not in _MAX_VALUE:
        raise InputError(f"{name}: expected dtype uint8 or uint16, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise InputError(f"{name}: expected shape (H, W) or (H, W, C), got {image.shape}")
    if image.ndim == 3 and image.shape[2] not in (1, 3):
        raise InputError(f"{name}: expected 1 or 3 channels, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{name}: expected a non-empty image, got shape {image.shape}")
    return image


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise InputError(f"{name}: expected 3 values (one per output plane), got {len(vals)}")
    return vals  # type: ignore[return-value]


def _plan(
    image: np.ndarray,
    channel_order: str,
    mean: Sequence[float],
    std: Sequence[float],
    window: tuple[float, float] | None,
    bits_stored: int | None,
) -> _PreprocessPlan:
    if channel_order not in _CHANNEL_ORDERS:
        raise InputError(f"channel_order: expected one of {_CHANNEL_ORDERS}, got {channel_order!r}")
    mean3, std3 = _triple(mean, "mean"), _triple(std, "std")
    if any(s <= 0 for s in std3):
        raise InputError(f"std: expected positive values, got {std3}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        source = (0, 0, 0)
    else:
        source = (2, 1, 0) if channel_order == "bgr" else (0, 1, 2)

    if window is not None:
        # (center, width) as in DICOM WindowCenter/WindowWidth: [c - w/2, c + w/2] -> [0, 1]
        center, width = (float(v) for v in window)
        if width <= 0:
            raise InputError(f"window: expected (center, width) with width > 0, got {window}")
        value_scale, value_offset, clamp = 1.0 / width, 0.5 - center / width, True
    else:
        if bits_stored is None:
            max_value = _MAX_VALUE[image.dtype]
        else:
            limit = 8 * image.dtype.itemsize
            if not 1 <= bits_stored <= limit:
                raise InputError(
                    f"bits_stored: expected 1..{limit} for {image.dtype}, got {bits_stored}")
            max_value = (1 << bits_stored) - 1
        value_scale, value_offset, clamp = 1.0 / max_value, 0.0, False
    return _PreprocessPlan(
        source_channel=source,
        value_scale=value_scale,
        value_offset=value_offset,
        clamp=clamp,
        plane_scale=tuple(1.0 / s for s in std3),  # type: ignore[arg-type]
        plane_offset=tuple(-m / s for m, s in zip(mean3, std3, strict=True)),  # type: ignore[arg-type]
    )


def _output(out: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if out is None:
        return np.empty((3, height, width), dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        got = getattr(out, "dtype", type(out).__name__)
        raise InputError(f"out: expected a float32 numpy.ndarray, got {got}")
    if out.shape != (3, height, width):
        raise InputError(f"out: expected shape {(3, height, width)}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InputError("out: expected a C-contiguous, writeable array")
    return out


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size: expected (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"size: expected positive (height, width), got {size!r}")
    return height, width


def preprocess(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    channel_order: str = "bgr",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    window: tuple[float, float] | None = None,
    bits_stored: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Frame -> normalized float32 (3, H, W) model input, in one fused pass.

    Args:
        image: uint8 or uint16 array, (H, W) gray or (H, W, C) with C in {1, 3}; any strides.
        size: output (height, width). The image is stretched (no letterbox), like SAM2's video
            predictor.
        channel_order: order of a 3-channel input ("bgr" from OpenCV, "rgb"); output planes are
            always RGB. Gray input is replicated into the three planes.
        mean, std: per-plane normalization of values in [0, 1].
        window: optional (center, width) in raw units (DICOM VOI window): maps [c - w/2, c + w/2]
            to [0, 1] and clips. Without it values are divided by the dtype's maximum, or by
            2**bits_stored - 1 when `bits_stored` is given (12 for 12-bit X-ray).
        out: optional C-contiguous float32 (3, H, W) buffer written in place (e.g. an engine's
            input binding); no allocation then.

    Resampling is bilinear with half-pixel centres (align_corners=False), no antialiasing, and
    happens on raw values before the window: F.interpolate(mode="bilinear", align_corners=False).

    Returns:
        `out`, or a new array when `out` is None.
    """
    image = _check_image(image, "image")
    height, width = _check_size(size)
    plan = _plan(image, channel_order, mean, std, window, bits_stored)
    result = _output(out, (height, width))
    native = _load_native()
    if native is None:
        result[...] = _preprocess_numpy(image, (height, width), plan)
        return result
    native.preprocess(
        image,
        result,
        plan.source_channel,
        plan.value_scale,
        plan.value_offset,
        plan.clamp,
        plan.plane_scale,
        plan.plane_offset,
        num_threads(),
    )
    return result


def preprocess_reference(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    channel_order: str = "bgr",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    window: tuple[float, float] | None = None,
    bits_stored: int | None = None,
) -> np.ndarray:
    """NumPy reference of `preprocess` (same arguments, always allocates): the test oracle."""
    image = _check_image(image, "image")
    height, width = _check_size(size)
    plan = _plan(image, channel_order, mean, std, window, bits_stored)
    return _preprocess_numpy(image, (height, width), plan)


def _source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # torch area_pixel_compute_source_index(align_corners=False): src = (dst + 0.5) * scale - 0.5
    scale = in_size / out_size
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def _preprocess_numpy(
    image: np.ndarray, size: tuple[int, int], plan: _PreprocessPlan
) -> np.ndarray:
    height, width = size
    pixels = image if image.ndim == 3 else image[:, :, None]
    x0, x1, fx = _source_taps(pixels.shape[1], width)
    y0, y1, fy = _source_taps(pixels.shape[0], height)
    fx, fy = fx[None, :], fy[:, None]
    out = np.empty((3, height, width), dtype=np.float32)
    for k, channel in enumerate(plan.source_channel):
        plane = pixels[:, :, channel]
        rows0, rows1 = plane[y0], plane[y1]
        p00, p01 = rows0[:, x0].astype(np.float32), rows0[:, x1].astype(np.float32)
        p10, p11 = rows1[:, x0].astype(np.float32), rows1[:, x1].astype(np.float32)
        top = p00 + fx * (p01 - p00)
        bottom = p10 + fx * (p11 - p10)
        value = top + fy * (bottom - top)
        x = value * np.float32(plan.value_scale) + np.float32(plan.value_offset)
        if plan.clamp:
            x = np.clip(x, np.float32(0.0), np.float32(1.0))
        out[k] = x * np.float32(plan.plane_scale[k]) + np.float32(plan.plane_offset[k])
    return out

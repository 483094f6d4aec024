"""Frame pre-processing: to SAM2's input (`preprocess`) and to the VLM's (`resize_for_vlm`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError
from rau_rt.ops._bilinear import resize_plane
from rau_rt.ops._checks import check_size, output_buffer
from rau_rt.ops.runtime import load_native, num_threads
from rau_rt.types import window_ok

# SAM2's normalization (sam2/utils/misc.py: img_mean, img_std), the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Qwen2-VL/2.5-VL image processor normalization (transformers OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2.5-VL smart resize: patch 14 x spatial merge 2 = 28 px per visual token side; pixel bounds
# of its image processor (min 56*56, max 28*28*1280 = 1280 visual tokens).
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
# transformers' smart_resize refuses aspect ratios above this.
MAX_ASPECT_RATIO = 200

_MAX_VALUE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
_CHANNEL_ORDERS = ("rgb", "bgr")


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
        if not window_ok(window):
            raise InputError(f"window: expected finite (center, width) with width > 0, got "
                             f"{window}")
        center, width = (float(v) for v in window)
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
    height, width = check_size(size, "size")
    plan = _plan(image, channel_order, mean, std, window, bits_stored)
    result = output_buffer(out, (3, height, width), np.float32)
    native = load_native()
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
    height, width = check_size(size, "size")
    plan = _plan(image, channel_order, mean, std, window, bits_stored)
    return _preprocess_numpy(image, (height, width), plan)


def _preprocess_numpy(
    image: np.ndarray, size: tuple[int, int], plan: _PreprocessPlan
) -> np.ndarray:
    pixels = image if image.ndim == 3 else image[:, :, None]
    out = np.empty((3, *size), dtype=np.float32)
    for k, channel in enumerate(plan.source_channel):
        value = resize_plane(pixels[:, :, channel], size)
        x = value * np.float32(plan.value_scale) + np.float32(plan.value_offset)
        if plan.clamp:
            x = np.clip(x, np.float32(0.0), np.float32(1.0))
        out[k] = x * np.float32(plan.plane_scale[k]) + np.float32(plan.plane_offset[k])
    return out


@dataclass(frozen=True)
class VlmImage:
    """A frame resized and normalized for the VLM.

    `size` is the model-input (height, width), the space of Qwen2.5-VL's absolute-pixel boxes;
    `source_size` is the frame's (height, width). rau_rt.geometry converts between them.
    """

    pixels: np.ndarray
    size: tuple[int, int]
    source_size: tuple[int, int]


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2.5-VL's smart resize: sides multiples of `factor`, area in [min_pixels, max_pixels].

    Follows transformers' `smart_resize` (Qwen2-VL image processor), except that a side shorter
    than `factor` is rounded up to `factor` instead of raising.
    """
    if height < 1 or width < 1:
        raise InputError(f"smart_resize: expected positive height and width, got {height}x{width}")
    if factor < 1 or min_pixels < 1 or max_pixels < min_pixels:
        raise InputError(
            f"smart_resize: expected factor >= 1 and 1 <= min_pixels <= max_pixels, got "
            f"factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f}"
                         f" exceeds {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_for_vlm(
    image: np.ndarray,
    *,
    size: tuple[int, int] | None = None,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    channel_order: str = "bgr",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    window: tuple[float, float] | None = None,
    bits_stored: int | None = None,
    out: np.ndarray | None = None,
) -> VlmImage:
    """Frame -> VLM input: smart-resized (or to a fixed `size`) and normalized, in one pass.

    Args:
        image: as `preprocess`.
        size: a fixed model-input (height, width), e.g. the grid an exported vision graph was
            built for; both sides must be multiples of `factor`. None: `smart_resize`.
        factor, min_pixels, max_pixels: smart-resize parameters (Qwen2.5-VL's by default;
            Qwen3-VL uses factor 32).
        channel_order, mean, std, window, bits_stored, out: as `preprocess`.

    Resampling is bilinear like `preprocess`; Qwen's image processor resizes bicubically, so
    pixel values differ slightly from transformers' (the box geometry does not).
    """
    image = _check_image(image, "image")
    source = (int(image.shape[0]), int(image.shape[1]))
    if size is None:
        target = smart_resize(*source, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    else:
        target = check_size(size, "size")
        if target[0] % factor or target[1] % factor:
            raise InputError(f"size: expected multiples of {factor} (patch x merge), got {size}")
    pixels = preprocess(image, target, channel_order=channel_order, mean=mean, std=std,
                        window=window, bits_stored=bits_stored, out=out)
    return VlmImage(pixels=pixels, size=target, source_size=source)

"""Mask post-processing: SAM2 low-res logits -> frame-size masks, boxes, areas, scores; overlay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.geometry import box_from_mask
from rau_rt.ops._bilinear import resize_plane
from rau_rt.ops._checks import check_size, output_buffer
from rau_rt.ops.runtime import load_native, num_threads

Box = tuple[int, int, int, int]

# Value written over a filled hole / removed sprinkle, relative to the threshold: sam2's video
# predictor writes 0.1 into holes (fill_holes_in_mask_scores, threshold 0).
HOLE_MARGIN = 0.1

# BGR colours for overlays (Okabe-Ito, distinguishable with common colour-vision deficiencies).
PALETTE = ((0, 159, 230), (233, 180, 86), (115, 158, 0), (66, 228, 240), (178, 114, 0),
           (0, 94, 213), (167, 121, 204), (0, 0, 0))


@dataclass(frozen=True)
class MaskSet:
    """Post-processed masks of N regions.

    masks: (N, H, W) uint8, 1 inside. boxes: x1, y1, x2, y2 in frame pixels with exclusive x2/y2
    (the continuous extent of the mask), None for an empty mask. areas: (N,) pixel counts.
    scores: (N,) mean sigmoid(logit) over each mask's pixels, 0 for an empty mask.
    """

    masks: np.ndarray
    boxes: list[Box | None]
    areas: np.ndarray
    scores: np.ndarray


def _check_logits(logits: object) -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        raise InputError(f"logits: expected a numpy.ndarray, got {type(logits).__name__}")
    if logits.dtype != np.float32:
        raise InputError(f"logits: expected dtype float32, got {logits.dtype}")
    if logits.ndim == 4 and logits.shape[1] == 1:  # SAM2's (N, 1, h, w)
        logits = logits[:, 0]
    if logits.ndim != 3 or logits.shape[1] < 1 or logits.shape[2] < 1:
        raise InputError(f"logits: expected shape (N, h, w) or (N, 1, h, w), got {logits.shape}")
    return logits


def _check_area(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InputError(f"{name}: expected an integer >= 0, got {value!r}")
    return int(value)


def fill_holes(
    logits: np.ndarray,
    max_hole_area: int,
    max_sprinkle_area: int = 0,
    *,
    threshold: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """SAM2's hole filling (and sprinkle removal) on low-res mask logits, 8-connectivity.

    Background components (logit <= threshold) of at most `max_hole_area` pixels become
    threshold + 0.1; then foreground components of at most `max_sprinkle_area` pixels become
    threshold - 0.1. sam2's video predictor runs this with max_hole_area=8 (fill_hole_area)
    before upsampling and before the memory encoder.

    Args:
        logits: float32 (N, h, w) or (N, 1, h, w), any strides.
        out: optional C-contiguous float32 (N, h, w) buffer; may be `logits` itself.

    Returns:
        `out`, or a new (N, h, w) array.
    """
    logits = _check_logits(logits)
    holes = _check_area(max_hole_area, "max_hole_area")
    sprinkles = _check_area(max_sprinkle_area, "max_sprinkle_area")
    shared = out is not None and np.may_share_memory(out, logits)
    out = output_buffer(out, logits.shape, np.float32)
    if shared and not (
            logits.flags.c_contiguous and out.ctypes.data == logits.ctypes.data):
        raise InputError("out: overlaps logits with a different layout; pass logits itself or a "
                         "separate buffer")
    native = load_native()
    if native is None:
        out[...] = _fill_holes_numpy(logits, holes, sprinkles, float(threshold))
    else:
        native.fill_holes(logits, out, float(threshold), holes, sprinkles, num_threads())
    return out


def fill_holes_reference(
    logits: np.ndarray, max_hole_area: int, max_sprinkle_area: int = 0, *, threshold: float = 0.0
) -> np.ndarray:
    """NumPy/OpenCV reference of `fill_holes` (always allocates): the test oracle."""
    logits = _check_logits(logits)
    return _fill_holes_numpy(logits, _check_area(max_hole_area, "max_hole_area"),
                             _check_area(max_sprinkle_area, "max_sprinkle_area"), float(threshold))


def _replace_small_components(plane: np.ndarray, members: np.ndarray, max_area: int,
                              value: float) -> None:
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        members.astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] <= max_area) + 1
    if small.size:
        plane[np.isin(labels, small)] = np.float32(value)


def _fill_holes_numpy(logits: np.ndarray, holes: int, sprinkles: int,
                      threshold: float) -> np.ndarray:
    out = np.array(logits, dtype=np.float32, order="C", copy=True)
    thr = np.float32(threshold)
    for plane in out:
        if holes > 0:
            _replace_small_components(plane, plane <= thr, holes, threshold + HOLE_MARGIN)
        if sprinkles > 0:
            _replace_small_components(plane, plane > thr, sprinkles, threshold - HOLE_MARGIN)
    return out


def postprocess_masks(
    logits: np.ndarray,
    frame_size: tuple[int, int],
    *,
    threshold: float = 0.0,
    max_hole_area: int = 0,
    max_sprinkle_area: int = 0,
    out: np.ndarray | None = None,
) -> MaskSet:
    """Low-res mask logits -> frame-size binary masks with box, area and score, in one pass.

    Bilinear upsampling with half-pixel centres (F.interpolate(align_corners=False), as sam2
    does for the video's resolution), then `logit > threshold`. With `max_hole_area` or
    `max_sprinkle_area`, `fill_holes` runs on the low-res logits first (as in sam2).

    Args:
        logits: float32 (N, h, w) or (N, 1, h, w), e.g. N regions x 256 x 256 for a 1024 input.
        frame_size: the frame's (height, width).
        out: optional C-contiguous uint8 (N, height, width) buffer for the masks.
    """
    logits = _check_logits(logits)
    height, width = check_size(frame_size, "frame_size")
    regions = logits.shape[0]
    out = output_buffer(out, (regions, height, width), np.uint8)
    if max_hole_area or max_sprinkle_area:
        logits = fill_holes(logits, max_hole_area, max_sprinkle_area, threshold=threshold)
    native = load_native()
    if native is None:
        return _postprocess_numpy(logits, (height, width), float(threshold), out)
    boxes = np.empty((regions, 4), dtype=np.int64)
    areas = np.empty(regions, dtype=np.int64)
    sums = np.empty(regions, dtype=np.float64)
    native.postprocess_masks(logits, out, boxes, areas, sums, float(threshold), num_threads())
    return MaskSet(
        masks=out,
        boxes=[tuple(int(v) for v in box) if area else None
               for box, area in zip(boxes, areas, strict=True)],
        areas=areas,
        scores=np.divide(sums, areas, out=np.zeros_like(sums), where=areas > 0),
    )


def postprocess_masks_reference(
    logits: np.ndarray,
    frame_size: tuple[int, int],
    *,
    threshold: float = 0.0,
    max_hole_area: int = 0,
    max_sprinkle_area: int = 0,
) -> MaskSet:
    """NumPy reference of `postprocess_masks` (always allocates): the test oracle."""
    logits = _check_logits(logits)
    size = check_size(frame_size, "frame_size")
    if max_hole_area or max_sprinkle_area:
        logits = fill_holes_reference(logits, max_hole_area, max_sprinkle_area,
                                      threshold=threshold)
    out = np.empty((logits.shape[0], *size), dtype=np.uint8)
    return _postprocess_numpy(logits, size, float(threshold), out)


def _postprocess_numpy(logits: np.ndarray, size: tuple[int, int], threshold: float,
                       out: np.ndarray) -> MaskSet:
    boxes: list[Box | None] = []
    areas = np.zeros(logits.shape[0], dtype=np.int64)
    scores = np.zeros(logits.shape[0], dtype=np.float64)
    for n, plane in enumerate(logits):
        values = resize_plane(plane, size)
        inside = values > np.float32(threshold)
        out[n] = inside
        boxes.append(box_from_mask(inside))
        areas[n] = np.count_nonzero(inside)
        if areas[n]:
            with np.errstate(over="ignore"):  # exp overflow -> probability 0, as in C++
                scores[n] = np.mean(1.0 / (1.0 + np.exp(-values[inside].astype(np.float64))))
    return MaskSet(masks=out, boxes=boxes, areas=areas, scores=scores)


def _check_overlay(frame: object, masks: object, colors: object,
                   alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
            or frame.shape[2] != 3:
        raise InputError(f"frame: expected a uint8 (H, W, 3) array, got "
                         f"{getattr(frame, 'dtype', type(frame).__name__)} "
                         f"{getattr(frame, 'shape', '')}")
    if not isinstance(masks, np.ndarray) or masks.dtype not in (np.uint8, np.bool_) \
            or masks.ndim != 3 or masks.shape[1:] != frame.shape[:2]:
        raise InputError(f"masks: expected uint8/bool (N, {frame.shape[0]}, {frame.shape[1]}), "
                         f"got {getattr(masks, 'dtype', type(masks).__name__)} "
                         f"{getattr(masks, 'shape', '')}")
    palette = np.asarray(colors)
    if palette.shape != (masks.shape[0], 3) or not np.all((palette >= 0) & (palette <= 255)):
        raise InputError(f"colors: expected {masks.shape[0]} BGR triples in 0..255, got shape "
                         f"{palette.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha: expected a value in [0, 1], got {alpha}")
    masks_u8 = np.ascontiguousarray(masks).view(np.uint8)
    return frame, masks_u8, np.ascontiguousarray(palette, dtype=np.uint8)


def overlay(
    frame: np.ndarray,
    masks: np.ndarray,
    colors: Sequence[Sequence[int]] | np.ndarray | None = None,
    *,
    alpha: float = 0.45,
    boxes: Sequence[Box | None] | None = None,
    labels: Sequence[str] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Frame with masks blended in (native) and boxes/labels drawn (OpenCV).

    Args:
        frame: uint8 (H, W, 3), in the channel order of `colors` (BGR for OpenCV writers).
        masks: uint8 or bool (N, H, W); regions blend in order, later ones on top.
        colors: N colour triples; None takes `PALETTE` in order.
        boxes, labels: optional per-region boxes (x1, y1, x2, y2, exclusive) and names.
        out: optional C-contiguous uint8 (H, W, 3) buffer; may be `frame` itself (in place).
    """
    if colors is None:
        count = getattr(masks, "shape", (0,))[0]
        colors = [PALETTE[i % len(PALETTE)] for i in range(count)]
    frame, masks_u8, palette = _check_overlay(frame, masks, colors, float(alpha))
    if out is None:
        out = frame.copy(order="C")
    elif output_buffer(out, frame.shape, np.uint8) is not frame:
        out[...] = frame
    native = load_native()
    if native is None:
        _blend_numpy(out, masks_u8, palette, float(alpha))
    else:
        native.overlay(out, masks_u8, palette, float(alpha), num_threads())
    _draw_boxes(out, palette, boxes, labels)
    return out


def overlay_reference(frame: np.ndarray, masks: np.ndarray, colors: np.ndarray,
                      *, alpha: float = 0.45) -> np.ndarray:
    """NumPy reference of `overlay`'s blend (no boxes or labels): the test oracle."""
    frame, masks_u8, palette = _check_overlay(frame, masks, colors, float(alpha))
    out = frame.copy(order="C")
    _blend_numpy(out, masks_u8, palette, float(alpha))
    return out


def _blend_numpy(out: np.ndarray, masks: np.ndarray, palette: np.ndarray, alpha: float) -> None:
    a = np.float32(alpha)
    for mask, color in zip(masks, palette, strict=True):
        inside = mask != 0
        pixels = out[inside].astype(np.float32)
        blended = pixels + a * (color.astype(np.float32) - pixels)
        out[inside] = np.floor(blended + np.float32(0.5)).astype(np.uint8)


def _draw_boxes(out: np.ndarray, palette: np.ndarray, boxes: Sequence[Box | None] | None,
                labels: Sequence[str] | None) -> None:
    count = palette.shape[0]
    if boxes is not None and len(boxes) != count:
        raise InputError(f"boxes: expected {count} entries (one per mask), got {len(boxes)}")
    if labels is not None and len(labels) != count:
        raise InputError(f"labels: expected {count} entries (one per mask), got {len(labels)}")
    for n in range(count):
        color = tuple(int(c) for c in palette[n])
        box = boxes[n] if boxes is not None else None
        if box is not None:
            x1, y1, x2, y2 = (round(v) for v in box)
            cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, 2)
        if labels is not None and box is not None:
            cv2.putText(out, labels[n], (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        color, 1, cv2.LINE_AA)

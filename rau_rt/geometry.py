"""Coordinate conversions: the project's one place that turns one geometric form into another.

Boxes are (x1, y1, x2, y2) in frame pixels, x along columns and y along rows, with x2 and y2
exclusive: a box covering columns 3..7 has x1 = 3 and x2 = 8, so width = x2 - x1.
"""

from __future__ import annotations

import numpy as np

from rau_rt.errors import InputError


def box_from_mask(mask: np.ndarray, offset: tuple[int, int] = (0, 0),
                  ) -> tuple[int, int, int, int] | None:
    """The tightest box around a mask's nonzero pixels, or None when it has none.

    Args:
        mask: 2-D array; nonzero pixels belong to the object.
        offset: (x, y) of mask[0, 0] in the frame, for a mask cropped out of a frame.

    Returns:
        (x1, y1, x2, y2) with x2 = last column + 1 and y2 = last row + 1 (exclusive).
    """
    if mask.ndim != 2:
        raise InputError(f"mask: expected a 2-D array, got shape {mask.shape}")
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    x, y = offset
    return (int(cols[0]) + x, int(rows[0]) + y, int(cols[-1]) + 1 + x, int(rows[-1]) + 1 + y)


# How a VLM family writes box coordinates (rau_rt.vlm_layout.VlmFamily.box_convention):
# "absolute": pixels of the resized model input (Qwen2.5-VL); "relative_1000": 0..1000 of the
# model input on each axis (Qwen2-VL, Qwen3-VL).
BOX_CONVENTIONS = ("absolute", "relative_1000")
RELATIVE_RANGE = 1000


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise InputError(f"{name}: expected a positive (height, width), got {size}")
    return height, width


def vlm_extent(convention: str, model_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) that a coordinate spans in a convention: the input's pixels, or 1000."""
    if convention not in BOX_CONVENTIONS:
        raise InputError(f"box convention: expected one of {BOX_CONVENTIONS}, got {convention!r}")
    height, width = _check_size(model_size, "model_size")
    if convention == "absolute":
        return width, height
    return RELATIVE_RANGE, RELATIVE_RANGE


def box_vlm_to_frame(box: tuple[float, float, float, float], convention: str,
                     model_size: tuple[int, int], frame_size: tuple[int, int],
                     ) -> tuple[float, float, float, float]:
    """A box as the VLM wrote it -> frame pixels (floats; not clipped, not ordered).

    Args:
        box: (x1, y1, x2, y2) in `convention`.
        convention: "absolute" (pixels of the resized model input) or "relative_1000".
        model_size: (height, width) of the model input the frame was resized to.
        frame_size: (height, width) of the frame.
    """
    extent_w, extent_h = vlm_extent(convention, model_size)
    height, width = _check_size(frame_size, "frame_size")
    sx, sy = width / extent_w, height / extent_h
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_frame_to_vlm(box: tuple[float, float, float, float], convention: str,
                     model_size: tuple[int, int], frame_size: tuple[int, int],
                     ) -> tuple[int, int, int, int]:
    """Frame pixels -> the VLM's integer coordinates (rounded to nearest), as a prompt shows
    a reference box; the inverse of `box_vlm_to_frame` up to that rounding."""
    extent_w, extent_h = vlm_extent(convention, model_size)
    height, width = _check_size(frame_size, "frame_size")
    sx, sy = extent_w / width, extent_h / height
    x1, y1, x2, y2 = (float(v) for v in box)
    return round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)


def clip_box(box: tuple[float, float, float, float], frame_size: tuple[int, int],
             ) -> tuple[tuple[int, int, int, int] | None, str | None]:
    """Order a box's corners, round them to pixels and clip them to the frame.

    Returns:
        (box, None) for a usable box, or (None, reason) when it is not finite, lies wholly
        outside the frame, or has no width or height left after rounding and clipping.
    """
    height, width = _check_size(frame_size, "frame_size")
    values = [float(v) for v in box]
    if not all(np.isfinite(values)):
        return None, f"not finite: {tuple(values)}"
    x1, x2 = sorted(values[0::2])
    y1, y2 = sorted(values[1::2])
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, f"outside the {width}x{height} frame: {tuple(values)}"
    cx1, cx2 = (min(max(round(v), 0), width) for v in (x1, x2))
    cy1, cy2 = (min(max(round(v), 0), height) for v in (y1, y2))
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        return None, f"degenerate (no width or height in frame pixels): {tuple(values)}"
    return (cx1, cy1, cx2, cy2), None


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2, x2/y2 exclusive); 0 for boxes
    with no area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return 0.0 if union <= 0 else float(w * h / union)


def box_from_polygon(polygon: tuple[tuple[float, float], ...],
                     ) -> tuple[int, int, int, int] | None:
    """The smallest pixel box holding every vertex (x2/y2 exclusive), or None without vertices."""
    if not polygon:
        return None
    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x1, y1 = np.floor(points.min(axis=0))
    x2, y2 = np.floor(points.max(axis=0)) + 1
    return int(x1), int(y1), int(x2), int(y2)

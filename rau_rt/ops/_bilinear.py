"""NumPy bilinear resampling with the native kernels' exact arithmetic (the reference paths)."""

from __future__ import annotations

import numpy as np


def source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) per output index, half-pixel centres (align_corners=False), clamped.

    torch's area_pixel_compute_source_index: src = max((dst + 0.5) * in / out - 0.5, 0).
    """
    scale = in_size / out_size
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2-D plane to (height, width), computed in float32.

    Horizontal lerp of both source rows first, then the vertical lerp, as the native kernels.
    """
    height, width = size
    x0, x1, fx = source_taps(plane.shape[1], width)
    y0, y1, fy = source_taps(plane.shape[0], height)
    rows0, rows1 = plane[y0], plane[y1]
    p00, p01 = rows0[:, x0].astype(np.float32), rows0[:, x1].astype(np.float32)
    p10, p11 = rows1[:, x0].astype(np.float32), rows1[:, x1].astype(np.float32)
    top = p00 + fx[None, :] * (p01 - p00)
    bottom = p10 + fx[None, :] * (p11 - p10)
    return top + fy[:, None] * (bottom - top)

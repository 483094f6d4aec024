"""NumPy bilinear resampling with the native kernels' exact arithmetic (the reference paths)."""

from __future__ import annotations

import numpy as np


def source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) per output index, half-pixel centres (align_corners=False), clamped.

    As torch's CPU bilinear kernel: scale = in / out rounded to float32, then
    src = max(scale * (dst + 0.5) - 0.5, 0) with one rounding to float32 (a fused multiply-add
    there, double here). Matches F.interpolate's sampling positions exactly.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    hi = np.where(frac == 0, lo, np.minimum(lo + 1, in_size - 1))  # as the kernels: same values
    return lo, hi, frac


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


def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's antialiased bilinear resize.

    As F.interpolate(mode="bilinear", align_corners=False, antialias=True) on CPU: a triangle
    filter widened by the scale when shrinking (support = scale), each output's taps normalized
    to sum 1; when enlarging it is plain bilinear. sam2 resizes mask prompts this way.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) * inv))
        if w.sum() > 0:
            weights[i, lo:hi] = w / w.sum()
    return weights.astype(np.float32)


def resize_antialias(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) float32 -> (N, height, width) with `antialias_weights` (horizontal first)."""
    rows = antialias_weights(planes.shape[1], size[0])
    cols = antialias_weights(planes.shape[2], size[1])
    return (rows @ (planes.astype(np.float32, copy=False) @ cols.T)).astype(np.float32)

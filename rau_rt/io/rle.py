"""COCO run-length encoding of binary masks (uncompressed RLE, column-major), NumPy only.

`{"size": [height, width], "counts": [n0, n1, ...]}`: alternating runs of 0s and 1s over the
mask in Fortran (column-major) order, starting with a (possibly empty) run of 0s: the layout
pycocotools' `frPyObjects` accepts, so results load in COCO tools without conversion.
"""

from __future__ import annotations

import numpy as np

from rau_rt.errors import InputError


def encode(mask: np.ndarray) -> dict[str, object]:
    """RLE of a 2-D mask (non-zero = inside)."""
    if mask.ndim != 2:
        raise InputError(f"mask: expected a 2-D array, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # runs start with 0s
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode(rle: dict[str, object]) -> np.ndarray:
    """The (height, width) bool mask of an RLE made by `encode` (or by COCO tools)."""
    try:
        height, width = (int(v) for v in rle["size"])  # type: ignore[union-attr]
        counts = np.asarray(rle["counts"], dtype=np.int64)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"rle: expected {{'size': [h, w], 'counts': [...]}}, got {rle!r}") \
            from exc
    if counts.sum() != height * width or (counts < 0).any():
        raise InputError(f"rle: counts sum to {int(counts.sum())}, expected {height * width}")
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")

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

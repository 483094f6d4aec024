"""Argument checks shared by the ops: sizes and caller-provided output buffers."""

from __future__ import annotations

import numpy as np

from rau_rt.errors import InputError


def check_size(size: object, name: str) -> tuple[int, int]:
    """A positive (height, width) pair."""
    try:
        height, width = (int(v) for v in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"{name}: expected positive (height, width), got {size!r}")
    return height, width


def output_buffer(out: object, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """`out` checked to be a writeable C-contiguous array of `shape` and `dtype`, or a new one."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if (not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape
            or not out.flags.c_contiguous or not out.flags.writeable):
        got = (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray)
               else type(out).__name__)
        raise InputError(f"out: expected a writeable C-contiguous {np.dtype(dtype).name} array "
                         f"of shape {shape}, got {got}")
    return out

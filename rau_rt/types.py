"""Frozen value types shared by the layers. For now: the spec of one named tensor."""

from __future__ import annotations

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

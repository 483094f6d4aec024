"""Annotated references and the bank that picks the one matching the current view.

A `Reference` is one annotated image (RAU's reference: an image of the same anatomy with named
regions). A C-arm moves between views during a procedure, so a site keeps several references
and `ReferenceBank.select` picks, per frame, the most similar one by cosine similarity of a
pooled image descriptor. The tracker already computes SAM2's image-encoder features per frame
(`vision_features` [1, D, h, w]); `pool_features` turns them into the descriptor, so selection
needs no model of its own (RAU uses DINOv2 features for this step). A hysteresis keeps the
choice from flipping between two similar views on every frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.geometry import box_from_mask, box_from_polygon
from rau_rt.types import Box, Region


@dataclass(frozen=True)
class Reference:
    """One annotated reference image.

    Attributes:
        image: uint8, (H, W) gray or (H, W, 3) in `channel_order`.
        regions: the annotated regions, each with a box, polygon or mask in image pixels.
        channel_order: "rgb" or "bgr" for a colour image (ignored for gray).
        name: what the bank and logs call it (e.g. the view, "LAO 40 CRA 25").
    """

    image: np.ndarray
    regions: tuple[Region, ...]
    channel_order: str = "rgb"
    name: str = "reference"

    def __post_init__(self) -> None:
        image = self.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
                image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputError(f"reference {self.name!r}: expected a uint8 (H, W) or (H, W, 3) "
                             f"image, got {getattr(image, 'dtype', type(image).__name__)} "
                             f"{getattr(image, 'shape', '')}; window 12/16-bit X-ray to 8 bits")
        if self.channel_order not in ("rgb", "bgr"):
            raise InputError(f"reference {self.name!r}: channel_order must be 'rgb' or 'bgr', "
                             f"got {self.channel_order!r}")
        if not self.regions:
            raise InputError(f"reference {self.name!r}: needs at least one annotated region")
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise InputError(f"reference {self.name!r}: region names must be unique, got {names}")
        object.__setattr__(self, "regions", tuple(self.regions))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    def rgb(self) -> np.ndarray:
        """The image as uint8 RGB (H, W, 3)."""
        if self.image.ndim == 2:
            return np.repeat(self.image[:, :, None], 3, axis=2)
        return self.image[:, :, ::-1].copy() if self.channel_order == "bgr" else self.image

    def box(self, region: Region) -> Box:
        """A region's box: its own, else the bounds of its polygon, else of its mask."""
        box = region.box
        if box is None and region.polygon is not None:
            box = box_from_polygon(region.polygon)
        if box is None and region.mask is not None:
            box = box_from_mask(region.mask)
        if box is None:
            raise InputError(f"reference {self.name!r}: region {region.name!r} has an empty "
                             "polygon or mask, so no box")
        return box


    def mask(self, region: Region) -> np.ndarray | None:
        """A region's (H, W) bool mask: its own, else its polygon filled; None for a region
        marked by box only (SAM2 reference memory needs a mask; such a region starts from the
        VLM's first box instead)."""
        if region.mask is not None:
            mask = np.asarray(region.mask, dtype=bool)
            if mask.shape != self.size:
                raise InputError(f"reference {self.name!r}: region {region.name!r} mask is "
                                 f"{mask.shape}, the image {self.size}")
            return mask
        if region.polygon is None:
            return None
        canvas = np.zeros(self.size, np.uint8)
        points = np.round(np.asarray(region.polygon, dtype=np.float64) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, cv2.LINE_8, shift=4)  # 4 fractional bits
        return canvas.astype(bool) if canvas.any() else None


def pool_features(features: np.ndarray) -> np.ndarray:
    """Channel-wise mean of a feature map ([1, D, h, w] or [D, h, w]) -> [D] float32 vector."""
    array = np.asarray(features, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise InputError(f"pool_features: expected [1, D, h, w] or [D, h, w], got {array.shape}")
    return array.mean(axis=(1, 2))


@dataclass(frozen=True)
class BankConfig:
    """Hysteresis of `ReferenceBank.select`.

    Attributes:
        margin: another reference must beat the current one's cosine similarity by this much;
            0.02 sits above the frame-to-frame jitter of pooled features on a still view and
            below the gap between views 20 degrees apart (tests/test_localization_reference.py).
        patience: and do so on this many consecutive frames (3 = 0.2 s at 15 fps angiography).
    """

    margin: float = 0.02
    patience: int = 3

    def __post_init__(self) -> None:
        if self.margin < 0 or self.patience < 1:
            raise InputError(f"BankConfig: expected margin >= 0 and patience >= 1, got "
                             f"{self.margin}, {self.patience}")


@dataclass(frozen=True)
class Selection:
    """What `ReferenceBank.select` chose for one frame.

    Attributes:
        index: the chosen reference's position in the bank.
        similarities: cosine similarity of the frame to every reference.
        switched: whether this frame changed the choice (True on the first frame).
    """

    index: int
    similarities: tuple[float, ...]
    switched: bool


class ReferenceBank:
    """Several references (views) and their descriptors; picks the one a frame matches.

    Args:
        references: the annotated references, any number >= 1.
        descriptors: one vector per reference, of the same kind `select` receives (e.g.
            `pool_features` of each reference image's SAM2 `vision_features`).
        config: the hysteresis.
    """

    def __init__(self, references: Sequence[Reference], descriptors: Sequence[np.ndarray],
                 config: BankConfig = BankConfig()) -> None:
        if not references or len(references) != len(descriptors):
            raise InputError(f"ReferenceBank: expected one descriptor per reference (>= 1), got "
                             f"{len(references)} references and {len(descriptors)} "
                             "descriptors")
        vectors = [np.asarray(d, np.float64).ravel() for d in descriptors]
        if len({v.size for v in vectors}) != 1:
            raise InputError(f"ReferenceBank: descriptors differ in length: "
                             f"{[v.size for v in vectors]}")
        self.references = tuple(references)
        self.config = config
        self._matrix = np.stack([_unit(v, "reference descriptor") for v in vectors])
        self._current: int | None = None
        self._challenger: int | None = None
        self._streak = 0

    @property
    def current(self) -> Reference | None:
        """The reference chosen by the latest `select`, None before the first."""
        return None if self._current is None else self.references[self._current]

    def select(self, descriptor: np.ndarray) -> Selection:
        """Choose the reference for a frame from its descriptor.

        The first frame takes the most similar reference. Later, the choice moves to another
        reference only when that one is the most similar and beats the current one by
        `config.margin` on `config.patience` consecutive frames.
        """
        vector = np.asarray(descriptor, np.float64).ravel()
        if vector.size != self._matrix.shape[1]:
            raise InputError(f"ReferenceBank.select: descriptor of length {vector.size}, the "
                             f"bank's have {self._matrix.shape[1]}")
        similarities = self._matrix @ _unit(vector, "frame descriptor")
        best = int(np.argmax(similarities))
        scores = tuple(float(s) for s in similarities)
        if self._current is None:
            self._current = best
            return Selection(best, scores, switched=True)
        if best != self._current and (similarities[best] - similarities[self._current]
                                      >= self.config.margin):
            self._streak = self._streak + 1 if self._challenger == best else 1
            self._challenger = best
        else:
            self._streak, self._challenger = 0, None
        if self._streak >= self.config.patience:
            self._current, self._streak, self._challenger = best, 0, None
            return Selection(best, scores, switched=True)
        return Selection(self._current, scores, switched=False)


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise InputError(f"ReferenceBank: {what} has norm {norm}; cosine similarity needs a "
                         "finite, nonzero vector")
    return vector / norm

"""Task accuracy against the generator's exact truth: Dice, boundary F-score, presence.

A `Scorecard` takes one predicted mask (or None: absent) per segment per frame and the frame's
truth, and summarises them overall, by calibre (>= 3 mm, 2-3 mm, < 2 mm lumen diameter) and by
cardiac phase (diastole, mid, systole by the contraction weight). The accuracy benchmark and
`rau-rt demo` both score with it.

Definitions:
- Dice is over the (segment, frame) pairs where the truth is present: a missed segment scores 0.
- Boundary F (2 px): the F-score of boundary pixels within 2 px of the other mask's boundary
  (Csurka et al., BMVC 2013), over the same pairs.
- Presence is correct when the prediction is non-empty exactly when the truth is present
  (`SegmentTruth.present`, >= 20 % of the centerline opacified); `presence_acc_changing` counts
  only segments that wash in or out during the cine.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np

from rau_rt.synthetic.sequence import FrameTruth, SegmentTruth

CALIBRES = ((">=3mm", 3.0, np.inf), ("2-3mm", 2.0, 3.0), ("<2mm", 0.0, 2.0))
PHASES = (("diastole", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("systole", 2 / 3, 1.01))
BOUNDARY_PX = 2


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0)
    return mask & ~eroded.astype(bool)


def boundary_f(pred: np.ndarray, truth: np.ndarray, tolerance_px: float = BOUNDARY_PX) -> float:
    """F-score of the two masks' boundaries matched within `tolerance_px`."""
    bp, bt = _boundary(pred), _boundary(truth)
    if not bp.any() or not bt.any():
        return 1.0 if bp.any() == bt.any() else 0.0
    near_truth = cv2.distanceTransform((~bt).astype(np.uint8), cv2.DIST_L2, 3) <= tolerance_px
    near_pred = cv2.distanceTransform((~bp).astype(np.uint8), cv2.DIST_L2, 3) <= tolerance_px
    precision = float(near_truth[bp].mean())
    recall = float(near_pred[bt].mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _bucket(value: float, table) -> str:
    return next(name for name, lo, hi in table if lo <= value < hi)


@dataclass
class Scorecard:
    """Scores of one run (any number of cines); `add` per segment per frame, then `summary`."""

    _pairs: list[tuple[str, str, str, bool, bool, float | None, float | None]] = field(
        default_factory=list)  # (track, calibre, phase, present, predicted, dice, boundary)
    _changing: set[str] = field(default_factory=set)
    _presence: dict[str, set[bool]] = field(default_factory=lambda: defaultdict(set))

    def add(self, track: str, pred: np.ndarray | None, truth: SegmentTruth, frame: FrameTruth,
            size: tuple[int, int], calibre_mm: float) -> None:
        """Score one segment in one frame.

        Args:
            track: names the segment in its cine (e.g. "seed3/6"): presence changes are
                counted per track.
            pred: the predicted (H, W) bool mask at the frame's size, or None (absent).
            calibre_mm: the segment's lumen diameter (`SequenceMeta.diameters_mm`).
        """
        predicted = pred is not None and bool(pred.any())
        self._presence[track].add(truth.present)
        d = b = None
        if truth.present:
            full = np.zeros(size, bool)
            x, y = truth.origin
            h, w = truth.crop.shape
            full[y:y + h, x:x + w] = truth.crop
            p = pred if predicted else np.zeros(size, bool)
            d, b = dice(p, full), boundary_f(p, full)
        self._pairs.append((track, _bucket(calibre_mm, CALIBRES),
                            _bucket(frame.contraction, PHASES), truth.present, predicted, d, b))

    def summary(self) -> dict[str, object]:
        """The task block: dice_mean, dice_ge2mm, boundary_f, presence_acc (+ on segments that
        wash in or out), frames, segments, and the Dice by calibre and by phase."""
        pairs = self._pairs
        changing = {t for t, seen in self._presence.items() if len(seen) == 2}

        def mean(values) -> float | None:
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        present = [p for p in pairs if p[3]]
        return {
            "dice_mean": mean(p[5] for p in present),
            "dice_ge2mm": mean(p[5] for p in present if p[1] != "<2mm"),
            "boundary_f": mean(p[6] for p in present),
            "presence_acc": mean(float(p[3] == p[4]) for p in pairs),
            "presence_acc_changing": mean(float(p[3] == p[4]) for p in pairs
                                          if p[0] in changing),
            "frames": len(pairs), "segments": len({p[0] for p in pairs}),
            "dice_by_calibre": {name: mean(p[5] for p in present if p[1] == name)
                                for name, _, _ in CALIBRES},
            "dice_by_phase": {name: mean(p[5] for p in present if p[2] == name)
                              for name, _, _ in PHASES},
        }

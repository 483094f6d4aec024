"""A sink that scores a run on a synthetic cine against the generator's exact truth.

`TruthSink` takes every result of a pipeline run over a `rau_rt.synthetic` cine (any source
that keeps the cine's frame indices: the DICOM or video file the generator wrote, or a
`synthetic:` URI) and scores its masks with `rau_rt.synthetic.scoring`. On close it writes a
truth | prediction picture of the processed frame where the requested segments fill the most.
`keyframe_hits` scores the VLM's keyframe answers (the pipeline's `stats.answers`) against the
truth boxes of the frames they were computed on. `rau-rt demo` prints both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from pathlib import Path

import cv2
import numpy as np

from rau_rt import ops
from rau_rt.errors import InputError
from rau_rt.io.sinks import to_bgr8
from rau_rt.synthetic import Sequence
from rau_rt.synthetic.scoring import Scorecard
from rau_rt.types import Frame, FrameResult


class TruthSink:
    """Scores results against `sequence`'s truth; writes the picture to `picture` on close."""

    def __init__(self, picture: str | Path, sequence: Sequence, regions: Seq[str]) -> None:
        missing = [n for n in regions if n not in sequence.meta.segments]
        if missing:
            raise InputError(f"regions {missing} are not in the synthetic cine's truth "
                             f"(it has {list(sequence.meta.segments)})")
        self.path = Path(picture)
        self.card = Scorecard()
        self._sequence = sequence
        self._regions = tuple(regions)
        self._best: tuple[int, np.ndarray, FrameResult] | None = None

    def write(self, frame: Frame, result: FrameResult) -> None:
        if not 0 <= result.index < len(self._sequence.truth):
            raise InputError(f"frame {result.index} is not in the synthetic cine "
                             f"({len(self._sequence.truth)} frames)")
        truth = self._sequence.truth[result.index]
        filled = 0
        for name in self._regions:
            region = result.regions.get(name)
            mask = region.mask if region is not None and region.present else None
            segment = truth.segments[name]
            self.card.add(name, mask, segment, truth, result.frame_size,
                          self._sequence.meta.diameters_mm[name])
            filled += int(segment.crop.sum()) if segment.present else 0
        if self._best is None or filled > self._best[0]:
            self._best = (filled, to_bgr8(frame).copy(), result)

    def summary(self) -> dict[str, object]:
        return self.card.summary()

    def keyframe_hits(self, answers: Seq[tuple[int, float, dict]], iou: float = 0.5,
                      ) -> dict[str, object]:
        """The localizer's answers (frame, ms, {region: box or None}) against the truth boxes
        of their frames: hit rate (IoU >= `iou`) and mean IoU over the visible requested
        segments, and how often a box was given where the segment was not visible."""
        from rau_rt.geometry import box_iou

        ious, false_boxes, absent = [], 0, 0
        for frame, _, found in answers:
            truth = self._sequence.truth[frame]
            for name in self._regions:
                segment, box = truth.segments[name], found.get(name)
                if segment.present and segment.box:
                    ious.append(0.0 if box is None else box_iou(box, segment.box))
                else:
                    absent += 1
                    false_boxes += box is not None
        return {"answers": len(answers), "visible": len(ious),
                "hit_rate": float(np.mean([v >= iou for v in ious])) if ious else None,
                "mean_iou": float(np.mean(ious)) if ious else None,
                "boxes_where_not_visible": false_boxes, "not_visible": absent}

    def close(self) -> None:
        if self._best is None:
            return
        _, image, result = self._best
        truth = self._sequence.truth[result.index]
        size = result.frame_size
        empty = np.zeros(size, bool)
        colours = [ops.PALETTE[i % len(ops.PALETTE)] for i in range(len(self._regions))]
        truth_masks = np.stack([truth.segments[n].mask(size[0]) if truth.segments[n].present
                                else empty for n in self._regions])
        predicted = np.stack([r.mask if (r := result.regions.get(n)) is not None and r.present
                              else empty for n in self._regions])
        left = ops.overlay(image, truth_masks, colours, labels=list(self._regions),
                           boxes=[truth.segments[n].box for n in self._regions])
        right = ops.overlay(image, predicted, colours, labels=list(self._regions),
                            boxes=[r.box if (r := result.regions.get(n)) is not None
                                   and r.present else None for n in self._regions])
        for panel, title in ((left, "truth"), (right, f"rau-rt (frame {result.index})")):
            cv2.putText(panel, title, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255),
                        1, cv2.LINE_AA)
        gap = np.full((size[0], 6, 3), 255, np.uint8)
        ok, data = cv2.imencode(".png", np.hstack([left, gap, right]))
        if not ok:
            raise InputError(f"{self.path}: PNG encoding failed")
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_bytes(data.tobytes())
        os.replace(partial, self.path)

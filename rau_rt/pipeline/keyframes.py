"""When a frame goes to the VLM: the keyframe policy.

The VLM takes seconds per query on a tower's CPU (hundreds of ms on a GPU) while the tracker
must keep the frame interval, so the localizer runs on keyframes only, in a worker, and its
boxes re-prompt the tracker on the newest frame. A frame is a keyframe when:

* it is the first frame (nothing is tracked yet);
* `every` frames passed since the last keyframe (drift correction on a schedule);
* a region the tracker follows fell below `min_score` or was lost (present=False), or the
  view changed (the frame's encoder features moved away from the last keyframe's; see
  `KeyframeConfig.view_similarity`), and at least `min_gap` frames passed since the last keyframe
  (a region that stays lost must not turn every frame into a VLM query).

Submitting while the worker is busy is fine: the worker keeps only the newest request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rau_rt.errors import InputError


@dataclass(frozen=True)
class KeyframeConfig:
    """Keyframe policy settings (`rau-rt run --keyframe-every K ...`).

    Attributes:
        every: frames between scheduled keyframes; 0 schedules none (only the first frame and
            triggers).
        min_score: a tracked region whose score falls below this triggers a keyframe.
        min_gap: frames that must pass after a keyframe before a trigger counts again.
        view_similarity: the view counts as changed when the cosine similarity of the frame's
            pooled SAM2 encoder features (`TrackStep.descriptor`) to the last keyframe's falls
            below this; None: off. Not calibrated on trained weights: random-init micro SAM2
            gives >= 0.998 within a synthetic run and <= 0.979 across patients and views
            (tests/test_pipeline.py), so measure your views before choosing it.
    """

    every: int = 30
    min_score: float = 0.5
    min_gap: int = 5
    view_similarity: float | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise InputError(f"every: expected >= 0 frames, got {self.every}")
        if not 0.0 <= self.min_score <= 1.0:
            raise InputError(f"min_score: expected 0..1, got {self.min_score}")
        if self.min_gap < 0:
            raise InputError(f"min_gap: expected >= 0 frames, got {self.min_gap}")
        if self.view_similarity is not None and not -1.0 < self.view_similarity < 1.0:
            raise InputError(f"view_similarity: expected a cosine in (-1, 1) or None, got "
                             f"{self.view_similarity}")


class KeyframePolicy:
    """Decides, frame by frame, whether to ask the localizer; one per stream."""

    def __init__(self, config: KeyframeConfig | None = None) -> None:
        self.config = config or KeyframeConfig()
        self._last: int | None = None

    @property
    def last_keyframe(self) -> int | None:
        """The index of the last frame `decide` made a keyframe, None before the first."""
        return self._last

    def decide(self, index: int, scores: Mapping[str, float | None],
               view_changed: bool = False) -> str | None:
        """Whether frame `index` is a keyframe, and why; records it when it is.

        Args:
            index: the frame's index in the stream (increasing).
            scores: tracked region -> its score in the previous result, None where it was
                absent (lost).
            view_changed: the view changed since the last keyframe.

        Returns:
            None, or the reason: "first", "scheduled", "view_change", "lost:<region>" or
            "low_score:<region>" (the first region in `scores` order).
        """
        cfg = self.config
        if self._last is not None and index <= self._last:
            raise InputError(f"frame {index}: frames must increase (last keyframe "
                             f"{self._last})")
        reason = None
        if self._last is None:
            reason = "first"
        elif cfg.every and index - self._last >= cfg.every:
            reason = "scheduled"
        elif index - self._last >= cfg.min_gap:
            if view_changed:
                reason = "view_change"
            else:
                for name, score in scores.items():
                    if score is None:
                        reason = f"lost:{name}"
                        break
                    if score < cfg.min_score:
                        reason = f"low_score:{name}"
                        break
        if reason is not None:
            self._last = index
        return reason

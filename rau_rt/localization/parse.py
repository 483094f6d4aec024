"""Answer text -> a frame-pixel box or None (with the reason) per requested region.

Accepts the constrained form exactly and, for free decoding, the same JSON inside other text
(a ```json fence, a sentence around it). Coordinates go through rau_rt.geometry: the model's
convention to frame pixels, then ordered, rounded and clipped; a region the answer omits,
marks null, or boxes outside the frame or with no area gets None and a reason. Nothing in an
answer raises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rau_rt import geometry
from rau_rt.types import Box

NOT_IN_ANSWER = "not in the answer"
NOT_VISIBLE = "not visible (the answer's bbox_2d is null)"
NO_JSON = "no JSON list in the answer"  # the reason's start, followed by the answer's head


@dataclass(frozen=True)
class ParsedRegion:
    """One requested region from an answer: a box in frame pixels, or None and why."""

    box: Box | None
    reason: str | None = None


def _json_list(text: str) -> tuple[list | None, str | None]:
    """The first JSON list in `text` (the whole text, else from each '[' on), or why none."""
    try:
        value = json.loads(text)
        if isinstance(value, list):
            return value, None
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, list):
                return value, None
        except ValueError:
            pass
        start = text.find("[", start + 1)
    return None, f"{NO_JSON}: {text[:80]!r}"


def _coordinates(value: object) -> tuple[float, float, float, float] | str:
    if not isinstance(value, list) or len(value) != 4:
        return f"bbox_2d is not 4 numbers: {value!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return f"bbox_2d is not 4 numbers: {value!r}"
    if not all(math.isfinite(v) for v in value):
        return f"bbox_2d is not finite: {value!r}"
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def parse_answer(text: str, names: Sequence[str], convention: str,
                 model_size: tuple[int, int], frame_size: tuple[int, int],
                 ) -> dict[str, ParsedRegion]:
    """Every name in `names` -> its box in frame pixels or None with a reason.

    Args:
        text: the model's answer.
        names: the requested regions; labels not among them are ignored, and a label given
            twice keeps its first item.
        convention: the family's box convention ("absolute" or "relative_1000").
        model_size: (height, width) of the model input the frame was resized to.
        frame_size: (height, width) of the frame.
    """
    items, problem = _json_list(text)
    if items is None:
        return {name: ParsedRegion(None, problem) for name in names}
    found: dict[str, object] = {}
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get("label"), str) and "bbox_2d" in item:
            found.setdefault(item["label"], item["bbox_2d"])
    result = {}
    for name in names:
        if name not in found:
            result[name] = ParsedRegion(None, NOT_IN_ANSWER)
            continue
        if found[name] is None:
            result[name] = ParsedRegion(None, NOT_VISIBLE)
            continue
        coordinates = _coordinates(found[name])
        if isinstance(coordinates, str):
            result[name] = ParsedRegion(None, coordinates)
            continue
        frame_box = geometry.box_vlm_to_frame(coordinates, convention, model_size, frame_size)
        box, reason = geometry.clip_box(frame_box, frame_size)
        result[name] = ParsedRegion(box, reason)
    return result

"""The localizer's prompt: the one place with its exact text and image order.

One user turn, in this order (RAU's reference-then-target layout):

1. `REFERENCE_INTRO`, the reference image;
2. `ANNOTATED_INTRO`, the reference with its regions drawn (outlines, boxes and labels);
3. `REGIONS_INTRO` and the reference regions as the JSON the model answers in, boxes in the
   model's coordinate convention (`ANSWER_FORMAT`);
4. `TARGET_INTRO`, the target frame;
5. the request: `LOCATE_REQUEST` naming the wanted regions, or a free question (`ask`).

Parts 1-3 and the intro of part 4 do not depend on the frame, so they form a prefix whose KV
cache the localizer computes once per reference. The prefix text ends just before the target's
`<|vision_start|>`; a special token always starts a new token, so tokenizing the prefix and the
tail apart gives the same ids as tokenizing the whole prompt (tests check it against
transformers' processor).

Rendered through `rau_rt.vlm_layout.chat_prompt` (Qwen's chat template, default system prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt import geometry, ops
from rau_rt.errors import InputError
from rau_rt.reference import Reference
from rau_rt.vlm_layout import (
    DEFAULT_SYSTEM,
    IM_END,
    IMAGE_PLACEHOLDER,
    VlmLayout,
    chat_prompt,
    expand_image_tokens,
)

REFERENCE_INTRO = "Reference image:"
ANNOTATED_INTRO = "\nThe same reference with its annotated regions outlined and labelled:"
REGIONS_INTRO = "\nAnnotated regions, bbox_2d as [x1, y1, x2, y2] in {units}:\n"
TARGET_INTRO = "\nTarget image:"
LOCATE_REQUEST = ("\nLocate these regions in the target image: {names}. Answer with a JSON list "
                  'of {{"label": name, "bbox_2d": [x1, y1, x2, y2]}}, "bbox_2d": null for a '
                  "region that is not visible.")
UNITS = {"absolute": "pixels of the {width}x{height} image",
         "relative_1000": "thousandths of the image width and height (0-1000)"}
# Outline width and label scale on the annotated reference: 2 px lines stay visible after the
# resize to a 448-px model input from a 512-px angiogram.
LINE_PX = 2
FONT_SCALE = 0.5


def answer_json(items: Sequence[tuple[str, Sequence[int] | None]]) -> str:
    """The compact JSON answer form: [{"label":"name","bbox_2d":[x1,y1,x2,y2]}, ...].

    The label comes before its box, so a model writes each box right after the name it is
    for (with the box first, it must count the items written so far to know which region
    the box is for). Compact (no spaces) because the constrained grammar allows no free
    whitespace; labels are JSON strings (escaped), `None` boxes write `null`.
    """
    return json.dumps([{"label": name,
                        "bbox_2d": None if box is None else [int(v) for v in box]}
                       for name, box in items],
                      separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class PromptParts:
    """One conversation as user parts (`IMAGE_PLACEHOLDER` for each image) and its split.

    Attributes:
        prefix: the parts up to and including `TARGET_INTRO` (frame independent).
        tail: the target image and the request.
        system: the system prompt (None: none).
    """

    prefix: tuple[str, ...]
    tail: tuple[str, ...]
    system: str | None = DEFAULT_SYSTEM

    @property
    def parts(self) -> tuple[str, ...]:
        return self.prefix + self.tail

    def prefix_text(self) -> str:
        """The chat text of the prefix: everything before the target image."""
        text = chat_prompt(self.prefix, self.system)
        return text[:text.rindex(IM_END)]

    def tail_text(self) -> str:
        """The chat text after the prefix: target image, request, end of turn, assistant."""
        return chat_prompt(self.parts, self.system)[len(self.prefix_text()):]


def token_ids(tokenizer, text: str, layout: VlmLayout,
              sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """[1, S] ids of chat text as the localizer feeds them: `tokenizer` (a `tokenizers`
    Tokenizer) without added special tokens, every image pad expanded to its image's tokens
    (`sizes`: each image's model-input size in order; None: all at the layout's input size)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return expand_image_tokens(ids, layout, sizes)[None]


def conversation_ids(tokenizer, parts: PromptParts, layout: VlmLayout,
                     sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """[1, S] ids of a whole conversation: the prefix and the tail tokenized apart, as the
    localizer tokenizes them (the prefix is cached), which equals tokenizing it whole.
    `sizes`: every image's model-input size in order (None: all at the layout's input size)."""
    prefix_images = sum(part == IMAGE_PLACEHOLDER for part in parts.prefix)
    head = None if sizes is None else sizes[:prefix_images]
    tail = None if sizes is None else sizes[prefix_images:]
    return np.concatenate([token_ids(tokenizer, parts.prefix_text(), layout, head),
                           token_ids(tokenizer, parts.tail_text(), layout, tail)], axis=1)


def reference_parts(reference: Reference, layout: VlmLayout) -> tuple[str, ...]:
    """Prompt parts 1-4 (up to the target image) for a reference, boxes in the model's units
    of the reference's model input (`layout.size_for`)."""
    fam = layout.family_constants
    size = layout.size_for(reference.size)
    units = UNITS[fam.box_convention].format(width=size[1], height=size[0])
    items = [(r.name, geometry.box_frame_to_vlm(reference.box(r), fam.box_convention,
                                                size, reference.size))
             for r in reference.regions]
    return (REFERENCE_INTRO, IMAGE_PLACEHOLDER, ANNOTATED_INTRO, IMAGE_PLACEHOLDER,
            REGIONS_INTRO.format(units=units) + answer_json(items), TARGET_INTRO)


def locate_parts(reference: Reference, layout: VlmLayout, names: Sequence[str],
                 system: str | None = DEFAULT_SYSTEM) -> PromptParts:
    """The conversation asking for `names` in the target image."""
    if not names:
        raise InputError("locate: expected at least one region name")
    unknown = [n for n in names if n not in reference.region_names]
    if unknown:
        raise InputError(f"locate: regions {unknown} are not annotated on reference "
                         f"{reference.name!r}; it has {list(reference.region_names)}")
    return PromptParts(reference_parts(reference, layout),
                       (IMAGE_PLACEHOLDER, locate_request(names)), system)


def locate_request(names: Sequence[str]) -> str:
    """The request part naming the wanted regions (`LOCATE_REQUEST`)."""
    return LOCATE_REQUEST.format(names=", ".join(json.dumps(n, ensure_ascii=False)
                                                 for n in names))


def ask_parts(reference: Reference, layout: VlmLayout, question: str,
              system: str | None = DEFAULT_SYSTEM) -> PromptParts:
    """The conversation asking a free question about the target image."""
    if not question.strip():
        raise InputError("ask: expected a non-empty question")
    return PromptParts(reference_parts(reference, layout), (IMAGE_PLACEHOLDER, "\n" + question),
                       system)


def annotated_image(reference: Reference) -> np.ndarray:
    """The reference (uint8 RGB) with each region's outline, box and label drawn in its colour.

    Outlines: the polygon, else the mask's outer contours; every region also gets its box and
    its name above the box's top-left corner (inside the image).
    """
    out = np.ascontiguousarray(reference.rgb()).copy()
    for n, region in enumerate(reference.regions):
        color = tuple(int(c) for c in ops.PALETTE[n % len(ops.PALETTE)])
        if region.polygon is not None and len(region.polygon) >= 2:
            points = np.round(np.asarray(region.polygon, np.float64)).astype(np.int32)
            cv2.polylines(out, [points.reshape(-1, 1, 2)], True, color, LINE_PX, cv2.LINE_AA)
        elif region.mask is not None:
            contours, _ = cv2.findContours(np.asarray(region.mask, np.uint8),
                                           cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, color, LINE_PX, cv2.LINE_AA)
        x1, y1, x2, y2 = reference.box(region)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, 1)
        cv2.putText(out, region.name, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    FONT_SCALE, color, 1, cv2.LINE_AA)
    return out

"""Training pairs for the localizer VLM, drawn on the fly from the synthetic generator.

A pair is one `Localizer.locate` query and the answer it should get (issue 18, "Model and
training"): the annotated reference of patient A in one view and a frame of patient B's cine
in another view (any moment of the run: before the contrast, filling, plateau or washout; any
cardiac phase), prompted exactly as the localizer prompts (`rau_rt.localization.prompts`: the
same text, image order, annotated reference image, system turn and tokenization; the images
through `localizer.image_patches`). The answer is the target's truth boxes in the family's
convention, `null` for a requested segment that is not visible (not opacified, or outside the
frame), in the compact JSON the constrained decoder enforces, then the end-of-turn token. Only
the answer tokens count in the loss.

The generator renders squares (256, 384 or 512 px); half the targets are reframed to another
aspect of `rau_rt.vlm_layout.ASPECTS` (`reframe`): cropped to it, as a detector's rectangular
field or a zoomed display is, or padded to it with black bars, as a display capture of a
square image is. Images go to the vision input as the localizer sends them (`image_patches`:
the layout's size of nearest aspect). Frames are windowed to 8 bits with the jitter a site's
window choice brings, then augmented like the SAM2 training frames.

In a share of the training pairs (`flips`) the answer the model reads is not quite the one it
is taught: some earlier items' values are flipped (a box written as `null`, a `null` as a
box) and those values are not labelled (`flip_context`). Presence is correlated across a
query's regions (before the bolus none is visible), so a model taught only on true answers
learns to copy the previous item's presence rather than read the frame; decoding greedily, one
`null` then makes every later region `null`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt import geometry
from rau_rt.localization import prompts
from rau_rt.localization.localizer import image_patches
from rau_rt.reference import Reference
from rau_rt.synthetic import (
    SEGMENTS,
    SequenceConfig,
    make_reference,
    render_frames,
    segments_of,
)
from rau_rt.synthetic.dynamics import Motion
from rau_rt.synthetic.render import window_8bit
from rau_rt.synthetic.sequence import SegmentTruth
from rau_rt.train.augment import augment_8bit
from rau_rt.types import Box, Region
from rau_rt.vlm_layout import ASPECTS, IM_END, IMAGE_PLACEHOLDER, VlmLayout

IGNORE = -100  # label of tokens outside the answer (torch's cross-entropy ignore_index)
MAX_REGIONS = 6  # annotated on a reference
RUN_FRAMES = 90  # the cine a target frame comes from: fill, plateau and washout
REFRAMED = 0.5  # share of targets cropped or padded to a non-square aspect
KEPT_VISIBLE = 0.5  # a cropped segment stays visible with this share of its lumen in frame
FLIPPED_ITEM = 0.5  # in a flipped context, each item but the last is flipped with this chance
# The tasks a PairMaker draws: "locate", the localizer's query; "ground", its pretext (one
# region asked in the target alone, no reference); "read", the pretext's pretext (the same, with
# the asked segment outlined, boxed and labelled on the target as the reference's are)
TASKS = ("locate", "ground", "read")
GROUND_VISIBLE = 0.85  # a grounding query asks for a segment the frame shows with this chance


@dataclass(frozen=True)
class Pair:
    """One training example.

    Attributes:
        names: the regions asked for, in the reference's order.
        ids: [1, S] int64 prompt ids (image pads expanded), then the answer (as shown: with
            flipped values where the pair's context was flipped) and end of turn.
        labels: [1, S] int64, `IGNORE` except on the answer and end-of-turn tokens (and on
            flipped values).
        patches: the vision inputs of the reference, the annotated reference and the target
            (a grounding pair: the target's alone).
        answer: the true answer text.
        truth: region -> its box in target-frame pixels, None where not visible.
        frame_size: (height, width) of the target frame.
    """

    names: tuple[str, ...]
    ids: np.ndarray
    labels: np.ndarray
    patches: tuple[np.ndarray, ...]
    answer: str
    truth: dict[str, Box | None]
    frame_size: tuple[int, int]
    input_sizes: tuple[tuple[int, int], ...]  # each image's model-input (height, width)
    cells: np.ndarray | None = None  # the target's `occupancy` (training draws only)
    boxes: np.ndarray | None = None  # the target's `segment_boxes` (training draws only)
    # [K, 2] int64: (answer token index, item index) of every answer token whose next token
    # spells an item's box or null: where the answer writes that region's box
    box_tokens: np.ndarray | None = None

    @property
    def answer_start(self) -> int:
        """The index in `ids` of the answer's first token (labelled even in a flipped context,
        whose unlabelled values come later)."""
        return int(np.argmax(self.labels[0] != IGNORE))

    @property
    def answer_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass(frozen=True)
class Query:
    """A pair before tokenizing: the localizer's inputs and the truth (what a benchmark asks
    the runtime's `Localizer` on held-out seeds).

    Attributes:
        reference: patient A's annotated reference (None: a grounding query).
        frame: patient B's target frame, uint8 (H, W), after `reframe`; (H, W, 3) RGB where
            a "read" query's segment is shown and drawn on it.
        names: the regions asked for, in the reference's order.
        truth: region -> its box in frame pixels, None where not visible.
        calibre_mm: region -> the segment's mean lumen diameter.
        spacing_mm: the frame's pixel spacing at the isocentre.
    """

    reference: Reference | None
    frame: np.ndarray
    names: tuple[str, ...]
    truth: dict[str, Box | None]
    calibre_mm: dict[str, float]
    spacing_mm: float
    cells: np.ndarray | None = None
    boxes: np.ndarray | None = None


def occupancy(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[rows * cols, len(SEGMENTS)] float32: which segments' lumen reaches each visual token's
    cell of the target (raster order, as the vision tower emits its merged tokens), from
    (len(SEGMENTS), H, W) bool masks; the dense target of the trainer's auxiliary head."""
    import cv2

    rows, cols = grid
    cells = [cv2.resize(m.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA) > 0
             for m in masks]
    return np.stack(cells, -1).reshape(rows * cols, len(masks)).astype(np.float32)


def segment_boxes(masks: np.ndarray) -> np.ndarray:
    """[len(SEGMENTS), 4] float32: each segment's box (x1, y1, x2, y2) as fractions of the
    frame's width and height, from (len(SEGMENTS), H, W) bool masks; NaN where a segment has
    no lumen in the frame. The box targets of the trainer's auxiliary heads."""
    height, width = masks.shape[1:]
    boxes = np.full((len(masks), 4), np.nan, np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width,
                        (ys.max() + 1) / height)
    return boxes


def box_tokens(answer: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """[K, 2] (token index, item index): the answer's tokens whose next token lies in an
    item's box value (`[x1,y1,x2,y2]` or `null`), from the tokens' character `offsets`; the
    positions whose predictions write that item's box."""
    key = '"bbox_2d":'
    spans, at = [], 0
    while (found := answer.find(key, at)) >= 0:
        start = found + len(key)
        spans.append((start, answer.index("}", start)))
        at = start
    rows = []
    for item, (start, end) in enumerate(spans):
        inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
        rows += [(t - 1, item) for t in inside if t > 0]
    return np.array(rows, np.int64).reshape(-1, 2)


def deciding(rows: np.ndarray) -> np.ndarray:
    """A mask of `box_tokens` rows (grouped by item): each item's first, the token whose
    prediction chooses between a box and `null`."""
    return np.r_[True, rows[1:, 1] != rows[:-1, 1]] if len(rows) else np.zeros(0, bool)


def answer_text(truth: dict[str, Box | None], layout: VlmLayout,
                frame_size: tuple[int, int]) -> str:
    """The answer the localizer should decode for `truth` (frame pixels) on a frame of
    `frame_size`: boxes in the family's convention, in the order asked."""
    fam = layout.family_constants
    size = layout.size_for(frame_size)
    return prompts.answer_json([
        (name, None if box is None else geometry.box_frame_to_vlm(
            box, fam.box_convention, size, frame_size))
        for name, box in truth.items()])


def flip_context(truth: dict[str, Box | None], frame_size: tuple[int, int],
                 rng: np.random.Generator) -> tuple[dict[str, Box | None], set[str]]:
    """The answer's regions with some values flipped, for the model to read (not to learn):
    each item but the last with chance `FLIPPED_ITEM` (at least one), a box becoming `None` and
    a `None` a random box in the frame. Returns (the read values, the flipped names)."""
    names = list(truth)[:-1]
    chosen = {n for n in names if rng.uniform() < FLIPPED_ITEM} or {str(rng.choice(names))}
    height, width = frame_size
    read = dict(truth)
    for name in chosen:
        if truth[name] is not None:
            read[name] = None
            continue
        w, h = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        read[name] = (x, y, x + w, y + h)
    return read, chosen


def reframe(frame: np.ndarray, segments: dict[str, SegmentTruth], names: tuple[str, ...],
            rng: np.random.Generator, masks: np.ndarray | None = None,
            ) -> tuple[np.ndarray, dict[str, Box | None], np.ndarray | None]:
    """A square frame (uint8) and the truth boxes of `names`, kept square or (with
    probability `REFRAMED`) cropped or padded to a random non-square aspect of `ASPECTS`;
    `masks` ([S, side, side], optional) are cropped or padded alike.

    A crop keeps a segment visible when at least `KEPT_VISIBLE` of its lumen stays in the
    frame (its box then bounds what stays); padding shifts every box by the bar.
    """
    side = frame.shape[0]
    truth = {n: segments[n].box if segments[n].present and segments[n].box else None
             for n in names}
    if rng.uniform() >= REFRAMED:
        return frame, truth, masks
    h_ratio, w_ratio = ASPECTS[int(rng.integers(1, len(ASPECTS)))]  # not the square
    long_side = side * max(h_ratio, w_ratio) // min(h_ratio, w_ratio)
    short_side = side * min(h_ratio, w_ratio) // max(h_ratio, w_ratio)
    portrait = h_ratio > w_ratio
    if rng.uniform() < 0.5:  # the square with bars on its short sides
        height, width = (long_side, side) if portrait else (side, long_side)
        y0, x0 = (height - side) // 2, (width - side) // 2
        out = np.zeros((height, width, *frame.shape[2:]), frame.dtype)
        out[y0:y0 + side, x0:x0 + side] = frame
        shifted = {n: None if b is None else (b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0)
                   for n, b in truth.items()}
        if masks is not None:
            padded = np.zeros((len(masks), height, width), bool)
            padded[:, y0:y0 + side, x0:x0 + side] = masks
            masks = padded
        return out, shifted, masks
    height, width = (side, short_side) if portrait else (short_side, side)  # a crop
    y0 = int(rng.integers(0, side - height + 1))
    x0 = int(rng.integers(0, side - width + 1))
    out = np.ascontiguousarray(frame[y0:y0 + height, x0:x0 + width])
    cropped: dict[str, Box | None] = {}
    for name, box in truth.items():
        cropped[name] = None
        if box is None:
            continue
        mask = segments[name].mask(side)
        inside = mask[y0:y0 + height, x0:x0 + width]
        if inside.sum() < KEPT_VISIBLE * mask.sum():
            continue
        ys, xs = np.nonzero(inside)
        cropped[name] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    if masks is not None:
        masks = masks[:, y0:y0 + height, x0:x0 + width]
    return out, cropped, masks


def _target(seed: int, artery: str, dominance: str, look: str, rng: np.random.Generator):
    """The target: one frame, at a random moment of the bolus and the heartbeat, of the cine of
    generator seed `seed` (size, frame rate, motion and stenoses drawn from `rng`)."""
    size = int(rng.choice((256, 384, 512)))
    fps = float(rng.choice((7.5, 15.0, 30.0), p=(0.2, 0.6, 0.2)))
    motion = Motion(rng.uniform(4, 40), rng.uniform(0, 20), rng.uniform(55, 100))
    cfg = SequenceConfig(seed, RUN_FRAMES, size, fps, None, artery, dominance, motion, None,
                         int(rng.integers(0, 3)), None, True, look)
    return render_frames(cfg, [int(rng.integers(0, RUN_FRAMES))])


class PairMaker:
    """Pairs for one model: its layout (`vlm.json` contract) and tokenizer.

    Args:
        layout: the layout the model is exported with (input size, family, image tokens).
        tokenizer_json: the text of the model's tokenizer.json.
        system: the system turn; default the family's, as the localizer's default.
        augment: jitter the window and augment the target frame.
        cells: also draw the targets of the trainer's probes (`occupancy`, `segment_boxes`).
        flips: with `augment`, the share of pairs whose answer context is flipped
            (`flip_context`; queries of one region never are).
        task: "locate", the localizer's query (another patient's annotated reference, then
            the target); or "ground", its pretext: one region, named, asked in the target
            alone (no reference image or regions; the localizer's request and answer form).
            Grounding queries ask for a segment the frame shows with chance
            `GROUND_VISIBLE`, else for any of the artery's segments (`null` where not shown).
            "read": a grounding query with the asked segment, where shown, drawn on the
            target as `prompts.annotated_image` draws a reference's regions (outline, box,
            label): its answer is the drawn box, so a model learns to write where a mark is
            before it learns to find an unmarked segment.
    """

    def __init__(self, layout: VlmLayout, tokenizer_json: str, system: str | None = None, *,
                 augment: bool = True, cells: bool = False, flips: float = 0.0,
                 task: str = "locate") -> None:
        from tokenizers import Tokenizer

        if task not in TASKS:
            raise ValueError(f"task {task!r}: expected one of {TASKS}")
        self.task = task
        self.layout = layout
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.system = layout.family_constants.default_system if system is None else system
        self.augment = augment
        self.cells = cells
        self.flips = flips
        end = self.tokenizer.token_to_id(IM_END)
        if end is None:
            raise ValueError(f"the tokenizer has no {IM_END} token")
        self._end = end

    def draw(self, seed: int) -> Pair | None:
        """The pair of generator seed `seed` (the target patient; the reference patient is
        another draw from it); None when the reference cannot show its segments."""
        query = self.query(seed)
        if query is None:
            return None
        read = None
        rng = np.random.default_rng([seed, 18, 2])
        if self.augment and len(query.names) > 1 and rng.uniform() < self.flips:
            read = flip_context({n: query.truth[n] for n in query.names},
                                (int(query.frame.shape[0]), int(query.frame.shape[1])), rng)
        return self.pair(query.reference, query.frame, query.names, query.truth, query.cells,
                         query.boxes, read)

    def query(self, seed: int) -> Query | None:
        """`draw`'s question and truth before tokenizing; None where `draw` gives None."""
        rng = np.random.default_rng([seed, 18])
        artery = str(rng.choice(("left", "right")))
        dominance = str(rng.choice(("right", "left"), p=(0.85, 0.15)))
        look = "clinical" if rng.uniform() < 0.8 else "classic"
        available = segments_of(artery, dominance)
        if self.task in ("ground", "read"):
            target = _target(seed, artery, dominance, look, rng)
            segments = target.truth[0].segments
            shown = [n for n in available if segments[n].present and segments[n].box]
            pool = shown if shown and rng.uniform() < GROUND_VISIBLE else available
            return self._finish(None, target, (str(rng.choice(pool)),), rng)
        count = int(rng.integers(2, min(MAX_REGIONS, len(available)) + 1))
        annotated = tuple(sorted((str(n) for n in rng.choice(available, count, replace=False)),
                                 key=available.index))
        target = _target(seed, artery, dominance, look, rng)
        try:
            still = make_reference(seed + 1, int(rng.choice((256, 384, 512))), artery=artery,
                                   dominance=dominance, segments=annotated,
                                   avoid_view=target.meta.view, look=look)
        except ValueError:  # no view showed every chosen segment
            return None
        reference = Reference(still.image_8bit(), tuple(
            Region(r.name, box=r.box, polygon=r.polygon) for r in still.regions))
        keep = rng.uniform(size=count) < 0.7
        keep[int(rng.integers(0, count))] = True
        names = tuple(n for n, k in zip(annotated, keep, strict=True) if k)
        return self._finish(reference, target, names, rng)

    def _finish(self, reference: Reference | None, target, names: tuple[str, ...],
                rng: np.random.Generator) -> Query:
        """The query of a rendered target frame: windowed (and augmented), reframed, with the
        truth of `names` and the probes' targets."""
        size = int(target.frames[0].shape[0])
        window = target.meta.window
        if self.augment:  # the window a site or a DICOM header picks varies
            centre, width = window
            window = (centre + rng.normal(0, 0.06) * width, width * rng.uniform(0.8, 1.25))
        view = window_8bit(target.frames[0], window)
        if self.augment:
            view = augment_8bit(view, rng)
        segments = target.truth[0].segments
        asked = segments[names[0]]
        if self.task == "read" and asked.present and asked.box:
            drawn = Region(names[0], box=asked.box, mask=asked.mask(size))
            view = prompts.annotated_image(Reference(view, (drawn,)))
        masks = None
        if self.cells:  # every segment's opacified lumen, in SEGMENTS order
            empty = np.zeros((size, size), bool)
            masks = np.stack([segments[n].mask(size) if n in segments and segments[n].present
                              else empty for n in SEGMENTS])
        view, truth, masks = reframe(view, segments, names, rng, masks)
        cells = boxes = None
        if masks is not None:
            cells = occupancy(masks, self.layout.merged_grid(self.layout.size_for(view.shape)))
            boxes = segment_boxes(masks)
        return Query(reference, view, names, truth,
                     {n: float(target.meta.diameters_mm[n]) for n in names},
                     float(target.meta.pixel_spacing_mm), cells, boxes)

    def pair(self, reference: Reference | None, frame: np.ndarray, names: tuple[str, ...],
             truth: dict[str, Box | None], cells: np.ndarray | None = None,
             boxes: np.ndarray | None = None,
             read: tuple[dict[str, Box | None], set[str]] | None = None) -> Pair:
        """The pair for a reference (None: grounding, the target alone), an 8-bit target frame
        and its truth boxes; `read`: the flipped values the answer shows and their names
        (`flip_context`), left unlabelled."""
        frame_size = (int(frame.shape[0]), int(frame.shape[1]))
        if reference is None:
            parts = prompts.PromptParts((prompts.TARGET_INTRO.lstrip(),), (
                IMAGE_PLACEHOLDER, prompts.locate_request(names)), self.system)
            sizes: tuple[tuple[int, int], ...] = (self.layout.size_for(frame_size),)
        else:
            parts = prompts.locate_parts(reference, self.layout, names, self.system)
            reference_size = self.layout.size_for(reference.size)
            sizes = (reference_size, reference_size, self.layout.size_for(frame_size))
        prompt = prompts.conversation_ids(self.tokenizer, parts, self.layout, sizes)
        answer = answer_text({n: truth[n] for n in names}, self.layout, frame_size)
        shown, flipped = (answer, set()) if read is None else (
            answer_text(read[0], self.layout, frame_size), read[1])
        encoded = self.tokenizer.encode(shown, add_special_tokens=False)
        answer_ids = [*encoded.ids, self._end]
        ids = np.concatenate([prompt, np.array([answer_ids], np.int64)], axis=1)
        labels = np.full_like(ids, IGNORE)
        labels[0, prompt.shape[1]:] = answer_ids
        rows = box_tokens(shown, encoded.offsets)
        if flipped:  # a flipped value is read, not taught; the probe keeps its deciding token
            wrong = np.isin(rows[:, 1], [names.index(n) for n in flipped])
            labels[0, prompt.shape[1] + rows[wrong, 0] + 1] = IGNORE
            rows = rows[~wrong | deciding(rows)]
        target = image_patches(frame, self.layout, "rgb")
        patches = (target,) if reference is None else (
            image_patches(reference.image, self.layout, reference.channel_order),
            image_patches(prompts.annotated_image(reference), self.layout, "rgb"), target)
        return Pair(names, ids, labels, patches, answer, dict(truth), frame_size, sizes, cells,
                    boxes, rows)

    def stream(self, first_seed: int):
        """Pairs of consecutive seeds from `first_seed` (skipping unusable draws), with the
        seed that comes next, so a resumed run continues the same stream."""
        seed = first_seed
        while True:
            pair = self.draw(seed)
            seed += 1
            if pair is not None:
                yield pair, seed

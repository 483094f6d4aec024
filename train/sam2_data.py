"""Training clips for SAM2, drawn on the fly from the synthetic generator.

A clip is what the tracker sees in one of the ways rau-rt drives SAM2 (issue 15, "Training"):

- `box`: a box on frame 0 (clean or jittered like a VLM's error) and tracking after it,
  sometimes a second box on a later frame (the VLM's keyframe re-prompt);
- `mask`: a mask on frame 0 (a polygon-annotated region) and tracking after it;
- `reference`: the annotated reference of another patient in another view as the pinned
  conditioning frame, then usually a box on the target's first frame, then tracking.

Every clip holds 1-4 regions, batched as the tracker batches them. Clips span the bolus'
wash-in and wash-out, so a segment not (yet or any more) opacified has an empty target and
teaches a negative object score. Model inputs go through `rau_rt.ops.preprocess`, the
tracker's own preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt import ops
from rau_rt.synthetic import SequenceConfig, make_reference, render_frames, segments_of
from rau_rt.synthetic.dynamics import Motion
from rau_rt.synthetic.render import window_8bit
from rau_rt.train.augment import augment_8bit

REGIMES = ("box", "mask", "reference")
REGIME_WEIGHTS = (0.45, 0.25, 0.30)
MAX_REGIONS = 4
JITTER_RANGE = (0.10, 0.25)  # a VLM's box error: each side moves by this fraction of the size


@dataclass(frozen=True)
class ClipSpec:
    """What to draw: fixed per (seed, regime) so a clip is reproducible from its seed."""

    image_size: int = 256  # the model's input side
    frames: int = 8  # tracked frames (the reference, when there is one, comes on top)
    augment: bool = True
    regime_weights: tuple[float, float, float] = REGIME_WEIGHTS  # box, mask, reference


@dataclass(frozen=True)
class Clip:
    """One training example, as arrays.

    images: (T, 3, S, S) float32 model inputs; frame 0 is the reference in `reference` clips.
    targets: (T, N, S, S) bool truth masks at the model's input size.
    boxes: frame index -> (N, 4) float32 boxes in model-input pixels (a box prompt).
    masks: frame index -> (N, S, S) bool (a mask prompt: the mask is that frame's output).
    supervised: (T,) bool: frames that count in the loss (not mask-prompted ones).
    """

    regime: str
    regions: tuple[str, ...]
    images: np.ndarray
    targets: np.ndarray
    boxes: dict[int, np.ndarray]
    masks: dict[int, np.ndarray]
    supervised: np.ndarray


def _model_input(frame: np.ndarray, window: tuple[float, float], size: int,
                 rng: np.random.Generator | None) -> np.ndarray:
    """12-bit frame -> windowed 8-bit view (augmented) -> the tracker's float32 input."""
    if rng is not None:  # the window a site or a DICOM header picks varies
        centre, width = window
        window = (centre + rng.normal(0, 0.06) * width, width * rng.uniform(0.8, 1.25))
    view = window_8bit(frame, window)
    if rng is not None:
        view = augment_8bit(view, rng)
    return ops.preprocess(view, (size, size), channel_order="rgb")


def _target(mask: np.ndarray, size: int) -> np.ndarray:
    """A frame-size bool mask at the model's input size (area-averaged, then >= 0.5)."""
    if mask.shape == (size, size):
        return mask
    small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return small >= 0.5


def _box_of(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def jitter_box(box: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A box as a VLM might answer it: 30 % exact, else every side off by up to 10-25 % of
    the box's size and the whole box shifted; clipped to the image, never empty."""
    if rng.uniform() < 0.3:
        return box.copy()
    w, h = box[2] - box[0], box[3] - box[1]
    scale = rng.uniform(*JITTER_RANGE)
    sides = rng.uniform(-1, 1, 4) * scale * np.array([w, h, w, h])
    shift = rng.uniform(-1, 1, 2) * scale * np.array([w, h])
    out = box + sides + np.tile(shift, 2)
    out = np.clip(out, 0, size)
    out[2:] = np.maximum(out[2:], out[:2] + 2)
    return np.clip(out, 0, size).astype(np.float32)


def _reference_masks(seed: int, frame_size: int, artery: str, dominance: str,
                     regions: tuple[str, ...], view, look: str):
    """The other patient's annotated reference: 12-bit image, window, (N, H, W) masks."""
    ref = make_reference(seed, frame_size, artery=artery, dominance=dominance, segments=regions,
                         avoid_view=view, look=look)
    masks = []
    for region in ref.regions:  # polygon-annotated, as a clinician's reference is
        canvas = np.zeros((frame_size, frame_size), np.uint8)
        points = np.round(np.asarray(region.polygon, dtype=np.float64) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, cv2.LINE_8, shift=4)
        masks.append(canvas.astype(bool))
    return ref.image, ref.window, np.stack(masks)


def draw_clip(seed: int, spec: ClipSpec, regime: str | None = None) -> Clip | None:
    """The clip of generator seed `seed`; None when the draw shows no usable region (the
    caller draws the next seed). `regime` None picks one with `spec.regime_weights`."""
    rng = np.random.default_rng([seed, 15])
    if regime is None:  # a one-frame clip has nothing to track after a mask prompt
        weights = np.array(spec.regime_weights) * [spec.frames > 1 or r != "mask"
                                                   for r in REGIMES]
        regime = str(rng.choice(REGIMES, p=weights / weights.sum()))
    elif regime == "mask" and spec.frames < 2:
        raise ValueError("a mask clip needs frames >= 2 (the masked frame is not scored)")
    artery = str(rng.choice(("left", "right")))
    dominance = str(rng.choice(("right", "left"), p=(0.85, 0.15)))
    look = "clinical" if rng.uniform() < 0.8 else "classic"
    frame_size = int(rng.choice((256, 384, 512)))
    fps = float(rng.choice((7.5, 15.0, 30.0), p=(0.2, 0.6, 0.2)))
    motion = Motion(rng.uniform(4, 40), rng.uniform(0, 20), rng.uniform(55, 100))
    available = segments_of(artery, dominance)
    total = 90  # frames of the whole run: fill, plateau and washout at any fps
    cfg = SequenceConfig(seed, total, frame_size, fps, None, artery, dominance, motion, None,
                         int(rng.integers(0, 3)), None, True, look)
    stride = int(rng.choice((1, 1, 2)))
    start = int(rng.integers(0, total - spec.frames * stride))
    indices = list(range(start, start + spec.frames * stride, stride))
    sequence = render_frames(cfg, indices)
    size = spec.image_size
    truth = [{n: _target(t.segments[n].mask(frame_size), size) for n in available}
             for t in sequence.truth]
    # regions: prompted ones must show on the prompt frame; mask-tracked ones too
    shown = [n for n in available if truth[0][n].sum() >= 4]
    if regime == "reference":
        shown = [n for n in available if any(t[n].sum() >= 4 for t in truth)]
    if not shown:
        return None
    count = int(rng.integers(1, min(MAX_REGIONS, len(shown)) + 1))
    regions = tuple(sorted((str(n) for n in rng.choice(shown, size=count, replace=False)),
                           key=available.index))
    aug = rng if spec.augment else None
    images = [_model_input(f, sequence.meta.window, size, aug) for f in sequence.frames]
    targets = [np.stack([t[n] for n in regions]) for t in truth]
    boxes: dict[int, np.ndarray] = {}
    masks: dict[int, np.ndarray] = {}
    supervised = [True] * len(images)
    if regime == "reference":
        image, window, ref_masks = _reference_masks(seed + 1, frame_size, artery, dominance,
                                                    regions, sequence.meta.view, look)
        images.insert(0, _model_input(image, window, size, aug))
        ref = np.stack([_target(m, size) for m in ref_masks])
        targets.insert(0, ref)
        masks[0] = ref
        supervised.insert(0, False)
        first = targets[1]
        if rng.uniform() < 0.75 and all(m.any() for m in first):  # the VLM answered
            boxes[1] = np.stack([jitter_box(_box_of(m), size, rng) for m in first])
    elif regime == "mask":
        masks[0] = targets[0]
        supervised[0] = False
    else:
        boxes[0] = np.stack([jitter_box(_box_of(m), size, rng) for m in targets[0]])
        later = [k for k in range(2, len(targets)) if all(m.any() for m in targets[k])]
        if later and rng.uniform() < 0.4:  # a keyframe re-prompt mid-clip
            k = int(rng.choice(later))
            boxes[k] = np.stack([jitter_box(_box_of(m), size, rng) for m in targets[k]])
    return Clip(regime, regions, np.stack(images), np.stack(targets), boxes, masks,
                np.array(supervised))


def clip_stream(first_seed: int, spec: ClipSpec, regime: str | None = None):
    """Clips of consecutive seeds from `first_seed` (skipping unusable draws), with the seed
    that comes next, so a resumed run continues the same stream."""
    seed = first_seed
    while True:
        clip = draw_clip(seed, spec, regime)
        seed += 1
        if clip is not None:
            yield clip, seed

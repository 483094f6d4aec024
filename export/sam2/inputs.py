"""Verification and calibration inputs for the SAM2 graphs: angiography frames, real prompts.

`CheckFrames` holds three consecutive frames and box prompts on the first; by default a synthetic
coronary cine (`rau_rt.synthetic.generate_sequence`, 512 px, frames taken after the contrast has
filled the tree, boxes of the largest segments). The generator is passed in by the caller
(`rau_rt.cli` wires it): export sits below synthetic in the layering (ARCHITECTURE.md rule 3).
The frames go through `ops.preprocess` (the runtime's preprocessing) and the eager graph
modules, driven the way `SAM2VideoPredictor` drives sam2
(notes/sam2_parity.md, section 2): frame 0 prompted with the boxes of the largest segments (no
memory, single mask with the stability fallback, binarized mask into memory), frames 1 and 2
tracked with the memory sam2 gathers (frame 0 as the conditioning frame, the tracked frames
before t). Every graph's example is what it sees in that loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rau_rt import ops
from rau_rt.errors import InputError
from rau_rt.sam2_layout import (
    CONDITIONING_TPOS,
    POOLED_MEMORY_ATTENTION,
    RECENT_POINTERS,
    WINDOWED_MEMORY_ATTENTION,
    window_index,
)

SOURCE_SIZE = 512  # ARCADE's native frame size
SEQUENCE_FRAMES = 16  # the tree is filled from about frame 9 with a one-frame contrast delay
CHECK_FRAMES = 3


@dataclass(frozen=True)
class CheckFrames:
    """Consecutive frames and box prompts on the first: what an export is verified on."""

    frames: np.ndarray  # (3, H, W) uint8 or uint16 gray
    boxes: np.ndarray  # (regions, 4) float32 x1 y1 x2 y2 in frame pixels, on frames[0]
    window: tuple[float, float] | None = None  # VOI (centre, width) of raw X-ray values

    def __post_init__(self) -> None:
        if self.frames.ndim != 3 or len(self.frames) != CHECK_FRAMES:
            raise InputError(f"check frames: expected ({CHECK_FRAMES}, H, W), got "
                             f"{self.frames.shape}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4 or not len(self.boxes):
            raise InputError(f"check boxes: expected (regions >= 1, 4), got {self.boxes.shape}")

    @classmethod
    def synthetic(cls, generate: Callable[..., object], regions: int = 2,
                  seed: int = 0) -> CheckFrames:
        """From `rau_rt.synthetic.generate_sequence` (`generate`): the last 3 of 16 frames."""
        sequence = generate(seed=seed, frames=SEQUENCE_FRAMES, size=SOURCE_SIZE,
                            contrast_delay_frames=1)
        first = SEQUENCE_FRAMES - CHECK_FRAMES
        truth = sequence.truth[first]
        boxes = sorted((s.box for s in truth.segments.values() if s.present and s.box),
                       key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        if len(boxes) < regions:
            raise InputError(f"the synthetic frame has {len(boxes)} visible segments, "
                             f"{regions} regions were asked for")
        return cls(sequence.frames[first:], np.asarray(boxes[:regions], dtype=np.float32),
                   tuple(sequence.meta.window))


@dataclass
class GraphInputs:
    """Per graph: the example the export is verified on, and calibration feeds (all frames)."""

    example: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    calibration: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def add(self, graph: str, feeds: dict[str, torch.Tensor], example: bool = False) -> None:
        # Contiguous like the NumPy arrays engines get: AOTInductor compiles for the example's
        # strides, and the decoder's high-res maps come out of conv_s0/s1 with other strides
        # (its masks were off by 0.13 when fed contiguous arrays).
        feeds = {name: t.contiguous() for name, t in feeds.items()}
        self.calibration.setdefault(graph, []).append(feeds)
        if example:
            self.example[graph] = feeds


def select_output(model: nn.Module, masks: torch.Tensor, iou: torch.Tensor,
                  pointers: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask and pointer sam2 keeps from the decoder's 4 tokens (the runtime's job).

    multimask (0 or 1 point: tracking, one click): the argmax-IoU mask of tokens 1-3 and its
    pointer. Otherwise (a box, several clicks): token 0 unless its stability (area above +0.05
    over area above -0.05) is under 0.98, then the argmax-IoU mask of tokens 1-3; the pointer
    is token 0 either way.
    """
    rows = torch.arange(masks.shape[0])
    best = iou[:, 1:].argmax(dim=1) + 1
    if multimask:
        return masks[rows, best][:, None], pointers[rows, best]
    decoder = model.sam_mask_decoder
    chosen = torch.zeros_like(best)
    if decoder.dynamic_multimask_via_stability:
        flat = masks[:, 0].flatten(1)
        delta = decoder.dynamic_multimask_stability_delta
        inner = (flat > delta).sum(dim=1).float()
        outer = (flat > -delta).sum(dim=1).float()
        stability = torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(inner))
        chosen = torch.where(stability >= decoder.dynamic_multimask_stability_thresh, chosen,
                             best)
    return masks[rows, chosen][:, None], pointers[:, 0]


def build_inputs(model: nn.Module, modules: dict[str, nn.Module],
                 check: CheckFrames) -> GraphInputs:
    """Drive the eager graphs over the 3 frames; collect every graph's feeds."""
    size = model.image_size
    images = [torch.from_numpy(ops.preprocess(frame, (size, size), window=check.window))[None]
              for frame in check.frames]
    height, width = check.frames.shape[1:]
    # sam2's predictor: box / [W, H] * image_size, as the 2 corners labelled 2 and 3
    scale = np.array([size / width, size / height] * 2, dtype=np.float32)
    coords = torch.from_numpy(check.boxes * scale).reshape(-1, 2, 2)
    regions = len(check.boxes)
    out = GraphInputs()
    n = regions
    low = size // 4
    t_diff_max = RECENT_POINTERS  # a stream longer than 16 frames: min(num_frames, 16) - 1
    memories: list[tuple[torch.Tensor, torch.Tensor]] = []  # per frame: (memory, memory_pos)
    pointers: list[torch.Tensor] = []  # per frame
    with torch.no_grad():
        for t, image in enumerate(images):
            encoded = modules["image_encoder"](image)
            hr0, hr1, features, pos, no_memory = encoded
            out.add("image_encoder", {"image": image}, example=t == 0)
            if t == 0:
                embed = no_memory.expand(n, -1, -1, -1).contiguous()
                point_coords = coords
                point_labels = torch.tensor([[2, 3]] * n, dtype=torch.int32)
            else:
                # sam2's gathering at frame t: frame 0 (conditioning, temporal row 6), then the
                # tracked frames 1 .. t-1 oldest first (frame j = t-k at row k-1); pointers:
                # frame 0 at offset t, then t-1, t-2, ... 1
                tracked = range(1, t)
                tpos = [CONDITIONING_TPOS] + [t - j - 1 for j in tracked]
                pointer_frames = [0, *range(t - 1, 0, -1)]
                feeds = {"current_features": features, "current_pos": pos,
                         "memory": torch.stack([memories[j][0] for j in (0, *tracked)], dim=1),
                         "memory_pos": torch.stack([memories[j][1] for j in (0, *tracked)],
                                                   dim=1),
                         "memory_tpos_index": torch.tensor([tpos] * n, dtype=torch.int64),
                         "object_pointers": torch.stack([pointers[j] for j in pointer_frames],
                                                        dim=1),
                         "pointer_position": torch.tensor(
                             [[(t - j) / t_diff_max for j in pointer_frames]] * n)}
                out.add("memory_attention", feeds, example=t == CHECK_FRAMES - 1)
                embed = modules["memory_attention"](*feeds.values())
                point_coords = torch.zeros(n, 1, 2)
                point_labels = torch.full((n, 1), -1, dtype=torch.int32)
            feeds = {"image_embed": embed, "high_res_0": hr0, "high_res_1": hr1,
                     "point_coords": point_coords, "point_labels": point_labels,
                     "mask_input": torch.zeros(n, 1, low, low),
                     "has_mask_input": torch.zeros(n, dtype=torch.bool)}
            out.add("mask_decoder", feeds, example=t == 0)
            masks, iou, ptrs, score = modules["mask_decoder"](*feeds.values())
            mask, ptr = select_output(model, masks, iou, ptrs, multimask=t > 0)
            # frame 1 checks both mask paths: region 0 binarized (as from prompts), others not
            binarize = torch.tensor([t == 0 or (t == 1 and i == 0) for i in range(n)])
            feeds = {"vision_features": features, "masks": mask, "object_score": score,
                     "binarize": binarize}
            out.add("memory_encoder", feeds, example=t == 1)
            memories.append(modules["memory_encoder"](*feeds.values()))
            pointers.append(ptr)
    # the pooled memory attention takes the same feeds (verified against its own eager pooling),
    # the windowed one the same plus each region's window, centred on its prompt box
    out.example[POOLED_MEMORY_ATTENTION] = out.example["memory_attention"]
    out.calibration[POOLED_MEMORY_ATTENTION] = out.calibration["memory_attention"]
    windows = torch.from_numpy(np.stack([window_index(
        box * scale / 16, size // 16) for box in check.boxes]))
    out.example[WINDOWED_MEMORY_ATTENTION] = {**out.example["memory_attention"],
                                              "window_index": windows}
    out.calibration[WINDOWED_MEMORY_ATTENTION] = [
        {**feeds, "window_index": windows} for feeds in out.calibration["memory_attention"]]
    return out


def to_numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Torch feeds -> contiguous NumPy arrays for an engine."""
    return {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in feeds.items()}

"""One clip through sam2's own per-frame step, the way rau-rt's tracker drives the graphs.

`run_clip` computes the image features of every frame once, then walks the frames with sam2's
`SAM2Base._track_step` and `_encode_memory_in_output` (what `SAM2Train.track_step` calls): a
box- or mask-prompted frame is a conditioning frame decoded without memory, any other frame is
tracked through memory attention over the conditioning frames and the recent ones. The model is
a plain sam2 model (`SAM2VideoPredictor`, the class `rau-rt export sam2` builds), so what is
trained here loads unchanged there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rau_rt.train.sam2_data import Clip


@dataclass
class FrameOutput:
    """Per frame: [N, M, S, S] mask logits (all tokens), [N, M] IoUs, [N, 1] object scores,
    [N, 1, S, S] the chosen mask's logits (what the tracker outputs)."""

    multimasks: torch.Tensor
    ious: torch.Tensor
    object_scores: torch.Tensor
    masks: torch.Tensor


def run_clip(model: torch.nn.Module, clip: Clip) -> list[FrameOutput]:
    """Every frame of `clip` through `model` (train or eval mode; gradients as the caller's)."""
    images = torch.from_numpy(clip.images)
    frames, regions = clip.targets.shape[:2]
    backbone = model.forward_image(images)
    _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    outputs = []
    for t in range(frames):
        index = torch.full((regions,), t, dtype=torch.long)
        current = [x[:, index] for x in feats]
        current_pos = [x[:, index] for x in pos]
        points = masks = None
        if t in clip.boxes:
            coords = torch.from_numpy(clip.boxes[t]).reshape(regions, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int32).repeat(regions, 1)
            points = {"point_coords": coords, "point_labels": labels}
        if t in clip.masks:
            masks = torch.from_numpy(clip.masks[t][:, None].astype(np.float32))
        conditioning = points is not None or masks is not None
        out, sam, _, _ = model._track_step(t, conditioning, current, current_pos, sizes, points,
                                           masks, memory, frames, False, None)
        _, high_multi, ious, _, high, pointer, scores = sam
        out["pred_masks_high_res"] = high
        out["obj_ptr"] = pointer
        model._encode_memory_in_output(current, sizes, points, True, high, scores, out)
        kind = "cond_frame_outputs" if conditioning else "non_cond_frame_outputs"
        memory[kind][t] = out
        outputs.append(FrameOutput(high_multi, ious, scores, high))
    return outputs

"""SAM2's training loss, as sam2's `training.loss_fns.MultiStepMultiMasksAndIous` computes it.

Weights 20 (focal) : 1 (dice) : 1 (IoU, L1, supervised on every mask token) : 1 (object score,
BCE), the values of sam2.1's training configs. With several mask tokens (a tracked frame) only
the token with the lowest focal + dice counts for the mask terms, as in sam2. Mask and IoU terms
count only objects present in the target; the object score learns presence.

sam2's wheel ships this loss, but importing `training.loss_fns` imports its trainer, which needs
tensorboard and tensordict; the recipe is a few lines, so it is written here over torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = {"mask": 20.0, "dice": 1.0, "iou": 1.0, "class": 1.0}
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def _focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss per mask token, mean over pixels: [N, M]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** FOCAL_GAMMA
    loss = loss * (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target))
    return loss.flatten(2).mean(-1)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice loss per mask token: [N, M]."""
    prob = logits.sigmoid().flatten(2)
    target = target.flatten(2)
    numerator = 2 * (prob * target).sum(-1)
    denominator = prob.sum(-1) + target.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def frame_loss(masks: torch.Tensor, ious: torch.Tensor, object_scores: torch.Tensor,
               target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms of one frame, summed over its N objects.

    Args:
        masks: [N, M, S, S] mask logits at the model's input size (M mask tokens).
        ious: [N, M] predicted IoUs.
        object_scores: [N, 1] object-score logits.
        target: [N, S, S] bool truth.
    """
    target = target[:, None].float().expand_as(masks)
    focal = _focal(masks, target)
    dice = _dice(masks, target)
    with torch.no_grad():
        hit = masks > 0
        truth = target > 0.5
        inter = (hit & truth).flatten(2).sum(-1).float()
        union = (hit | truth).flatten(2).sum(-1).float()
        actual = inter / union.clamp(min=1.0)
    iou = (ious - actual).abs()
    present = truth.flatten(1).any(-1).float()  # [N]
    if masks.shape[1] > 1:
        best = (focal * WEIGHTS["mask"] + dice * WEIGHTS["dice"]).argmin(dim=1, keepdim=True)
        focal, dice = focal.gather(1, best)[:, 0], dice.gather(1, best)[:, 0]
    else:
        focal, dice = focal[:, 0], dice[:, 0]
    iou = iou.mean(dim=1)
    score = F.binary_cross_entropy_with_logits(object_scores[:, 0], present, reduction="none")
    return {"mask": (focal * present).sum(), "dice": (dice * present).sum(),
            "iou": (iou * present).sum(), "class": score.sum()}


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(WEIGHTS[name] * value for name, value in terms.items())

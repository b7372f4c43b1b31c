"""SAM's training losses over valid pixels: focal + dice (or BCE + dice) + IoU-head MSE.

All losses take logits (B, H, W) or (B, M, H, W) and targets / valid bool (B, H, W) in the
256 target frame, and return one value per mask, shape logits.shape[:-2]. Pixels where
`valid` is False (the ignore region and the padding outside the image) contribute nothing.

Normalisation (sam2's `loss_fns.py`, restricted to valid pixels): focal and BCE are the mean
over the object's valid pixels; dice is 1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1) over valid pixels;
the batch loss is the mean over objects (sam2 sums and divides by the number of objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from stage2_decoder.metrics import binary_iou_batched

SINGLE_MASK = 0  # index of the single-mask output among the 4 mask tokens
MULTIMASK = slice(1, 4)  # indices of the multimask outputs


def _expand(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """targets / valid (B, H, W) broadcast against logits (B, H, W) or (B, M, H, W)."""
    return x.unsqueeze(1) if logits.dim() == x.dim() + 1 else x


def _valid_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    weight = valid.to(per_pixel.dtype)
    total = (per_pixel * weight).flatten(-2).sum(-1)
    return total / weight.flatten(-2).sum(-1).clamp(min=1.0)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet; α weighs positives), mean over valid pixels per mask."""
    valid = _expand(valid, logits)
    t = _expand(targets, logits).to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t.expand_as(logits), reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _valid_mean(loss, valid)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over valid pixels per mask."""
    t = _expand(targets, logits).to(logits.dtype).expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return _valid_mean(ce, _expand(valid, logits))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1) over valid pixels, p = sigmoid(logits)."""
    weight = _expand(valid, logits).to(logits.dtype)
    t = _expand(targets, logits).to(logits.dtype) * weight
    p = logits.sigmoid() * weight
    numerator = 2 * (p * t).flatten(-2).sum(-1)
    denominator = p.flatten(-2).sum(-1) + t.flatten(-2).sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def iou_of_logits(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with targets over valid pixels, per mask; no gradient.

    Both empty → 1.0 (see metrics.py; sam2 uses 0 there, a case training never meets since
    objects with an empty target are skipped).
    """
    with torch.no_grad():
        return binary_iou_batched(logits > 0, _expand(targets, logits), _expand(valid, logits))


@dataclass(frozen=True)
class LossOutput:
    """`loss` (scalar, mean over objects), `per_object` (B,), `chosen` (B,) mask index in 0..3
    that was backpropagated, `parts` unweighted means over objects (detached):
    `focal` or `bce`, `dice`, `iou_mse`, and `iou` (true IoU of the chosen mask)."""

    loss: torch.Tensor
    per_object: torch.Tensor
    chosen: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def candidate_masks(multimask: torch.Tensor) -> torch.Tensor:
    """(B, 4) bool: masks 1..3 for multimask objects, mask 0 for single-mask objects."""
    multi = multimask.view(-1, 1)
    index = torch.arange(4, device=multimask.device).view(1, 4)
    return torch.where(multi, index >= 1, index == SINGLE_MASK)


def sam_loss(
    low_res_logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    multimask: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    kind: Literal["focal_dice", "bce_dice"] = "focal_dice",
    supervise_all_iou: bool = True,
) -> LossOutput:
    """SAM's loss for one decoder call on B objects.

    Arguments:
      low_res_logits (B, 4, 256, 256), iou_predictions (B, 4): all 4 mask tokens (model.py).
      targets, valid (B, 256, 256) bool: target-frame masks and the pixels that count.
      multimask (B,) bool: the object was prompted for 3 masks (candidates 1..3, only the one
        with the lowest focal_weight·pixel + dice_weight·dice loss, chosen on detached values,
        is backpropagated) or 1 mask (candidate 0).
      focal_weight: weight of the per-pixel term (focal, or BCE when kind == "bce_dice";
        MedSAM-style fine-tunes use BCE + dice with weight 1 each).
      supervise_all_iou: MSE between the IoU head and the true IoU (detached) of every
        candidate mask (True, sam2 configs) or of the chosen mask only (False, SAM paper).
    """
    if kind not in ("focal_dice", "bce_dice"):
        raise ValueError(f"kind must be 'focal_dice' or 'bce_dice', got {kind!r}")
    if low_res_logits.dim() != 4 or low_res_logits.shape[1] != 4:
        raise ValueError(f"low_res_logits must be (B, 4, H, W), got {tuple(low_res_logits.shape)}")
    pixel_name = "focal" if kind == "focal_dice" else "bce"
    # Only masks that can be candidates are scored: mask 0 alone when no object is multimask
    # (every corrective iteration), masks 1..3 when all are. Same values, up to 4x less work.
    first, last = _candidate_span(multimask)
    logits = low_res_logits[:, first:last].float()  # losses in fp32 even under autocast / bf16
    if kind == "focal_dice":
        pixel = focal_loss(logits, targets, valid)  # (B, last - first)
    else:
        pixel = bce_loss(logits, targets, valid)
    dice = dice_loss(logits, targets, valid)
    candidates = candidate_masks(multimask)[:, first:last]
    combo = (focal_weight * pixel + dice_weight * dice).detach()
    chosen = combo.masked_fill(~candidates, float("inf")).argmin(dim=1)  # (B,) in first..last-1
    rows = torch.arange(chosen.shape[0], device=chosen.device)

    true_iou = iou_of_logits(logits, targets, valid)  # (B, last - first), detached
    squared = (iou_predictions[:, first:last].float() - true_iou) ** 2
    if supervise_all_iou:
        weight = candidates.to(squared.dtype)
        iou_mse = (squared * weight).sum(1) / weight.sum(1)
    else:
        iou_mse = squared[rows, chosen]

    pixel_c, dice_c = pixel[rows, chosen], dice[rows, chosen]
    per_object = focal_weight * pixel_c + dice_weight * dice_c + iou_weight * iou_mse
    parts = {
        pixel_name: pixel_c.detach().mean(),
        "dice": dice_c.detach().mean(),
        "iou_mse": iou_mse.detach().mean(),
        "iou": true_iou[rows, chosen].mean(),
    }
    return LossOutput(per_object.mean(), per_object, chosen + first, parts)


def _candidate_span(multimask: torch.Tensor) -> tuple[int, int]:
    """Masks first..last-1 hold every candidate: (0, 1) no multimask object, (1, 4) all
    multimask, else (0, 4)."""
    any_multi = bool(multimask.any())
    if not any_multi:
        return 0, 1
    return (1, 4) if bool(multimask.all()) else (0, 4)


def mask_for_next_iteration(
    low_res_logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    multimask: torch.Tensor,
    *,
    detach: bool = True,
) -> torch.Tensor:
    """The mask_input (B, 1, 256, 256) for the next interactive iteration.

    Multimask objects feed back the candidate (1..3) with the highest predicted IoU (SAM);
    single-mask objects feed back mask 0. Detached by default: each iteration's loss then
    backpropagates through that iteration's decoder call only.
    """
    best_multi = iou_predictions[:, MULTIMASK].argmax(dim=1) + 1
    index = torch.where(multimask, best_multi, torch.full_like(best_multi, SINGLE_MASK))
    rows = torch.arange(index.shape[0], device=index.device)
    mask = low_res_logits[rows, index].unsqueeze(1)
    return mask.detach() if detach else mask

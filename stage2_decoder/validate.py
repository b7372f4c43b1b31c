"""Validation during training: val loss and mIoU at the original resolution, deterministic.

Each val object is prompted twice, in one decoder call per batch:

- **1 click**: RITM's first click at the centre of the mask (``prompts.center_click``: maximum of
  the distance transform, ignore region excluded), multimask output, the mask with the highest
  predicted IoU kept (as SAM and SamPredictor users do for a single point);
- **box**: the exact box of the mask (the manifest's bbox), single-mask output.

Masks are ``postprocess_low_res`` of the 256 logits to the original frame, thresholded at 0,
and compared with the decoded ``rle`` outside ``ignore_rle`` (``metrics.binary_iou``). The val
loss is ``sam_loss`` of both prompts over the objects with a non-empty 256 target (training
skips the others); objects with no pixel outside the ignore region are left out of everything.

With several processes each rank validates its share of the val batches and ``reduce`` (the
run's ``Distributed.sum``) adds the sums of all ranks before the means are taken, so the result
is that of one process up to the order of float additions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from shared.transforms import coords_to_1024, postprocess_low_res
from stage2_decoder.dataset import ObjectBatch
from stage2_decoder.losses import mask_for_next_iteration, sam_loss
from stage2_decoder.metrics import binary_iou
from stage2_decoder.model import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_PAD, LABEL_POS, PromptableDecoder
from stage2_decoder.prompts import center_click
from stage2_decoder.step import autocast


@dataclass(frozen=True)
class ValResult:
    """Validation numbers; ``miou`` is the mean of the 1-click and box mIoU (the best-model key)."""

    val_loss: float
    miou_click: float
    miou_box: float
    n_objects: int
    n_skipped: int
    seconds: float

    @property
    def miou(self) -> float:
        return 0.5 * (self.miou_click + self.miou_box)

    def to_dict(self) -> dict[str, float]:
        return {
            "val_loss": self.val_loss, "miou": self.miou, "miou_click": self.miou_click,
            "miou_box": self.miou_box, "val_objects": self.n_objects,
            "val_skipped": self.n_skipped, "val_seconds": self.seconds,
        }  # fmt: skip


def _prompts(batch: ObjectBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coords (2K, 2, 2) 1024 frame, labels (2K, 2), kept object indices (K,)).

    Rows 0..K-1: the centre click then a -1 pad (Meta's point layout); rows K..2K-1: the box.
    """
    clicks, kept = [], []
    for index, mask in enumerate(batch.masks_orig):
        image = int(batch.image_index[index])
        try:
            x, y = center_click(mask.numpy(), batch.ignore_orig[image].numpy())
        except ValueError:  # no pixel outside the ignore region: nothing to evaluate
            continue
        xy = coords_to_1024(np.array([[x, y]], dtype=np.float64), batch.original_sizes[image])
        clicks.append(xy[0])
        kept.append(index)
    k = len(kept)
    keep = torch.tensor(kept, dtype=torch.int64)
    point = torch.zeros(k, 2, 2)
    point[:, 0] = torch.from_numpy(np.array(clicks, dtype=np.float32).reshape(k, 2))
    point_labels = torch.tensor([[LABEL_POS, LABEL_PAD]]).expand(k, 2)
    box = batch.boxes_1024[keep].view(k, 2, 2)
    box_labels = torch.tensor([[LABEL_BOX_TL, LABEL_BOX_BR]]).expand(k, 2)
    return torch.cat([point, box]), torch.cat([point_labels, box_labels]), keep


def _ious(batch: ObjectBatch, masks_256: torch.Tensor, keep: torch.Tensor) -> list[float]:
    """IoU at the original resolution of each kept object's mask; masks_256 (K, 1, 256, 256)."""
    ious = []
    for row, index in enumerate(keep.tolist()):
        image = int(batch.image_index[index])
        logits = postprocess_low_res(
            masks_256[row : row + 1].float(), batch.input_sizes[image], batch.original_sizes[image]
        )
        pred, ignore = (logits[0, 0] > 0).numpy(), batch.ignore_orig[image].numpy()
        ious.append(binary_iou(pred, batch.masks_orig[index].numpy(), ignore))
    return ious


@torch.no_grad()
def validate(
    model: PromptableDecoder,
    batches: Iterable[ObjectBatch],
    *,
    device: torch.device,
    precision: str = "fp32",
    loss_kind: str = "focal_dice",
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> ValResult:
    """Val loss and mIoU (1 click, box) over ``batches`` (ValBatches items); no randomness.

    ``reduce`` maps this process's sums to the sums over all processes (None: one process).
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    loss_sum, loss_count, click_ious, box_ious, skipped = 0.0, 0, [], [], 0
    for batch in batches:
        coords, labels, keep = _prompts(batch)
        skipped += batch.n_objects - len(keep)
        if len(keep) == 0:
            continue
        k = len(keep)
        image_index = batch.image_index[keep].repeat(2)
        multimask = torch.arange(2 * k) < k
        with autocast(device, precision):
            logits, iou_pred = model(
                batch.image_embeddings.to(device), image_index.to(device),
                coords.to(device), labels.to(device),
            )  # fmt: skip
        logits, iou_pred = logits.float().cpu(), iou_pred.float().cpu()
        chosen = mask_for_next_iteration(logits, iou_pred, multimask)  # (2K, 1, 256, 256)
        click_ious += _ious(batch, chosen[:k], keep)
        box_ious += _ious(batch, chosen[k:], keep)
        targets, valid = batch.targets[keep].repeat(2, 1, 1), batch.valid[keep].repeat(2, 1, 1)
        has_target = targets.flatten(1).any(dim=1)
        if has_target.any():
            out = sam_loss(
                logits[has_target], iou_pred[has_target], targets[has_target],
                valid[has_target], multimask[has_target], kind=loss_kind,
            )  # fmt: skip
            loss_sum += float(out.per_object.sum())
            loss_count += int(has_target.sum())
    model.train(was_training)
    sums = {"loss": loss_sum, "loss_count": loss_count, "click": float(np.sum(click_ious)),
            "box": float(np.sum(box_ious)), "n": len(click_ious), "skipped": skipped}  # fmt: skip
    if reduce is not None:
        sums = reduce(sums)
    n, nan = int(sums["n"]), float("nan")
    return ValResult(
        val_loss=sums["loss"] / sums["loss_count"] if sums["loss_count"] else nan,
        miou_click=sums["click"] / n if n else nan,
        miou_box=sums["box"] / n if n else nan,
        n_objects=n,
        n_skipped=int(sums["skipped"]),
        seconds=time.perf_counter() - start,
    )

"""Pure pieces of Meta's automatic mask generator (``segment_anything/utils/amg.py``), in torch.

``point_grid``, ``stability_score``, ``masks_to_boxes``, ``batched_nms`` (torchvision's
semantics, which Meta calls), ``remove_small_regions``, and ``resize_matrices``: Meta's
upsampling of low-res logits to the original frame as one matrix per axis. Each equals Meta's
(tests/test_amg.py).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from shared.cache_format import TARGET_SIZE
from shared.sam_models import IMAGE_SIZE


def point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) points evenly spaced in [0, 1]², x fastest (Meta's ``build_point_grid``)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of masks thresholded at threshold ± offset, per mask (…, H, W) → (…)."""
    inter = (logits > threshold + offset).sum((-1, -2), dtype=torch.int32)
    union = (logits > threshold - offset).sum((-1, -2), dtype=torch.int32)
    return inter / union


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (N, 4) int64 of bool masks (N, H, W), inclusive max; [0, 0, 0, 0] if empty."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # (N, H), (N, W)
    ys, xs = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    bottom = (rows * ys).amax(dim=-1)
    top = torch.where(rows, ys, h).amin(dim=-1)
    right = (cols * xs).amax(dim=-1)
    left = torch.where(cols, xs, w).amin(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(dim=-1)
    return boxes.masked_fill(empty.unsqueeze(-1), 0)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, categories: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS per category, as ``torchvision.ops.batched_nms``: kept indices by score.

    Boxes (N, 4) XYXY float; a box is dropped when its IoU with a kept, higher-scoring box of
    the same category is > ``iou_threshold``. Areas are (x1 - x0) · (y1 - y0) as torchvision's.
    Ties in score keep the input order (stable sort).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.float() + (categories.to(boxes) * (boxes.max() + 1)).unsqueeze(1)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    overlap = (inter / (areas[:, None] + areas[None, :] - inter) > iou_threshold).cpu().numpy()
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.int64, device=order.device)]


def remove_small_regions(mask: np.ndarray, area: float, mode: str) -> tuple[np.ndarray, bool]:
    """Meta's ``remove_small_regions``: fill holes / drop islands smaller than ``area`` px."""
    holes = mode == "holes"
    working = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def resize_matrices(
    input_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (H, 256), columns (256, W)): ``rows @ low_res @ columns`` = `postprocess_low_res`.

    Bilinear interpolation is separable and linear, so Meta's two resizes (256 → 1024, crop to
    ``input_size``, → ``original_size``) are one matrix per axis, found by resizing the identity
    the same way. Equal to `postprocess_low_res` to float rounding (~1e-7), and much cheaper.
    """
    matrices = []
    for crop, out in zip(input_size, original_size, strict=True):
        eye = torch.eye(TARGET_SIZE).unsqueeze(0)  # (1, 256, 256): one 1-D signal per row
        wide = F.interpolate(eye, IMAGE_SIZE, mode="linear", align_corners=False)[..., :crop]
        matrices.append(F.interpolate(wide, out, mode="linear", align_corners=False)[0])
    return matrices[0].T.contiguous(), matrices[1]

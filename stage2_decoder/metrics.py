"""Segmentation metrics: IoU (numpy at original resolution, torch batched) and NoC / mIoU@k.

Conventions: pixels in the ignore region count for neither prediction nor ground truth; the
IoU of two masks that are both empty (outside the ignore region) is 1.0 (nothing to find,
nothing found). NoC follows RITM: the number of clicks to reach an IoU threshold, capped at
`max_clicks` when it is never reached (RITM's `compute_noc_metric`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_CLICKS = (1, 2, 3, 5, 9)
DEFAULT_NOC_THRESHOLDS = (0.85, 0.90)


def binary_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two bool masks (H, W) in the original frame, ignore pixels excluded from both.

    Returns 1.0 when both masks are empty outside the ignore region.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred is {pred.shape} but gt is {gt.shape}; resize pred first")
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    if ignore is not None:
        keep = ~ignore.astype(bool)
        pred, gt = pred & keep, gt & keep
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def binary_iou_batched(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """IoU per mask of bool masks (..., H, W) → (...) float; invalid pixels excluded.

    `valid` (broadcastable to pred) is True where pixels count (the torch side speaks of the
    valid region: not ignore, not padding). Both empty → 1.0, as `binary_iou`.
    """
    if valid is not None:
        pred, gt = pred & valid, gt & valid
    inter = (pred & gt).flatten(-2).sum(-1).float()
    union = (pred | gt).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def noc(ious_per_click: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach IoU >= threshold (1-based), max_clicks if never (RITM).

    `ious_per_click[k]` is the IoU after click k + 1; only the first max_clicks count.
    """
    for k, iou in enumerate(list(ious_per_click)[:max_clicks]):
        if iou >= threshold:
            return k + 1
    return max_clicks


def _iou_at(ious_per_click: Sequence[float], clicks: int) -> float:
    """IoU after `clicks` clicks; a shorter sequence (evaluation stopped early) keeps its last."""
    if len(ious_per_click) == 0:
        raise ValueError("an object has no IoU values; evaluate at least one click")
    return float(ious_per_click[min(clicks, len(ious_per_click)) - 1])


def miou_at_clicks(
    ious: Sequence[Sequence[float]], clicks: Sequence[int] = DEFAULT_CLICKS
) -> dict[int, float]:
    """Mean IoU over objects after k clicks, for each k in clicks (SAM's 1, 2, 3, 5, 9)."""
    if len(ious) == 0:
        return {k: float("nan") for k in clicks}
    return {k: float(np.mean([_iou_at(seq, k) for seq in ious])) for k in clicks}


def summarize(
    ious: Sequence[Sequence[float]],
    *,
    clicks: Sequence[int] = DEFAULT_CLICKS,
    noc_thresholds: Sequence[float] = DEFAULT_NOC_THRESHOLDS,
    max_clicks: int = 20,
) -> dict[str, float]:
    """Interactive-segmentation summary of per-object IoU sequences.

    `ious[o][k]` is object o's IoU after click k + 1. Keys: `n_objects`, `miou@<k>` for k in
    clicks, `noc@<t>` (mean NoC, threshold t in percent, e.g. `noc@90`) and `nof@<t>` (objects
    that never reach t within max_clicks, RITM's "number of failures").
    """
    out: dict[str, float] = {"n_objects": float(len(ious))}
    for k, value in miou_at_clicks(ious, clicks).items():
        out[f"miou@{k}"] = value
    for threshold in noc_thresholds:
        name = f"{round(threshold * 100):d}"
        nocs = [noc(seq, threshold, max_clicks) for seq in ious]
        reached = [any(v >= threshold for v in list(seq)[:max_clicks]) for seq in ious]
        out[f"noc@{name}"] = float(np.mean(nocs)) if nocs else float("nan")
        out[f"nof@{name}"] = float(sum(not r for r in reached))
    return out

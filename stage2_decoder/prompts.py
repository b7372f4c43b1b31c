"""Prompt samplers: SAM's training prompts (torch, batched) and RITM eval clicks (numpy).

Training samplers work on a batch of B objects in the 256 target frame (`targets`, `valid`
bool (B, 256, 256); `valid` is False on the ignore region and on the padding) and return
prompts in the 1024 frame. All randomness goes through the `generator` argument, which must
live on the tensors' device. Every sampler draws the same random numbers whatever the data,
so a seed pins the whole prompt sequence.

Data parallelism: with `rows` (B,) and `rows_total`, the batch is the part of a micro-batch of
`rows_total` objects that one process holds, object k being row `rows[k]`. Every draw is then
made for all `rows_total` rows and indexed, so an object's random numbers depend on its row only,
not on which process holds it (rows None: the batch is the whole micro-batch, rows 0..B-1).

Target-frame pixel (x, y) covers the 1024-frame square [4x, 4x + 4) × [4y, 4y + 4); a point
sampled in it is placed uniformly inside that square: coords_1024 = (x + u) * 4, u ~ U[0, 1).

Prompt layouts follow Meta's predictor (see model.py): a point-only prompt is its points
then one -1 pad; a box is two points labelled 2 and 3; point + box is the points then the
corners. Rows are right-padded with -1 to the widest object of the batch.

Eval clicks (`center_click`, `next_click`) follow RITM's clicker at the original resolution.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from stage2_decoder.model import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_PAD

TARGET_TO_1024 = 4.0
_JITTER_MAX = TARGET_TO_1024 - 1.0 / 256.0  # exact in float32 up to 1024 + 4


def _uniform(
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> torch.Tensor:
    """U[0, 1) numbers of `shape` (B, ...); with `rows`, drawn for `rows_total` rows and indexed."""
    if rows is None:
        return torch.rand(shape, generator=generator, device=device)
    full = torch.rand((int(rows_total), *shape[1:]), generator=generator, device=device)
    return full[rows.to(device)]


def box_noise(
    boxes_1024: torch.Tensor,
    generator: torch.Generator,
    *,
    frac: float = 0.1,
    max_px: float = 20.0,
    image_hw: tuple[int, int] | torch.Tensor = (1024, 1024),
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> torch.Tensor:
    """Jitter XYXY boxes (B, 4) in the 1024 frame as sam2's `sample_box_points`.

    Each coordinate moves by an independent offset uniform in ±min(frac·side, max_px), side
    being the box width for x and height for y (SAM's paper says "std 10% of the side, at most
    20 px"; we follow the sam2 code, uniform). The result is clamped to
    [0, W - 1] × [0, H - 1] with (H, W) = `image_hw`: a pair for all boxes or a (B, 2) tensor,
    normally each object's input_size (the image part of the 1024 frame).
    """
    boxes = boxes_1024.float()
    u = _uniform(tuple(boxes.shape), generator, boxes.device, rows, rows_total)
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
    bound = torch.clamp(side * frac, max=max_px).clamp(min=0.0).repeat(1, 2)  # (B, 4) x, y, x, y
    noisy = boxes + (2.0 * u - 1.0) * bound
    hw = torch.as_tensor(image_hw, dtype=boxes.dtype, device=boxes.device).reshape(-1, 2)
    upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1) - 1.0
    return torch.minimum(noisy.clamp(min=0.0), upper)


def _erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion with a (2r+1)² square; outside the frame counts as foreground."""
    inverse = (~masks).float().unsqueeze(1)
    grown = F.max_pool2d(inverse, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown.squeeze(1) < 0.5


def _sample_pixels(
    weights: torch.Tensor,
    n: int,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n pixels per row, uniformly among True pixels of weights (B, H, W), with replacement.

    Returns coords_1024 (B, n, 2) float, the target pixels xy (B, n, 2) long and found (B,)
    bool. Rows with no True pixel get (0, 0) and found False; they draw from a uniform row so
    that the random stream stays aligned whatever the data. A pixel is the inverse of the
    cumulative count of True pixels at u·count, u ~ U[0, 1) (exact integer counts).
    """
    batch, h, w = weights.shape
    flat = weights.reshape(batch, h * w)
    found = flat.any(dim=1)
    if n == 0:
        empty = torch.zeros(batch, 0, 2, device=weights.device)
        return empty, empty.long(), found
    counts = torch.where(found.unsqueeze(1), flat, torch.ones_like(flat)).cumsum(dim=1)
    u = _uniform((batch, n), generator, weights.device, rows, rows_total)
    jitter = _uniform((batch, n, 2), generator, weights.device, rows, rows_total)
    total = counts[:, -1:]
    rank = torch.minimum((u * total).long(), total - 1)  # (B, n): the rank-th True pixel
    index = torch.searchsorted(counts, rank, right=True)
    xy = torch.stack([index % w, index // w], dim=-1) * found.view(-1, 1, 1)
    # (x + u) * 4 in the 1024 frame; the cap keeps float rounding inside the 4x4 square.
    coords = xy * TARGET_TO_1024 + torch.clamp(jitter * TARGET_TO_1024, max=_JITTER_MAX)
    return coords * found.view(-1, 1, 1), xy, found


def sample_points_from_mask(
    masks: torch.Tensor, n: int, generator: torch.Generator, *, erode: int = 0
) -> torch.Tensor:
    """n points per object, uniformly from masks (B, 256, 256) bool, as coords_1024 (B, n, 2).

    With erode > 0 the mask is first eroded by that many target pixels (keeps points off the
    boundary); objects whose eroded mask is empty fall back to the whole mask. Objects with an
    empty mask get (0, 0); callers skip empty targets.
    """
    if erode > 0:
        eroded = _erode(masks, erode)
        keep = eroded.flatten(1).any(dim=1).view(-1, 1, 1)
        masks = torch.where(keep, eroded, masks)
    return _sample_pixels(masks, n, generator)[0]


def _point_rows(
    targets: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    n_pos: int,
    n_neg: int,
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n_pos positives from targets, n_neg negatives from valid & ~targets (label -1 if none)."""
    batch = targets.shape[0]
    device = targets.device
    pos, _, pos_found = _sample_pixels(targets & valid, n_pos, generator, rows, rows_total)
    neg, _, neg_found = _sample_pixels(valid & ~targets, n_neg, generator, rows, rows_total)
    pos_labels = torch.where(pos_found, 1, LABEL_PAD).view(-1, 1).expand(batch, n_pos)
    neg_labels = torch.where(neg_found, 0, LABEL_PAD).view(-1, 1).expand(batch, n_neg)
    coords = torch.cat([pos, neg], dim=1)
    labels = torch.cat([pos_labels, neg_labels], dim=1).to(device=device, dtype=torch.long)
    return coords, labels


def _pad(coords: torch.Tensor, labels: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    extra = width - coords.shape[1]
    return (
        F.pad(coords, (0, 0, 0, extra)),
        F.pad(labels, (0, extra), value=LABEL_PAD),
    )


def sample_first_prompts(
    targets: torch.Tensor,
    valid: torch.Tensor,
    boxes_1024: torch.Tensor | None,
    generator: torch.Generator,
    *,
    mode: Literal["point", "box", "point,box"],
    n_pos: int = 1,
    n_neg: int = 0,
    p_box: float = 0.5,
    p_both: float = 0.0,
    input_size: tuple[int, int] | torch.Tensor = (1024, 1024),
    box_frac: float = 0.1,
    box_max_px: float = 20.0,
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's first prompt for each of B objects (`rows`, `rows_total`: see the module docstring).

    Arguments:
      targets, valid (B, 256, 256) bool: target-frame masks and their valid pixels.
      boxes_1024 (B, 4) XYXY in the 1024 frame (needed unless mode == "point"); jittered with
        `box_noise` (bounded by `input_size`, (H, W) or (B, 2)).
      mode: "point" (n_pos positives + n_neg negatives, then one -1 pad), "box" (noisy box),
        "point,box" (per object: box with probability p_box, points + box with probability
        p_both, points otherwise). Defaults p_box 0.5, p_both 0 are SAM's recipe (50% one
        point, 50% box); point + box combinations still arise from the corrective clicks added
        after a box.

    Returns:
      point_coords (B, N, 2) coords_1024, point_labels (B, N) long (1, 0, 2, 3, -1 pad),
      multimask (B,) bool: True where the prompt is exactly one point and no box (SAM's rule
      for ambiguous prompts).
    """
    if mode not in ("point", "box", "point,box"):
        raise ValueError(f"mode must be 'point', 'box' or 'point,box', got {mode!r}")
    if n_pos + n_neg < 1 and mode != "box":
        raise ValueError(f"need at least one point, got n_pos={n_pos}, n_neg={n_neg}")
    batch, device = targets.shape[0], targets.device
    kind = _uniform((batch,), generator, device, rows, rows_total)  # drawn in every mode
    points, point_labels = _point_rows(targets, valid, generator, n_pos, n_neg, rows, rows_total)
    n_real = (point_labels != LABEL_PAD).sum(dim=1)
    if mode == "point":
        coords, labels = _pad(points, point_labels, n_pos + n_neg + 1)
        return coords, labels, n_real == 1
    if boxes_1024 is None:
        raise ValueError(f"mode {mode!r} needs boxes_1024")
    noisy = box_noise(
        boxes_1024, generator, frac=box_frac, max_px=box_max_px, image_hw=input_size,
        rows=rows, rows_total=rows_total,
    )  # fmt: skip
    corners = noisy.view(batch, 2, 2)
    corner_labels = torch.tensor([LABEL_BOX_TL, LABEL_BOX_BR], device=device).expand(batch, 2)
    if mode == "box":
        return corners, corner_labels.clone(), torch.zeros(batch, dtype=torch.bool, device=device)

    use_box = kind < p_box + p_both
    use_points = kind >= p_box
    n_points = n_pos + n_neg
    width = max(n_points + 1, 2) if p_both <= 0.0 else n_points + 2
    # Slots: [points (n_points)] [box corners (2)], then packed left by a stable sort.
    coords = torch.cat([points, corners], dim=1)
    labels = torch.cat([point_labels, corner_labels], dim=1)
    labels[:, :n_points] = torch.where(use_points.view(-1, 1), labels[:, :n_points], LABEL_PAD)
    labels[:, n_points:] = torch.where(use_box.view(-1, 1), labels[:, n_points:], LABEL_PAD)
    order = torch.sort((labels == LABEL_PAD).long(), dim=1, stable=True).indices
    labels = torch.gather(labels, 1, order)[:, :width]
    coords = torch.gather(coords, 1, order.unsqueeze(-1).expand(-1, -1, 2))[:, :width]
    coords = coords * (labels != LABEL_PAD).unsqueeze(-1)
    coords, labels = _pad(coords, labels, width)
    multimask = use_points & ~use_box & (n_real == 1)
    return coords, labels, multimask


def sample_error_clicks(
    pred: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    rows_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per object, uniformly from its error region (SAM / sam2).

    pred, targets, valid (B, 256, 256) bool. The error region is (pred xor targets) & valid;
    the click is positive (1) on a false negative, negative (0) on a false positive. Objects
    with no error get label -1 (padding) at (0, 0).

    Returns coords_1024 (B, 1, 2) and point_labels (B, 1) long.
    """
    errors = (pred ^ targets) & valid
    coords, xy, found = _sample_pixels(errors, 1, generator, rows, rows_total)
    batch = torch.arange(targets.shape[0], device=targets.device)
    is_fn = targets[batch, xy[:, 0, 1], xy[:, 0, 0]]
    labels = torch.where(found, is_fn.long(), LABEL_PAD)
    return coords, labels.view(-1, 1)


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """L2 distance of each True pixel to the nearest False pixel or to the image border."""
    padded = np.pad(region.astype(np.uint8), 1, mode="constant")
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    *,
    exclude: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """RITM's next click at the original resolution: (x, y, label).

    False negatives (gt & ~pred) and false positives (pred & ~gt), both outside `ignore`, are
    distance-transformed (cv2, L2, on the zero-padded map so the image border counts as
    boundary). The click goes to the deepest error pixel: the largest FN and FP regions are
    compared by their distance-transform maximum (the radius of their largest inscribed
    disc); positive (1) if the FN maximum is strictly larger, else negative (0). Ties between
    pixels go to the first in raster order. `exclude` (bool HxW) marks pixels already clicked
    (RITM's not_clicked_map). With no error left the answer is (0, 0, -1), a padding point.
    """
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    keep = np.ones_like(gt) if ignore is None else ~ignore.astype(bool)
    if exclude is not None:
        keep = keep & ~exclude.astype(bool)
    fn_dt = _distance_inside(gt & ~pred & keep)
    fp_dt = _distance_inside(pred & ~gt & keep)
    fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
    if max(fn_max, fp_max) <= 0.0:
        return 0, 0, LABEL_PAD
    positive = fn_max > fp_max
    dt, best = (fn_dt, fn_max) if positive else (fp_dt, fp_max)
    ys, xs = np.nonzero(dt == best)
    return int(xs[0]), int(ys[0]), int(positive)


def center_click(mask: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """RITM's first click (x, y): the maximum of the distance transform of mask (H, W) bool.

    Same as `next_click` with an empty prediction. Raises ValueError for an empty mask.
    """
    x, y, label = next_click(np.zeros_like(mask, dtype=bool), mask, ignore)
    if label != 1:
        raise ValueError("mask has no pixel outside the ignore region; skip this object")
    return x, y

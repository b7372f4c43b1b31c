"""`decoder amg`: "segment everything" as Meta's ``SamAutomaticMaskGenerator``, from the cache.

Same steps and numbers as Meta's generator with ``crop_n_layers=0`` (one crop: the whole image):
a ``points_per_side``² grid of single foreground points, decoded ``points_per_batch`` at a time
with multimask output (3 masks per point) and upsampled to the original frame; masks kept when
the predicted IoU > ``pred_iou_thresh`` and the stability score (IoU of the masks thresholded at
±``stability_score_offset``) >= ``stability_score_thresh``; boxes of the thresholded masks; box
NMS at ``box_nms_thresh`` (greedy, by predicted IoU); then, when ``min_mask_region_area`` > 0,
Meta's small-region removal (holes, then islands, 8-connectivity, OpenCV) and a second NMS that
prefers unchanged masks, at max(``box_nms_thresh``, 0.7 = Meta's default ``crop_nms_thresh``).

Not supported: crops (``crop_n_layers`` > 0 and the crop_* options) need embeddings of image
crops, which the cache does not hold (it holds one embedding per whole image), so they are
refused; ``point_grids`` (custom grids) and output modes other than COCO RLE are not offered.
The edge filter of Meta's crops (``is_box_near_crop_edge``) never fires for the whole-image crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
import torch
import typer
from pycocotools import mask as mask_utils

from shared.cache_io import ok_rows, read_embedding_rows
from shared.output_folders import claim_output_folder
from shared.transforms import coords_to_1024, postprocess_low_res
from stage2_decoder import checkpoints as ck
from stage2_decoder.export import load_models
from stage2_decoder.model import LABEL_PAD, LABEL_POS, PromptableDecoder
from stage2_decoder.predict import RECORD_COLUMNS
from stage2_decoder.prompt_files import ImageIds, safe_relative
from stage2_decoder.setup import resolve_device
from stage2_decoder.visualize import overlay, read_image_rgb, write_png

CROP_NMS_THRESH = 0.7  # Meta's default; used by its small-region NMS even without crops
UPSAMPLE_POINTS = 8  # points whose 3 masks are upsampled to the original frame at once


@dataclass(frozen=True)
class AmgConfig:
    """Meta's ``SamAutomaticMaskGenerator`` options that work from a cached embedding."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    crop_n_layers: int = 0

    def __post_init__(self) -> None:
        if self.crop_n_layers != 0:
            raise ValueError(
                f"--crop-n-layers {self.crop_n_layers}: crops need embeddings of image crops, "
                "which the cache does not hold; use 0 (or Meta's SamAutomaticMaskGenerator)"
            )
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("--points-per-side and --points-per-batch must be >= 1")
        if self.min_mask_region_area < 0:
            raise ValueError(
                f"--min-mask-region-area must be >= 0, got {self.min_mask_region_area}"
            )


# --------------------------------------------------------------------------- pieces (Meta's)


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


# --------------------------------------------------------------------------- the generator


@dataclass
class _Masks:
    """Masks that survived so far: bool (N, H, W), predicted IoU, stability, points, boxes."""

    masks: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    boxes: torch.Tensor

    def take(self, keep: torch.Tensor) -> _Masks:
        return _Masks(*(getattr(self, f)[keep] for f in _FIELDS))


_FIELDS = ("masks", "iou", "stability", "points", "boxes")


def _batch(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    points: np.ndarray,
    sizes: tuple[tuple[int, int], tuple[int, int]],
    config: AmgConfig,
) -> _Masks:
    """Meta's ``_process_batch`` for points (P, 2) in the original frame.

    The upsampling to the original frame runs ``UPSAMPLE_POINTS`` points at a time (Meta does a
    whole batch at once); every mask is computed the same way, so the results are identical.
    """
    input_size, original_size = sizes
    device = embedding.device
    coords = np.zeros((len(points), 2, 2), np.float32)
    coords[:, 0] = coords_to_1024(points, original_size)
    labels = torch.tensor([[LABEL_POS, LABEL_PAD]], device=device).expand(len(points), 2)
    index = torch.zeros(len(points), dtype=torch.int64, device=device)
    low_res, iou = model(embedding, index, torch.from_numpy(coords).to(device), labels)
    parts = []
    for start in range(0, len(points), UPSAMPLE_POINTS):
        rows = slice(start, start + UPSAMPLE_POINTS)
        parts.append(_filter(low_res[rows, 1:], iou[rows, 1:], points[rows], sizes, config))
    return _Masks(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))


def _filter(
    low_res: torch.Tensor,
    iou: torch.Tensor,
    points: np.ndarray,
    sizes: tuple[tuple[int, int], tuple[int, int]],
    config: AmgConfig,
) -> _Masks:
    """Upsample (P, 3) multimask logits, filter by predicted IoU and stability, box them."""
    logits = postprocess_low_res(low_res.float(), *sizes).flatten(0, 1)
    iou = iou.float().flatten()
    repeated = torch.from_numpy(np.repeat(points, 3, axis=0))
    if config.pred_iou_thresh > 0:
        keep = iou > config.pred_iou_thresh
        logits, iou, repeated = logits[keep], iou[keep], repeated[keep.cpu()]
    stability = stability_score(logits, 0.0, config.stability_score_offset)
    if config.stability_score_thresh > 0:
        keep = stability >= config.stability_score_thresh
        logits, iou, stability = logits[keep], iou[keep], stability[keep]
        repeated = repeated[keep.cpu()]
    masks = logits > 0
    return _Masks(masks.cpu(), iou.cpu(), stability.cpu(), repeated, masks_to_boxes(masks).cpu())


def _small_regions(found: _Masks, config: AmgConfig) -> _Masks:
    """Meta's ``postprocess_small_regions``: clean masks, re-box, NMS preferring unchanged."""
    masks, scores = [], []
    for mask in found.masks.numpy():
        mask, changed_holes = remove_small_regions(mask, config.min_mask_region_area, "holes")
        mask, changed_islands = remove_small_regions(mask, config.min_mask_region_area, "islands")
        masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
        scores.append(float(not (changed_holes or changed_islands)))
    cleaned = torch.stack(masks) if masks else found.masks
    boxes = masks_to_boxes(cleaned)
    threshold = max(config.box_nms_thresh, CROP_NMS_THRESH)
    keep = batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), threshold)
    return _Masks(cleaned, found.iou, found.stability, found.points, boxes).take(keep)


@torch.no_grad()
def generate(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    config: AmgConfig,
) -> list[dict[str, Any]]:
    """Meta's ``SamAutomaticMaskGenerator.generate`` records (segmentation as COCO RLE).

    embedding (1, 256, 64, 64) on the model's device. Each record: ``segmentation`` (COCO RLE
    with string counts), ``area``, ``bbox`` XYWH, ``predicted_iou``, ``point_coords``
    [[x, y]], ``stability_score``, ``crop_box`` (the whole image, XYWH).
    """
    height, width = original_size
    points = point_grid(config.points_per_side) * np.array([[width, height]])
    sizes, step = (input_size, original_size), config.points_per_batch
    parts = [
        _batch(model, embedding, points[start : start + step], sizes, config)
        for start in range(0, len(points), step)
    ]
    found = _Masks(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))
    zeros = torch.zeros(len(found.iou))
    found = found.take(batched_nms(found.boxes.float(), found.iou, zeros, config.box_nms_thresh))
    if config.min_mask_region_area > 0:
        found = _small_regions(found, config)
    return [_record(found, i, original_size) for i in range(len(found.iou))]


def _record(found: _Masks, i: int, original_size: tuple[int, int]) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(found.masks[i].numpy().astype(np.uint8)))
    x0, y0, x1, y1 = (float(v) for v in found.boxes[i])
    segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
    return {
        "segmentation": segmentation,
        "area": int(found.masks[i].sum()),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "predicted_iou": float(found.iou[i]),
        "point_coords": [[float(v) for v in found.points[i]]],
        "stability_score": float(found.stability[i]),
        "crop_box": [0.0, 0.0, float(original_size[1]), float(original_size[0])],
    }


# --------------------------------------------------------------------------- the command


def run_amg(
    cache: str,
    out: str | Path,
    config: AmgConfig,
    *,
    images: tuple[str, ...] = (),
    run: str | None = None,
    checkpoint: str | None = None,
    which: str = "best",
    device: str = "auto",
    overlays: bool = True,
) -> tuple[Path, int, int]:
    """Everything-mode masks of ``images`` (default: all) with the fine-tuned decoder of ``run``
    (else the cache's zero-shot one); writes ``amg_<model>.json`` (COCO results: image_id,
    category_id 0, segmentation RLE, score = predicted IoU, bbox, area, stability_score,
    point_coords) and ``overlays/<image_id>.png``. Returns (results path, images, masks)."""
    models = load_models(cache, run=run, checkpoint=checkpoint, which=which, zero_shot=run is None)
    name, model = next(reversed(models.decoders.items()))
    torch_device = resolve_device(device)
    model.to(torch_device)
    table = ok_rows(models.cache.location, RECORD_COLUMNS)
    ids = ImageIds(table.column("image_id").to_pylist())
    resolved = [ids.resolve(i) for i in images] if images else ids.ids
    unknown = [i for i, r in zip(images, resolved, strict=False) if r is None]
    if unknown:
        raise ids.unknown_error(unknown, "--images")
    names = {i: safe_relative(i) for i in resolved if i is not None}
    claim_output_folder(out, "decoder amg")  # inputs checked: now the folder
    records = {r["image_id"]: r for r in table.to_pylist() if r["image_id"] in names}
    results, n_masks = [], 0
    for image_id, relative in names.items():
        record = records[image_id]
        original = (record["original_height"], record["original_width"])
        embedding = torch.from_numpy(read_embedding_rows(models.cache, [record]))
        embedding = embedding.to(device=torch_device, dtype=torch.float32)
        input_size = (record["input_height"], record["input_width"])
        found = generate(model, embedding, input_size, original, config)
        n_masks += len(found)
        for r in found:
            results.append(
                {"image_id": image_id, "category_id": 0, "score": r["predicted_iou"], **r}
            )
        if overlays:
            image, note = read_image_rgb(record["path"], original, models.cache.attrs.max_pixels)
            masks = [mask_utils.decode(_bytes_rle(r["segmentation"])).astype(bool) for r in found]
            title = f"{image_id} {name.replace('_', '-')}: {len(found)} masks {note}".strip()
            write_png(Path(out) / "overlays" / f"{relative}.png", overlay(image, masks, [], title))
    path = ck.write_json(Path(out) / f"amg_{name}.json", results)
    return path, len(names), n_masks


def _bytes_rle(segmentation: dict[str, Any]) -> dict[str, Any]:
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}


def amg_command(
    cache: Annotated[str, typer.Option(help="Cache made by `embed run`.")],
    out: Annotated[Path, typer.Option(help="Folder for amg_<model>.json and overlays/.")],
    images: Annotated[str | None, typer.Option(help="Comma-separated image ids.")] = None,
    run: Annotated[Path | None, typer.Option(help="Fine-tuned decoder of this run.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="The cache's SAM checkpoint.")] = None,
    which: Annotated[str, typer.Option(help="best or last checkpoint of --run.")] = "best",
    points_per_side: Annotated[int, typer.Option(help="Grid of points_per_side² prompts.")] = 32,
    points_per_batch: Annotated[int, typer.Option(help="Prompts decoded together.")] = 64,
    pred_iou_thresh: Annotated[float, typer.Option(help="Keep predicted IoU above.")] = 0.88,
    stability_score_thresh: Annotated[float, typer.Option(help="Keep masks this stable.")] = 0.95,
    stability_score_offset: Annotated[float, typer.Option(help="Stability logit offset.")] = 1.0,
    box_nms_thresh: Annotated[float, typer.Option(help="Box IoU of duplicates (NMS).")] = 0.7,
    min_mask_region_area: Annotated[int, typer.Option(help="Remove holes/islands below (px).")] = 0,
    crop_n_layers: Annotated[int, typer.Option(help="0 only: no crop embeddings cached.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overlays: Annotated[bool, typer.Option(help="Draw overlay pictures.")] = True,
) -> None:
    """Segment everything (Meta's SamAutomaticMaskGenerator, no crops) from cached embeddings."""
    from rich.console import Console

    from stage2_decoder.cli import user_errors

    with user_errors():
        config = AmgConfig(
            points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area, crop_n_layers=crop_n_layers,
        )  # fmt: skip
        ids = tuple(i.strip() for i in (images or "").split(",") if i.strip())
        path, n_images, n_masks = run_amg(
            cache, out, config, images=ids, run=str(run) if run else None,
            checkpoint=str(checkpoint) if checkpoint else None, which=which, device=device,
            overlays=overlays,
        )  # fmt: skip
    Console().print(f"{path}: {n_masks} masks for {n_images} images", highlight=False)

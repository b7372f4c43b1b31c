"""`decoder amg`: "segment everything" as Meta's ``SamAutomaticMaskGenerator``, from the cache.

Same masks and numbers as Meta's generator with ``crop_n_layers=0`` (one crop: the whole
image): a ``points_per_side``² grid of single foreground points, decoded ``points_per_batch`` at
a time with multimask output (3 masks per point); masks kept when the predicted IoU >
``pred_iou_thresh`` and the stability score (IoU of the masks, upsampled to the original frame,
thresholded at ±``stability_score_offset``) >= ``stability_score_thresh``; boxes of the
thresholded masks; box
NMS at ``box_nms_thresh`` (greedy, by predicted IoU); then, when ``min_mask_region_area`` > 0,
Meta's small-region removal (holes, then islands, 8-connectivity, OpenCV) and a second NMS that
prefers unchanged masks, at max(``box_nms_thresh``, 0.7 = Meta's default ``crop_nms_thresh``).

Not supported: crops (``crop_n_layers`` > 0 and the crop_* options) need embeddings of image
crops, which the cache does not hold (it holds one embedding per whole image), so they are
refused; ``point_grids`` (custom grids) and output modes other than COCO RLE are not offered.
The edge filter of Meta's crops (``is_box_near_crop_edge``) never fires for the whole-image crop.

Faster than Meta's order of steps, same results: the transformer runs once per batch of points
with the image side shared (`grid_decoder.transform_points`); the predicted IoU needs no mask,
so low-res logits are made and upsampled (`amg_pieces.resize_matrices`, a few masks at a time)
only for masks above ``pred_iou_thresh``; kept masks are held as COCO RLE. `find_masks` also
counts what each filter dropped (`AmgStats`), which the command prints when nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from shared.cache_format import TARGET_SIZE
from shared.cache_io import ok_rows, read_embedding_rows
from shared.output_folders import claim_output_folder
from shared.transforms import coords_to_1024
from stage2_decoder import checkpoints as ck
from stage2_decoder.amg_pieces import (
    batched_nms,
    masks_to_boxes,
    point_grid,
    remove_small_regions,
    resize_matrices,
    stability_score,
)
from stage2_decoder.coco_ids import GROUND_TRUTH, coco_image_ids, ground_truth_coco
from stage2_decoder.export import Models, load_models
from stage2_decoder.grid_decoder import transform_points
from stage2_decoder.model import LABEL_PAD, LABEL_POS, PromptableDecoder
from stage2_decoder.predict import RECORD_COLUMNS
from stage2_decoder.prompt_files import ImageIds, safe_relative
from stage2_decoder.setup import resolve_device
from stage2_decoder.visualize import overlay, read_image_rgb, write_png

CROP_NMS_THRESH = 0.7  # Meta's default; used by its small-region NMS even without crops
LOGIT_POINTS = 16  # points whose low-res logits are computed at once (bounds memory)
UPSAMPLE_MASKS = 16  # masks upsampled to the original frame at once (bounds memory)


@dataclass(frozen=True)
class AmgConfig:
    """Meta's ``SamAutomaticMaskGenerator`` options that work from a cached embedding."""

    points_per_side: int = 32
    points_per_batch: int = 16  # Meta's default is 64; results do not depend on it (memory)
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


# --------------------------------------------------------------------------- the generator


@dataclass
class AmgStats:
    """Why candidate masks were dropped: counts over all points (3 masks each) of the images."""

    candidates: int = 0
    low_iou: int = 0  # predicted IoU <= pred_iou_thresh
    unstable: int = 0  # stability score < stability_score_thresh (of those above)
    duplicates: int = 0  # removed by the box NMS (and the small-region NMS)
    kept: int = 0
    best_iou: float = float("-inf")  # highest predicted IoU of any candidate
    best_stability: float = float("-inf")  # highest stability of those above the IoU filter

    def add(self, other: AmgStats) -> None:
        for name in ("candidates", "low_iou", "unstable", "duplicates", "kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.best_iou = max(self.best_iou, other.best_iou)
        self.best_stability = max(self.best_stability, other.best_stability)

    def dropped(self, config: AmgConfig) -> str:
        """``3072 predicted IoU <= 0.88 (best 0.09), 0 stability < 0.95, 0 duplicates``."""
        best_iou = f" (best {self.best_iou:.3f})" if self.candidates else ""
        stable = f" (best {self.best_stability:.3f})" if self.best_stability > -1 else ""
        return (
            f"{self.low_iou} predicted IoU <= {config.pred_iou_thresh:g}{best_iou}, "
            f"{self.unstable} stability < {config.stability_score_thresh:g}{stable}, "
            f"{self.duplicates} duplicates"
        )

    def why_none(self, config: AmgConfig) -> str:
        """One sentence for a result with no mask: what dropped the candidates, what to try."""
        if self.candidates == 0:
            return "no image was processed"
        return (
            f"none of {self.candidates} candidate masks was kept ({self.dropped(config)}); "
            "lower --pred-iou-thresh and/or --stability-score-thresh (a model with random "
            "weights, such as vit_tiny_random, predicts low IoUs)"
        )


@dataclass
class _Masks:
    """Masks that survived so far: COCO RLEs, predicted IoU, stability, points, boxes XYXY."""

    rles: list[dict[str, Any]]
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    boxes: torch.Tensor

    def take(self, keep: torch.Tensor) -> _Masks:
        rles = [self.rles[i] for i in keep.tolist()]
        return _Masks(rles, *(getattr(self, f)[keep] for f in _FIELDS))

    @staticmethod
    def cat(parts: list[_Masks]) -> _Masks:
        rles = [rle for p in parts for rle in p.rles]
        return _Masks(rles, *(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))


_FIELDS = ("iou", "stability", "points", "boxes")


def _batch(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    points: np.ndarray,
    resize: tuple[torch.Tensor, torch.Tensor],
    original_size: tuple[int, int],
    config: AmgConfig,
) -> tuple[_Masks, AmgStats]:
    """Meta's ``_process_batch`` for points (P, 2) in the original frame, in fewer steps.

    The transformer runs once for all P points (`transform_points`); the predicted-IoU filter
    needs no mask, so only the points with a mask above it get low-res logits, and only those
    masks are upsampled (``UPSAMPLE_MASKS`` at a time) for the stability score, which is
    Meta's at full resolution. Same masks and scores as Meta's order of steps.
    """
    device = embedding.device
    coords = np.zeros((len(points), 2, 2), np.float32)
    coords[:, 0] = coords_to_1024(points, original_size)
    labels = torch.tensor([[LABEL_POS, LABEL_PAD]], device=device).expand(len(points), 2)
    sparse = model.embed_points(torch.from_numpy(coords).to(device), labels)
    hs, keys = transform_points(model, embedding, sparse)
    iou = model.iou_predictions(hs)[:, 1:].float()  # (P, 3) multimask outputs
    stats = AmgStats(candidates=iou.numel(), best_iou=float(iou.max()))
    above = iou > config.pred_iou_thresh
    if config.pred_iou_thresh <= 0:  # Meta filters only with a positive threshold
        above = torch.ones_like(above)
    stats.low_iou = int((~above).sum())
    rows = above.any(dim=1).nonzero().flatten()
    logits = [
        model.mask_logits(hs[chunk], keys[chunk])[:, 1:][above[chunk]]
        for chunk in rows.split(LOGIT_POINTS)
        if len(chunk)
    ]  # (masks, 256, 256) point-major, as Meta's flattened batch
    low_res = torch.cat(logits) if logits else keys.new_zeros(0, TARGET_SIZE, TARGET_SIZE)
    point_of = torch.from_numpy(points).unsqueeze(1).expand(-1, 3, -1)
    found = _upsampled(low_res.float(), iou[above], point_of[above.cpu()], resize, config, stats)
    return found, stats


def _upsampled(
    low_res: torch.Tensor,
    iou: torch.Tensor,
    points: torch.Tensor,
    resize: tuple[torch.Tensor, torch.Tensor],
    config: AmgConfig,
    stats: AmgStats,
) -> _Masks:
    """Upsample low-res logits (M, 256, 256) a few at a time, filter by stability, box, RLE."""
    rows, columns = resize
    parts = []
    for start in range(0, len(low_res), UPSAMPLE_MASKS):
        part = slice(start, start + UPSAMPLE_MASKS)
        logits = rows @ low_res[part] @ columns  # (m, H, W) original frame
        stability = stability_score(logits, 0.0, config.stability_score_offset)
        stats.best_stability = max(stats.best_stability, float(stability.max()))
        keep = stability >= config.stability_score_thresh
        if config.stability_score_thresh <= 0:
            keep = torch.ones_like(keep)
        stats.unstable += int((~keep).sum())
        masks = logits[keep] > 0
        encoded = mask_utils.encode(_fortran_stack(masks))
        keep_cpu = keep.cpu()
        parts.append(_Masks(
            list(encoded), iou[part][keep].cpu(), stability[keep].cpu(),
            points[part][keep_cpu], masks_to_boxes(masks).cpu(),
        ))  # fmt: skip
    if not parts:
        empty = torch.zeros(0)
        return _Masks([], empty, empty, torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int64))
    return _Masks.cat(parts)


def _fortran_stack(masks: torch.Tensor) -> np.ndarray:
    """Bool masks (N, H, W) as the (H, W, N) Fortran-order uint8 array pycocotools encodes."""
    return np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def _small_regions(found: _Masks, config: AmgConfig) -> _Masks:
    """Meta's ``postprocess_small_regions``: clean masks, re-box, NMS preferring unchanged."""
    masks, scores = [], []
    for rle in found.rles:
        mask = mask_utils.decode(rle).astype(bool)
        mask, changed_holes = remove_small_regions(mask, config.min_mask_region_area, "holes")
        mask, changed_islands = remove_small_regions(mask, config.min_mask_region_area, "islands")
        masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
        scores.append(float(not (changed_holes or changed_islands)))
    if not masks:
        return found
    cleaned = torch.stack(masks)
    boxes = masks_to_boxes(cleaned)
    rles = list(mask_utils.encode(_fortran_stack(cleaned)))
    threshold = max(config.box_nms_thresh, CROP_NMS_THRESH)
    keep = batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), threshold)
    return _Masks(rles, found.iou, found.stability, found.points, boxes).take(keep)


@torch.no_grad()
def find_masks(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    config: AmgConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], AmgStats]:
    """`generate`'s records and why candidates were dropped; ``progress(points done)``."""
    height, width = original_size
    points = point_grid(config.points_per_side) * np.array([[width, height]])
    resize = tuple(m.to(embedding.device) for m in resize_matrices(input_size, original_size))
    embedding = embedding.to(model.mask_decoder.iou_token.weight.dtype)
    stats, parts = AmgStats(), []
    for start in range(0, len(points), config.points_per_batch):
        batch = points[start : start + config.points_per_batch]
        found, batch_stats = _batch(model, embedding, batch, resize, original_size, config)
        parts.append(found)
        stats.add(batch_stats)
        if progress is not None:
            progress(start + len(batch))
    found = _Masks.cat(parts)
    zeros = torch.zeros(len(found.iou))
    found = found.take(batched_nms(found.boxes.float(), found.iou, zeros, config.box_nms_thresh))
    if config.min_mask_region_area > 0:
        found = _small_regions(found, config)
    stats.kept = len(found.rles)
    stats.duplicates = stats.candidates - stats.low_iou - stats.unstable - stats.kept
    return [_record(found, i, original_size) for i in range(stats.kept)], stats


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
    return find_masks(model, embedding, input_size, original_size, config)[0]


def _record(found: _Masks, i: int, original_size: tuple[int, int]) -> dict[str, Any]:
    rle = found.rles[i]
    x0, y0, x1, y1 = (float(v) for v in found.boxes[i])
    segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
    return {
        "segmentation": segmentation,
        "area": int(mask_utils.area(rle)),
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, int, AmgStats]:
    """Everything-mode masks of ``images`` (default: all) with the fine-tuned decoder of ``run``
    (else the cache's zero-shot one); writes ``amg_<model>.json`` (COCO results: image_id,
    category_id 0, segmentation RLE, score = predicted IoU, bbox, area, stability_score,
    point_coords; image_id the integer id of `coco_image_ids`), ``gt_coco.json`` when the images
    have masks, and ``overlays/<image_id>.png``. ``progress(points done, points in all)``.
    Returns (results path, images, what was kept and dropped over all images)."""
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
    rows = table.to_pylist()
    records = {r["image_id"]: r for r in rows if r["image_id"] in names}
    coco_ids = coco_image_ids(rows)
    results, total = [], AmgStats()
    per_image = config.points_per_side**2

    def done(n: int, offset: int = 0) -> None:
        if progress is not None:
            progress(offset + n, per_image * len(names))

    for k, (image_id, relative) in enumerate(names.items()):
        done_here = partial(done, offset=k * per_image)
        found, stats = _one_image(models, model, records[image_id], config, torch_device, done_here)
        total.add(stats)
        coco_id = coco_ids[image_id]
        for r in found:
            results.append(
                {"image_id": coco_id, "category_id": 0, "score": r["predicted_iou"], **r}
            )
        if overlays:
            _write_overlay(Path(out) / "overlays" / f"{relative}.png", records[image_id], found,
                           models.cache.attrs.max_pixels,
                           f"{name.replace('_', '-')}: {_title_count(stats, config)}")  # fmt: skip
    path = ck.write_json(Path(out) / f"amg_{name}.json", results)
    annotated = [records[i] for i in names if records[i]["has_masks"]]
    if annotated:  # class-agnostic results: evaluate with COCOeval params.useCats = 0
        ck.write_json(Path(out) / GROUND_TRUTH, ground_truth_coco(annotated, coco_ids))
    return path, len(names), total


def _one_image(
    models: Models,
    model: PromptableDecoder,
    record: dict[str, Any],
    config: AmgConfig,
    device: torch.device,
    progress: Callable[[int], None] | None,
) -> tuple[list[dict[str, Any]], AmgStats]:
    original = (record["original_height"], record["original_width"])
    embedding = torch.from_numpy(read_embedding_rows(models.cache, [record]))
    embedding = embedding.to(device=device, dtype=torch.float32)
    input_size = (record["input_height"], record["input_width"])
    return find_masks(model, embedding, input_size, original, config, progress)


def _write_overlay(
    path: Path, record: dict[str, Any], found: list[dict[str, Any]], max_pixels: int, title: str
) -> None:
    original = (record["original_height"], record["original_width"])
    image, note = read_image_rgb(record["path"], original, max_pixels)
    masks = [mask_utils.decode(_bytes_rle(r["segmentation"])).astype(bool) for r in found]
    write_png(path, overlay(image, masks, [], f"{record['image_id']} {title} {note}".strip()))


def _title_count(stats: AmgStats, config: AmgConfig) -> str:
    """``12 masks``, or ``0 masks (3072/3072 pred. IoU <= 0.88, 0 stability < 0.95)``."""
    if stats.kept:
        return f"{stats.kept} masks"
    return (
        f"0 masks ({stats.low_iou}/{stats.candidates} pred. IoU <= {config.pred_iou_thresh:g}, "
        f"{stats.unstable} stability < {config.stability_score_thresh:g})"
    )


def _bytes_rle(segmentation: dict[str, Any]) -> dict[str, Any]:
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}

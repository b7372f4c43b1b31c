"""`decoder predict`: masks for given prompts on cached images, at the original resolution.

Prompts come from one source, all in the original frame (pixels of the image as displayed):

- the ground truth (default): one exact box per object, the manifest ``bbox`` XYWH as XYXY
  ``[x, y, x + w, y + h]`` (the box validation and `decoder eval` use);
- ``--boxes detections.json``: COCO detection results ``[{"image_id", "category_id",
  "bbox": [x, y, w, h], "score"}, ...]``, kept when ``score >= --score-threshold``. ``image_id``
  is matched to the manifest's ``image_id``: equal strings, or an integer equal to an all-digit
  id (``32`` ↔ ``"000032"``);
- ``--prompts prompts.json``: an object mapping image ids to a list of prompts, one mask each::

      {"000032": [{"points": [[120, 80], [200, 90]], "labels": [1, 0]},
                  {"box": [10, 20, 200, 180]},
                  {"points": [[50, 60]], "labels": [1], "box": [0, 0, 100, 100]}],
       "000033": {"points": [[30, 40]], "labels": [1], "boxes": [[5, 5, 90, 90]]}}

  A prompt has ``points`` [[x, y], ...] with ``labels`` (1 foreground, 0 background; all 1 when
  left out) and/or one ``box`` [x0, y0, x1, y1]. The object form of an image (``"000033"``) is
  a shorthand: its points (with labels) make one prompt and each of its ``boxes`` another.

Results (``results_<model>.json``, COCO results format) name images by the integer id of
``stage2_decoder.coco_ids`` (the ``--coco`` file's ids, else the digits of the image id, else a
stable index); with ground-truth prompts ``gt_coco.json`` (the same objects as a COCO ground
truth, same ids) is written beside them, so pycocotools' ``COCOeval`` runs on the two files as
they are. With ``--boxes`` / ``--prompts`` an entry keeps the image id as that file spelled it.

A prompt of exactly one point and no box is ambiguous: multimask output, the mask with the
highest predicted IoU is kept (Meta's advice for SamPredictor); any other prompt uses the
single-mask output. Prompts are laid out as Meta's prompt encoder does (points then one padding
point; box corners; points then corners), so the masks equal ``SamPredictor.predict``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from shared.cache_io import ok_rows, read_embedding_rows
from shared.output_folders import claim_output_folder
from shared.transforms import postprocess_low_res
from stage2_decoder import checkpoints as ck
from stage2_decoder.coco_ids import GROUND_TRUTH, coco_image_ids, ground_truth_coco
from stage2_decoder.export import Models, load_models
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.prompt_files import (
    ImageIds,
    Prompt,
    ground_truth_prompts,
    parse_detections_file,
    parse_prompts_file,
    safe_relative,
)
from stage2_decoder.setup import resolve_device
from stage2_decoder.visualize import (
    DrawnPrompt,
    overlay,
    read_image_rgb,
    side_by_side,
    write_mask_png,
    write_png,
)

UPSAMPLE_CHUNK = 16  # prompts upsampled to the original frame at once (bounds memory)
RECORD_COLUMNS = [
    "image_id", "row", "path", "original_height", "original_width", "input_height",
    "input_width", "has_masks", "objects", "embedding_checksum", "coco_image_id",
]  # fmt: skip


@dataclass
class Prediction:
    """A mask (H, W) bool in the original frame, its predicted IoU and low-res logits."""

    mask: np.ndarray
    predicted_iou: float
    low_res_logits: torch.Tensor


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_image(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    prompts: list[Prompt],
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> list[Prediction]:
    """Masks of one image's prompts; embedding (1, 256, 64, 64) on the model's device.

    Prompts with the same number of tokens share one decoder call (no extra padding, so each
    mask equals Meta's one-prompt call).
    """
    device = embedding.device
    results: list[Prediction | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    tokens = [p.tokens(original_size) for p in prompts]
    for i, (coords, _) in enumerate(tokens):
        groups.setdefault(len(coords), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), UPSAMPLE_CHUNK):
            chunk = members[start : start + UPSAMPLE_CHUNK]
            coords = torch.from_numpy(np.stack([tokens[i][0] for i in chunk])).to(device)
            labels = torch.from_numpy(np.stack([tokens[i][1] for i in chunk])).to(device)
            index = torch.zeros(len(chunk), dtype=torch.int64, device=device)
            logits, iou = model(embedding, index, coords, labels)
            multimask = torch.tensor([prompts[i].multimask for i in chunk], device=device)
            chosen, scores = select_masks(logits.float(), iou.float(), multimask)
            masks = postprocess_low_res(chosen, input_size, original_size) > 0
            for row, i in enumerate(chunk):
                results[i] = Prediction(
                    masks[row, 0].cpu().numpy(), float(scores[row]), chosen[row, 0].cpu()
                )
    return [r for r in results if r is not None]


def select_masks(
    low_res_logits: torch.Tensor, iou_predictions: torch.Tensor, multimask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask SamPredictor's user keeps: (logits (B, 1, 256, 256), predicted IoU (B,)).

    Rows with ``multimask`` take the multimask output (1..3) with the highest predicted IoU,
    the others the single-mask output 0 (Meta's ``multimask_output=False``).
    """
    best = iou_predictions[:, 1:4].argmax(dim=1) + 1
    index = torch.where(multimask, best, torch.zeros_like(best))
    rows = torch.arange(index.shape[0], device=index.device)
    return low_res_logits[rows, index].unsqueeze(1), iou_predictions[rows, index]


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class PredictConfig:
    """Options of `decoder predict` (see the module docstring for the prompt sources)."""

    cache: str
    out: str
    run: str | None = None
    checkpoint: str | None = None
    which: str = "best"
    images: tuple[str, ...] = ()
    boxes: str | None = None
    prompts: str | None = None
    score_threshold: float = 0.0
    compare: bool = False
    overlays: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.boxes and self.prompts:
            raise ValueError("give either --boxes or --prompts, not both")
        if self.compare and not self.run:
            raise ValueError("--compare puts zero-shot and fine-tuned side by side: pass --run")


@dataclass
class PredictSummary:
    images: int = 0
    masks: int = 0
    skipped: list[str] = field(default_factory=list)
    results: list[Path] = field(default_factory=list)
    bad_detections: list[str] = field(default_factory=list)  # "detection k: reason", skipped


def rle_result(mask: np.ndarray) -> tuple[dict[str, Any], list[float], int]:
    """(COCO compressed RLE dict, bbox XYWH, area) of a bool (H, W) mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    counts = rle["counts"].decode("ascii")
    return (
        {"size": [int(s) for s in rle["size"]], "counts": counts},
        bbox,
        int(mask_utils.area(rle)),
    )


def _select_images(config: PredictConfig, ids: ImageIds, prompts: dict | None) -> list[str]:
    if config.images:
        resolved = [ids.resolve(i) for i in config.images]
        unknown = [i for i, r in zip(config.images, resolved, strict=True) if r is None]
        if unknown:
            raise ids.unknown_error(unknown, "--images")
        return list(dict.fromkeys(r for r in resolved if r is not None))
    if prompts is not None:
        return [i for i in ids.ids if i in prompts]
    return ids.ids


def _drawn(prompt: Prompt) -> DrawnPrompt:
    return DrawnPrompt(prompt.points, prompt.labels, prompt.box)


def _result_entry(prompt: Prompt, coco_id: int, prediction: Prediction, k: int) -> dict[str, Any]:
    """A COCO result; ``image_id`` as the prompts file spelled it, else the integer COCO id."""
    segmentation, bbox, area = rle_result(prediction.mask)
    key = prompt.image_key if prompt.image_key is not None else coco_id
    score = prompt.score if prompt.score is not None else prediction.predicted_iou
    return {
        "image_id": key, "category_id": prompt.category_id, "segmentation": segmentation,
        "score": score, "bbox": bbox, "area": area, "predicted_iou": prediction.predicted_iou,
        "prompt_index": k,
    }  # fmt: skip


def run_predict(config: PredictConfig) -> PredictSummary:
    """Predict, then write masks, overlays and COCO results under ``config.out``."""
    models = load_models(
        config.cache, run=config.run, checkpoint=config.checkpoint, which=config.which,
        zero_shot=config.compare or not config.run,
    )  # fmt: skip
    device = resolve_device(config.device)
    models.to(device)
    table = ok_rows(models.cache.location, RECORD_COLUMNS)
    ids = ImageIds(table.column("image_id").to_pylist())
    given = None
    summary = PredictSummary()
    if config.prompts:
        given = parse_prompts_file(config.prompts, ids)
    elif config.boxes:
        given = parse_detections_file(
            config.boxes, ids, config.score_threshold, skipped=summary.bad_detections
        )
    chosen = _select_images(config, ids, given)
    out = Path(config.out)
    names = {image_id: safe_relative(image_id) for image_id in chosen}  # refuse before writing
    claim_output_folder(out, "decoder predict")  # inputs checked: now the folder
    rows = table.to_pylist()
    records = {r["image_id"]: r for r in rows if r["image_id"] in names}
    coco_ids = coco_image_ids(rows)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in models.decoders}
    for image_id in chosen:
        record = records[image_id]
        prompts = given.get(image_id, []) if given is not None else ground_truth_prompts(record)
        if not prompts:
            summary.skipped.append(image_id)
            continue
        where = (out, names[image_id], coco_ids[image_id])
        _predict_one(models, record, prompts, where, results, config, device)
        summary.images += 1
        summary.masks += len(prompts) * len(models.decoders)
    for name, entries in results.items():
        summary.results.append(ck.write_json(out / f"results_{name}.json", entries))
    if given is None:  # ground-truth prompts: the same ground truth as COCO, same image ids
        done = [records[i] for i in chosen if i not in summary.skipped]
        summary.results.append(ck.write_json(out / GROUND_TRUTH, ground_truth_coco(done, coco_ids)))
    return summary


def _predict_one(
    models: Models,
    record: dict[str, Any],
    prompts: list[Prompt],
    where: tuple[Path, PurePosixPath, int],
    results: dict[str, list[dict[str, Any]]],
    config: PredictConfig,
    device: torch.device,
) -> None:
    image_id = record["image_id"]
    out, name, coco_id = where
    original = (record["original_height"], record["original_width"])
    input_size = (record["input_height"], record["input_width"])
    embedding = torch.from_numpy(read_embedding_rows(models.cache, [record]))
    embedding = embedding.to(device=device, dtype=torch.float32)
    panels = []
    limit = models.cache.attrs.max_pixels
    image, note = read_image_rgb(record["path"], original, limit) if config.overlays else (None, "")
    for model_name, model in models.decoders.items():
        predictions = predict_image(model, embedding, prompts, input_size, original)
        for k, (prompt, prediction) in enumerate(zip(prompts, predictions, strict=True)):
            write_mask_png(out / "masks" / model_name / name / f"{k:03d}.png", prediction.mask)
            results[model_name].append(_result_entry(prompt, coco_id, prediction, k))
        if image is not None:
            title = f"{image_id} {model_name.replace('_', '-')}" + (f" ({note})" if note else "")
            masks = [p.mask for p in predictions]
            panels.append(overlay(image, masks, [_drawn(p) for p in prompts], title))
    if panels:
        write_png(out / "overlays" / name.with_name(name.name + ".png"), side_by_side(panels))

"""`decoder eval`: the zero-shot and the fine-tuned decoder on the same objects and prompts.

Everything is measured at the ORIGINAL image resolution: low-res logits → ``postprocess_low_res``
(Meta's ``Sam.postprocess_masks``) → threshold 0, IoU with the manifest's ``rle`` outside the
void region (``ignore_rle``). Objects with no pixel outside the void are skipped (counted).

Protocols, per object:

- **box**: the exact box (manifest ``bbox`` XYWH as XYXY ``[x, y, x + w, y + h]``), single-mask
  output. ``box_jitter`` > 0 moves each coordinate by a seeded uniform offset within
  ±min(jitter · side, 20 px) in the 1024 frame (``prompts.box_noise``), drawn once for all
  objects in order, so the boxes do not depend on batching and are the same for both models.
- **clicks** (SAM paper / RITM): click 1 at the object centre (maximum of the distance transform,
  ``prompts.center_click``); click k + 1 at the centre of the largest error region of the k-click
  mask (``prompts.next_click``: positive on a missed region, negative on a false one; pixels
  already clicked are excluded, as RITM's clicker does). As users drive ``SamPredictor``: click 1
  uses ``multimask_output=True`` and keeps the mask with the highest predicted IoU; later clicks
  pass all clicks so far plus the previous mask's low-res logits as ``mask_input`` and use the
  single-mask output. An object stops when no unclicked error pixel is left, once it reached the
  highest NoC threshold after the last reported click count, or after ``max_clicks`` (20): the
  reported numbers equal those of running all 20 clicks (the mIoU curve of the plot holds a
  stopped object's last IoU).

Reported: box mIoU, mIoU after 1, 2, 3, 5, 9 clicks, NoC@85 / NoC@90 (capped at 20) and the
number of objects never reaching them (``metrics.summarize``). Deterministic: no randomness but
the seeded box jitter. Objects of several images are decoded in one batch per click round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from shared.cache_io import Cache, ok_rows
from shared.transforms import boxes_to_1024, coords_to_1024, postprocess_low_res
from stage2_decoder.config import TrainConfig
from stage2_decoder.dataset import COLUMNS, DataError, ObjectBatch, ValBatches, load_split
from stage2_decoder.metrics import DEFAULT_CLICKS, DEFAULT_NOC_THRESHOLDS, binary_iou, summarize
from stage2_decoder.model import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_PAD, PromptableDecoder
from stage2_decoder.predict import select_masks
from stage2_decoder.prompts import box_noise, center_click, next_click
from stage2_decoder.step import autocast

SPLITS_HELP = "train, val, test (the manifest's split column, else the run's split) or all"


@dataclass(frozen=True)
class EvalConfig:
    """Options of `decoder eval`; validated on construction (errors name the option)."""

    cache: str
    out: str
    run: str | None = None
    checkpoint: str | None = None
    which: str = "best"
    split: str = "val"
    protocols: tuple[str, ...] = ("box", "clicks")
    clicks: tuple[int, ...] = DEFAULT_CLICKS
    max_clicks: int = 20
    noc_thresholds: tuple[float, ...] = DEFAULT_NOC_THRESHOLDS
    box_jitter: float = 0.0
    seed: int = 0
    images_per_batch: int = 16
    objects_per_call: int = 64
    device: str = "auto"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        bad = set(self.protocols) - {"box", "clicks"} or not self.protocols
        if bad:
            raise ValueError(f"--protocols {','.join(self.protocols)}: use box, clicks or both")
        if self.max_clicks < 1 or not self.clicks or min(self.clicks) < 1:
            raise ValueError("--clicks and --max-clicks must be >= 1")
        if max(self.clicks) > self.max_clicks:
            raise ValueError(f"--clicks {max(self.clicks)} exceeds --max-clicks {self.max_clicks}")
        if not all(0.0 < t <= 1.0 for t in self.noc_thresholds):
            raise ValueError(f"--noc thresholds must be in (0, 1], got {self.noc_thresholds}")
        if not 0.0 <= self.box_jitter < 1.0:
            raise ValueError(f"--box-jitter must be in [0, 1), got {self.box_jitter}")
        if self.images_per_batch < 1 or self.objects_per_call < 1:
            raise ValueError("--images-per-batch and --objects-per-call must be >= 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision {self.precision!r} is not one of fp32, bf16, fp16")
        if self.which not in ("best", "last"):
            raise ValueError(f"--which {self.which!r} is not one of best, last")
        object.__setattr__(self, "clicks", tuple(sorted(set(self.clicks))))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass
class ObjectResult:
    """One evaluated object: where it is, and per model its box IoU and IoU after each click."""

    image_id: str
    index: int  # position among the image's manifest objects
    instance_id: int
    category_id: int
    category: str
    area: int
    box_iou: dict[str, float] = field(default_factory=dict)
    click_ious: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- which objects


def select_images(
    cache: Cache, split: str, run_state: dict[str, Any] | None
) -> tuple[pa.Table, str]:
    """Manifest rows (``dataset.COLUMNS``) of the images to evaluate, and how they were chosen."""
    table = ok_rows(cache.location, COLUMNS)
    if table.num_rows == 0:
        raise DataError(f"{cache.name} holds no encoded images; run `embed run` first")
    table = table.filter(pc.fill_null(table.column("has_masks"), False))
    if table.num_rows == 0:
        raise DataError(
            f"{cache.name} was made without masks: nothing to compare with. Make it with "
            "`embed run --masks DIR` or `--coco FILE` (or a VOC layout) to evaluate"
        )
    splits = table.column("split").to_pylist()
    if split == "all":
        chosen, how = table, "every image with masks"
    elif split in splits:
        chosen = table.filter(pa.array([s == split for s in splits]))
        how = f"the manifest's split column ({split})"
    elif run_state is not None and split in ("train", "val"):
        config = TrainConfig.from_dict(run_state["config"])
        parts = load_split(str(cache.location.display), config.val_fraction, config.seed)
        chosen, how = getattr(parts, split), f"the run's {split} images ({parts.how})"
    else:
        found = sorted({s for s in splits if s}) or ["none"]
        raise DataError(
            f"--split {split}: {cache.name} names no {split} images (splits found: "
            f"{', '.join(found)}); pass --split all, or --run to use the run's own split"
        )
    chosen = chosen.filter(pc.greater(chosen.column("n_objects"), 0))
    if chosen.num_rows == 0:
        raise DataError(f"--split {split} of {cache.name} has no objects ({how}); try --split all")
    return chosen, how


def object_boxes_1024(images: pa.Table, jitter: float, seed: int) -> torch.Tensor:
    """Box prompts (n_objects, 4) XYXY in the 1024 frame, in manifest order, seeded jitter."""
    boxes, limits = [], []
    columns = ["original_height", "original_width", "input_height", "input_width", "objects"]
    for record in images.select(columns).to_pylist():
        original = (record["original_height"], record["original_width"])
        for obj in record["objects"]:
            x, y, w, h = obj["bbox"]
            boxes.append(boxes_to_1024(np.array([x, y, x + w, y + h], np.float64), original))
            limits.append((record["input_height"], record["input_width"]))
    exact = torch.from_numpy(np.array(boxes, np.float32).reshape(-1, 4))
    if jitter <= 0:
        return exact
    generator = torch.Generator().manual_seed(seed)
    hw = torch.tensor(limits, dtype=torch.float32).reshape(-1, 2)
    return box_noise(exact, generator, frac=jitter, max_px=20.0, image_hw=hw)


# --------------------------------------------------------------------------- protocols


def _masks_orig(batch: ObjectBatch, objects: list[int], logits: torch.Tensor) -> list[np.ndarray]:
    """Bool masks (H, W) in the original frame of ``objects``; logits (A, 1, 256, 256)."""
    out: list[np.ndarray | None] = [None] * len(objects)
    images: dict[int, list[int]] = {}
    for row, index in enumerate(objects):
        images.setdefault(int(batch.image_index[index]), []).append(row)
    for image, rows in images.items():
        up = postprocess_low_res(
            logits[rows].float(), batch.input_sizes[image], batch.original_sizes[image]
        )
        masks = (up[:, 0] > 0).cpu().numpy()
        for k, row in enumerate(rows):
            out[row] = masks[k]
    return [m for m in out if m is not None]


def _truth(batch: ObjectBatch, index: int) -> tuple[np.ndarray, np.ndarray]:
    image = int(batch.image_index[index])
    return batch.masks_orig[index].numpy(), batch.ignore_orig[image].numpy()


def box_protocol(
    model: PromptableDecoder,
    batch: ObjectBatch,
    objects: list[int],
    boxes_1024: torch.Tensor,
    embeddings: torch.Tensor,
) -> list[float]:
    """IoU of each object's single-mask output for its box (K, 4) XYXY coords_1024."""
    device = embeddings.device
    k = len(objects)
    labels = torch.tensor([[LABEL_BOX_TL, LABEL_BOX_BR]], device=device).expand(k, 2)
    index = batch.image_index[objects].to(device)
    logits, _ = model(embeddings, index, boxes_1024.view(k, 2, 2).to(device), labels)
    masks = _masks_orig(batch, objects, logits[:, :1])
    return [binary_iou(m, *_truth(batch, i)) for m, i in zip(masks, objects, strict=True)]


@dataclass
class _Clicker:
    """One object's clicks (x, y, label) in the original frame and its IoU after each."""

    gt: np.ndarray
    ignore: np.ndarray
    original_size: tuple[int, int]
    clicks: list[tuple[int, int, int]] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clicked = np.zeros_like(self.gt, dtype=bool)

    def add(self, x: int, y: int, label: int) -> None:
        self.clicks.append((x, y, label))
        self.clicked[y, x] = True

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Meta's layout for points only: the clicks in the 1024 frame, then one pad point."""
        xy = np.array([(x, y) for x, y, _ in self.clicks] + [(0, 0)], np.float64)
        coords = coords_to_1024(xy, self.original_size)
        coords[-1] = 0.0
        labels = np.array([label for _, _, label in self.clicks] + [LABEL_PAD], np.int64)
        return coords.astype(np.float32), labels


def click_protocol(
    model: PromptableDecoder,
    batch: ObjectBatch,
    objects: list[int],
    embeddings: torch.Tensor,
    config: EvalConfig,
) -> list[list[float]]:
    """IoU after each click for each object (see the module docstring); lists may end early."""
    device = embeddings.device
    clickers = []
    for index in objects:
        gt, ignore = _truth(batch, index)
        clicker = _Clicker(gt, ignore, batch.original_sizes[int(batch.image_index[index])])
        clicker.add(*center_click(gt, ignore), 1)
        clickers.append(clicker)
    previous = torch.zeros(len(objects), 1, 256, 256, device=device)
    active = list(range(len(objects)))
    for round_ in range(1, config.max_clicks + 1):
        tokens = [clickers[a].tokens() for a in active]
        coords = torch.from_numpy(np.stack([t[0] for t in tokens])).to(device)
        labels = torch.from_numpy(np.stack([t[1] for t in tokens])).to(device)
        index = batch.image_index[[objects[a] for a in active]].to(device)
        mask_input = previous[active] if round_ > 1 else None
        logits, iou = model(embeddings, index, coords, labels, mask_input=mask_input)
        multimask = torch.full((len(active),), round_ == 1, device=device)
        chosen, _ = select_masks(logits.float(), iou.float(), multimask)
        previous[active] = chosen
        masks = _masks_orig(batch, [objects[a] for a in active], chosen)
        active = [a for a, m in zip(active, masks, strict=True) if _step(clickers[a], m, config)]
        if not active:
            break
    return [c.ious for c in clickers]


def _step(clicker: _Clicker, mask: np.ndarray, config: EvalConfig) -> bool:
    """Record the IoU of ``mask``; add the next click and return True unless the object is done."""
    clicker.ious.append(binary_iou(mask, clicker.gt, clicker.ignore))
    rounds = len(clicker.ious)
    reached = max(clicker.ious) >= max(config.noc_thresholds)
    if rounds >= config.max_clicks or (reached and rounds >= max(config.clicks)):
        return False
    x, y, label = next_click(mask, clicker.gt, clicker.ignore, exclude=clicker.clicked)
    if label == LABEL_PAD:  # no error left: later clicks would change nothing
        return False
    clicker.add(x, y, label)
    return True


# --------------------------------------------------------------------------- the loop


def _evaluable(batch: ObjectBatch) -> list[int]:
    """Objects with at least one pixel outside the void region."""
    return [i for i in range(batch.n_objects) if (_truth(batch, i)[0] & ~_truth(batch, i)[1]).any()]


def _object_rows(images: pa.Table) -> list[dict[str, Any]]:
    rows = []
    for record in images.select(["image_id", "objects"]).to_pylist():
        for k, obj in enumerate(record["objects"]):
            fields = {key: obj[key] for key in ("instance_id", "category_id", "category", "area")}
            rows.append({"image_id": record["image_id"], "index": k, **fields})
    return rows


def _run_protocols(
    model: PromptableDecoder,
    name: str,
    batch: ObjectBatch,
    objects: list[int],
    boxes_1024: torch.Tensor,
    embeddings: torch.Tensor,
    config: EvalConfig,
    found: list[ObjectResult],
) -> None:
    """Fill ``found`` (one per object) with ``model``'s box IoU and click IoUs under ``name``."""
    if "box" in config.protocols:
        ious = box_protocol(model, batch, objects, boxes_1024, embeddings)
        for result, value in zip(found, ious, strict=True):
            result.box_iou[name] = value
    if "clicks" in config.protocols:
        sequences = click_protocol(model, batch, objects, embeddings, config)
        for result, sequence in zip(found, sequences, strict=True):
            result.click_ious[name] = sequence


@torch.no_grad()
def evaluate_objects(
    models: dict[str, PromptableDecoder],
    cache_path: str,
    images: pa.Table,
    config: EvalConfig,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[ObjectResult], int]:
    """Run the protocols with every model on every object; (results, objects skipped)."""
    boxes = object_boxes_1024(images, config.box_jitter, config.seed)
    meta = _object_rows(images)
    results, skipped, offset = [], 0, 0
    batches = ValBatches(cache_path, images, config.images_per_batch)
    for batch in (batches[i] for i in range(len(batches))):
        objects = _evaluable(batch)
        skipped += batch.n_objects - len(objects)
        embeddings = batch.image_embeddings.to(device)
        step = config.objects_per_call
        for chunk in (objects[s : s + step] for s in range(0, len(objects), step)):
            found = [ObjectResult(**meta[offset + i]) for i in chunk]
            own = boxes[[offset + i for i in chunk]]
            for name, model in models.items():
                with autocast(device, config.precision):
                    _run_protocols(model, name, batch, chunk, own, embeddings, config, found)
            results += found
        offset += batch.n_objects
        if progress is not None:
            progress(offset, len(meta))
    return results, skipped


def summarize_model(results: list[ObjectResult], name: str, config: EvalConfig) -> dict[str, float]:
    """Box mIoU and the interactive summary (mIoU@k, NoC, failures) of one model."""
    out: dict[str, float] = {"n_objects": float(len(results))}
    if "box" in config.protocols:
        out["box_miou"] = float(np.mean([r.box_iou[name] for r in results]))
    if "clicks" in config.protocols:
        ious = [r.click_ious[name] for r in results]
        thresholds, most = config.noc_thresholds, config.max_clicks
        out.update(
            summarize(ious, clicks=config.clicks, noc_thresholds=thresholds, max_clicks=most)
        )
    return out

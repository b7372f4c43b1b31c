"""Clicks to masks on one cached image, for `decoder serve`: no encoder, ever.

``Labeller`` holds the decoders (``export.load_models``), the cache's manifest rows (failed ones
too, for the image list) and a small LRU of the images in use: the embedding as a float32
channels-last tensor (the decoder makes it token-major without a copy) and the ground-truth
masks decoded once. Every decoder call runs under one lock (one image at a time, no thread
oversubscription).

A prompt is in the original frame (``prompt_files.Prompt``: points XY with labels 1/0, a box
XYXY) and is laid out as Meta's prompt encoder does. One point and no box is ambiguous: the
three multimask outputs are offered, each with its predicted IoU; any other prompt gives the
single-mask output (Meta's advice for ``SamPredictor``). Masks are upsampled to the original
frame exactly as ``Sam.postprocess_masks`` (``shared.transforms.postprocess_low_res``), only
the ones offered. No previous mask is fed back (``mask_input``): a prompt's masks depend on its
clicks alone, so redoing or undoing a click is exact.

"Label next" ranks unlabelled images by ``uncertainty``: 5 clicks (the centre and the centres
of the four quadrants), multimask, each decoder's kept mask scored by |predicted IoU − stability
score| (the IoU head disagreeing with how stable the logits are), averaged; with a run, plus the
mean 1 − IoU between the zero-shot and fine-tuned masks (the two decoders disagreeing). Higher
is more unsure.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from shared.cache_format import STATUS_OK
from shared.cache_io import read_embeddings, read_manifest
from shared.transforms import postprocess_low_res
from stage2_decoder.amg import stability_score
from stage2_decoder.export import Models
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.prompt_files import Prompt

LRU_IMAGES = 4  # embeddings (4 MiB each in float32) and GT masks kept in memory
STABILITY_OFFSET = 1.0  # Meta's AMG default
UNCERTAINTY_POINTS = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
LIST_COLUMNS = [
    "image_id", "row", "path", "status", "error", "split", "has_masks", "n_objects",
    "original_height", "original_width", "input_height", "input_width", "objects",
]  # fmt: skip


@dataclass
class Candidate:
    """One mask offered for a prompt: bool (H, W) original frame and its scores.

    ``index`` is the decoder's mask output (0 single-mask, 1..3 multimask).
    """

    mask: np.ndarray
    index: int
    predicted_iou: float
    stability: float


@dataclass
class LoadedImage:
    embedding: torch.Tensor  # (1, 256, 64, 64) float32, channels-last
    ground_truth: list[np.ndarray]  # bool (H, W) per object, manifest order


class Labeller:
    """The decoders and the cache, answering prompts on one image at a time."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.decoders: dict[str, PromptableDecoder] = models.decoders
        table = read_manifest(models.cache.location, LIST_COLUMNS)
        self.records: dict[str, dict[str, Any]] = {r["image_id"]: r for r in table.to_pylist()}
        self._loaded: OrderedDict[str, LoadedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._uncertainty: dict[str, float] = {}

    # ------------------------------------------------------------------ images

    def ok(self, image_id: str) -> bool:
        record = self.records.get(image_id)
        return record is not None and record["status"] == STATUS_OK

    def sizes(self, image_id: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(original_size, input_size), both (H, W)."""
        r = self.records[image_id]
        return (r["original_height"], r["original_width"]), (r["input_height"], r["input_width"])

    def load(self, image_id: str) -> LoadedImage:
        """The image's embedding and ground truth, from the LRU or the cache."""
        with self._lock:
            return self._load(image_id)

    def _load(self, image_id: str) -> LoadedImage:
        loaded = self._loaded.get(image_id)
        if loaded is not None:
            self._loaded.move_to_end(image_id)
            return loaded
        record = self.records[image_id]
        array = read_embeddings(self.models.cache.embeddings, [record["row"]])
        embedding = torch.from_numpy(array).float().contiguous(memory_format=torch.channels_last)
        original, _ = self.sizes(image_id)
        loaded = LoadedImage(embedding, [decode_rle(o["rle"], original) for o in
                                         record["objects"] or [] if o.get("rle")])  # fmt: skip
        self._loaded[image_id] = loaded
        while len(self._loaded) > LRU_IMAGES:
            self._loaded.popitem(last=False)
        return loaded

    # ------------------------------------------------------------------ prompts → masks

    def predict(
        self, image_id: str, prompt: Prompt, names: list[str] | None = None
    ) -> dict[str, list[Candidate]]:
        """The masks offered by each decoder (all by default) for one prompt."""
        original, input_size = self.sizes(image_id)
        with self._lock, torch.inference_mode():
            loaded = self._load(image_id)
            return {
                name: candidates(
                    self.decoders[name], loaded.embedding, prompt, input_size, original
                )  # fmt: skip
                for name in (names or list(self.decoders))
            }

    def ground_truth(self, image_id: str) -> list[np.ndarray]:
        return self.load(image_id).ground_truth

    # ------------------------------------------------------------------ label next

    def uncertainty(self, image_id: str) -> float:
        """How unsure the decoders are on this image (module docstring); cached."""
        if image_id in self._uncertainty:
            return self._uncertainty[image_id]
        original, input_size = self.sizes(image_id)
        height, width = original
        with self._lock, torch.inference_mode():
            embedding = self._load(image_id).embedding
            kept = {}
            for name, model in self.decoders.items():
                logits, gaps = [], []
                for fx, fy in UNCERTAINTY_POINTS:
                    prompt = Prompt(np.array([[fx * width, fy * height]]), np.array([1]))
                    low, iou = decode_low_res(model, embedding, prompt, original)
                    best = int(iou[1:].argmax()) + 1
                    stable = stability_score(low[best], 0.0, STABILITY_OFFSET)
                    gaps.append(abs(float(iou[best]) - float(stable.nan_to_num(0.0))))
                    logits.append(low[best] > 0)
                kept[name] = (float(np.mean(gaps)), logits)
        score = float(np.mean([gap for gap, _ in kept.values()]))
        if len(kept) == 2:
            (_, a), (_, b) = kept.values()
            pairs = zip(a, b, strict=True)
            score += float(np.mean([1.0 - mask_iou(x.numpy(), y.numpy()) for x, y in pairs]))
        self._uncertainty[image_id] = score
        return score


def decode_low_res(
    model: PromptableDecoder, embedding: torch.Tensor, prompt: Prompt, original: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 4 mask logits (4, 256, 256) and predicted IoUs (4,) of one prompt (no grad)."""
    coords, labels = prompt.tokens(original)
    index = torch.zeros(1, dtype=torch.int64)
    logits, iou = model(
        embedding, index, torch.from_numpy(coords)[None], torch.from_numpy(labels)[None]
    )
    return logits[0].float(), iou[0].float()


def candidates(
    model: PromptableDecoder,
    embedding: torch.Tensor,
    prompt: Prompt,
    input_size: tuple[int, int],
    original: tuple[int, int],
) -> list[Candidate]:
    """The masks offered for a prompt: multimask 1..3 for one point alone, else mask 0."""
    low, iou = decode_low_res(model, embedding, prompt, original)
    indices = [1, 2, 3] if prompt.multimask else [0]
    chosen = low[indices]
    stable = stability_score(chosen, 0.0, STABILITY_OFFSET).nan_to_num(0.0)
    masks = postprocess_low_res(chosen[None], input_size, original)[0] > 0
    return [
        Candidate(masks[k].numpy(), index, float(iou[index]), float(stable[k]))
        for k, index in enumerate(indices)
    ]


def decode_rle(counts: str, size: tuple[int, int]) -> np.ndarray:
    """A manifest RLE (compressed counts, original frame) as a bool (H, W) mask."""
    rle = {"size": [int(size[0]), int(size[1])], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def best_gt_iou(mask: np.ndarray, ground_truth: list[np.ndarray]) -> float | None:
    """IoU with the ground-truth object it overlaps most (None without ground truth)."""
    if not ground_truth:
        return None
    return max(mask_iou(mask, gt) for gt in ground_truth)

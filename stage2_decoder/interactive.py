"""Clicks to masks on one cached image, for `decoder serve`: no encoder, ever.

``Labeller`` holds the decoders (``export.load_models``), the cache's manifest rows (failed ones
too, for the image list) and a small LRU of the images in use: the embedding as a float32
channels-last tensor (the decoder makes it token-major without a copy) and the ground-truth
masks decoded once. Every decoder call runs under one lock (one image at a time, no thread
oversubscription).

The first two-way block's projections of the image tokens (keys + positional encoding through
``k_proj`` of the token-to-image attention and ``q_proj`` of the image-to-token one, and the
image tokens through ``v_proj``) depend on the image alone while no mask is fed back: they are
computed once per image and decoder (``ImageState``), which saves 0.8 of the decoder's 3.6 GFLOP
per click; ``decode_low_res`` then runs the rest of ``PromptableDecoder.decode_tokens`` (same
arithmetic, tests/test_serve.py compares it with ``forward``).

A prompt is in the original frame (``prompt_files.Prompt``: points XY with labels 1/0, a box
XYXY) and is laid out as Meta's prompt encoder does. One point and no box is ambiguous: the
three multimask outputs are offered, each with its predicted IoU; any other prompt gives the
single-mask output (Meta's advice for ``SamPredictor``). Masks are upsampled to the original
frame exactly as ``Sam.postprocess_masks`` (``shared.transforms.postprocess_low_res``; here
``upsample_cropped``, which skips the padding rows and columns with the same numbers), only
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from shared.cache_format import STATUS_OK
from shared.cache_io import read_embedding_rows, read_manifest
from shared.transforms import IMAGE_SIZE, TARGET_SIZE
from stage2_decoder.amg import stability_score
from stage2_decoder.export import Models
from stage2_decoder.model import PromptableDecoder, _attend, _attention, _two_way_block
from stage2_decoder.prompt_files import Prompt

LRU_IMAGES = 4  # embeddings (4 MiB each in float32) and GT masks kept in memory
STABILITY_OFFSET = 1.0  # Meta's AMG default
UNCERTAINTY_POINTS = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
LIST_COLUMNS = [
    "image_id", "row", "path", "status", "error", "split", "has_masks", "n_objects",
    "original_height", "original_width", "input_height", "input_width", "objects",
    "embedding_checksum",
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
class ImageState:
    """What one decoder computes from an image alone (no mask input), token-major (1, h·w, d).

    ``src``: image embedding + no-mask embedding; ``key_pe``: the dense positional encoding;
    ``k_image`` / ``v_image``: the first block's token-to-image attention keys and values;
    ``q_image``: its image-to-token attention queries.
    """

    src: torch.Tensor
    key_pe: torch.Tensor
    k_image: torch.Tensor
    q_image: torch.Tensor
    v_image: torch.Tensor


@dataclass
class LoadedImage:
    embedding: torch.Tensor  # (1, 256, 64, 64) float32, channels-last
    ground_truth: list[np.ndarray]  # bool (H, W) per object, manifest order
    states: dict[str, ImageState]  # per decoder name, filled on first use


class Labeller:
    """The decoders and the cache, answering prompts on one image at a time."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.decoders: dict[str, PromptableDecoder] = models.decoders
        table = read_manifest(models.cache.location, LIST_COLUMNS)
        self.records: dict[str, dict[str, Any]] = {r["image_id"]: r for r in table.to_pylist()}
        self._loaded: OrderedDict[str, LoadedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decoder")
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
        array = read_embedding_rows(self.models.cache, [record])  # verified: never a damaged row
        embedding = torch.from_numpy(array).float().contiguous(memory_format=torch.channels_last)
        original, _ = self.sizes(image_id)
        ground_truth = [
            decode_rle(o["rle"], original) for o in record["objects"] or [] if o.get("rle")
        ]
        loaded = LoadedImage(embedding, ground_truth, {})
        self._loaded[image_id] = loaded
        while len(self._loaded) > LRU_IMAGES:
            self._loaded.popitem(last=False)
        return loaded

    # ------------------------------------------------------------------ prompts → masks

    def prepare(self, image_id: str) -> LoadedImage:
        """Load the image and compute every decoder's ``ImageState`` (before the first click)."""
        with self._lock, torch.inference_mode():
            loaded = self._load(image_id)
            for name in self.decoders:
                self._state(loaded, name)
            return loaded

    def _state(self, loaded: LoadedImage, name: str) -> ImageState:
        if name not in loaded.states:
            loaded.states[name] = image_state(self.decoders[name], loaded.embedding)
        return loaded.states[name]

    def predict(
        self, image_id: str, prompt: Prompt, names: list[str] | None = None
    ) -> dict[str, list[Candidate]]:
        """The masks offered by each decoder (all by default) for one prompt.

        Two decoders run at once, one Python thread each (torch releases the GIL in its ops).
        """
        original, input_size = self.sizes(image_id)
        names = names or list(self.decoders)
        with self._lock:
            loaded = self._load(image_id)

            def run(name: str) -> list[Candidate]:
                with torch.inference_mode():  # thread-local: entered in each worker
                    state = self._state(loaded, name)
                    return candidates(self.decoders[name], state, prompt, input_size, original)

            if len(names) == 1:
                return {names[0]: run(names[0])}
            return dict(zip(names, self._pool.map(run, names), strict=True))

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
            loaded = self._load(image_id)
            kept = {}
            for name, model in self.decoders.items():
                state = self._state(loaded, name)
                logits, gaps = [], []
                for fx, fy in UNCERTAINTY_POINTS:
                    prompt = Prompt(np.array([[fx * width, fy * height]]), np.array([1]))
                    low, iou = decode_low_res(model, state, prompt, original)
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


def image_state(model: PromptableDecoder, embedding: torch.Tensor) -> ImageState:
    """The first two-way block's image-only tensors for ``embedding`` (1, 256, 64, 64)."""
    src = model.embed_tokens(embedding, torch.zeros(1, dtype=torch.int64), None, None)
    key_pe = model.dense_pe_tokens(src.dtype)
    layer = model.mask_decoder.transformer.layers[0]
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    weight = torch.cat([to_image.k_proj.weight, to_token.q_proj.weight])
    bias = torch.cat([to_image.k_proj.bias, to_token.q_proj.bias])
    k_image, q_image = F.linear(src + key_pe, weight, bias).split(to_image.internal_dim, -1)
    return ImageState(src, key_pe, k_image, q_image, to_image.v_proj(src))


def _first_block(
    layer: torch.nn.Module, tokens: torch.Tensor, state: ImageState
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model._two_way_block`` for the first layer (``skip_first_layer_pe``), image side cached."""
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    queries = layer.norm1(_attention(layer.self_attn, tokens, tokens, tokens))
    q = to_image.q_proj(queries + tokens)
    queries = layer.norm2(queries + _attend(to_image, q, state.k_image, state.v_image))
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + tokens
    attn_out = _attend(to_token, state.q_image, to_token.k_proj(q), to_token.v_proj(queries))
    return queries, layer.norm4(state.src + attn_out)


def decode_low_res(
    model: PromptableDecoder, state: ImageState, prompt: Prompt, original: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 4 mask logits (4, 256, 256) and predicted IoUs (4,) of one prompt (no grad).

    ``PromptableDecoder.forward`` (``decode_tokens``) with the first block's image side from
    ``state``.
    """
    coords, labels = prompt.tokens(original)
    sparse = model.embed_points(torch.from_numpy(coords)[None], torch.from_numpy(labels)[None])
    decoder = model.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None], sparse.to(output_tokens.dtype)), dim=1)
    transformer = decoder.transformer
    if not transformer.layers[0].skip_first_layer_pe:
        raise ValueError("this decoder's first block uses the positional encoding; not SAM's")
    queries, keys = _first_block(transformer.layers[0], tokens, state)
    for layer in transformer.layers[1:]:
        queries, keys = _two_way_block(layer, queries, keys, tokens, state.key_pe)
    final = transformer.final_attn_token_to_image
    attn_out = _attention(final, queries + tokens, keys + state.key_pe, keys)
    hs = transformer.norm_final_attn(queries + attn_out)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    logits = model._upscaled_logits(keys, hyper_in)
    return logits[0].float(), decoder.iou_prediction_head(hs[:, 0, :])[0].float()


def candidates(
    model: PromptableDecoder,
    state: ImageState,
    prompt: Prompt,
    input_size: tuple[int, int],
    original: tuple[int, int],
) -> list[Candidate]:
    """The masks offered for a prompt: multimask 1..3 for one point alone, else mask 0."""
    low, iou = decode_low_res(model, state, prompt, original)
    indices = [1, 2, 3] if prompt.multimask else [0]
    chosen = low[indices]
    stable = stability_score(chosen, 0.0, STABILITY_OFFSET).nan_to_num(0.0)
    masks = upsample_cropped(chosen[None], input_size, original)[0] > 0
    return [
        Candidate(masks[k].numpy(), index, float(iou[index]), float(stable[k]))
        for k, index in enumerate(indices)
    ]


def upsample_cropped(
    low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """``postprocess_low_res`` (B, C, 256, 256) → (B, C, H, W), without the padding's work.

    Meta upsamples the whole 256 frame to 1024×1024, then crops ``input_size``. Bilinear
    upsampling by exactly 4 (align_corners False) reads source rows i0 = floor((y + 0.5) / 4 −
    0.5) and i0 + 1, so the output rows y < input_h need source rows < ceil(input_h / 4) + 1:
    upsampling only those (still by exactly 4) gives the same values, bit for bit.
    """
    factor = IMAGE_SIZE // TARGET_SIZE
    rows = min(TARGET_SIZE, -(-input_size[0] // factor) + 1)
    cols = min(TARGET_SIZE, -(-input_size[1] // factor) + 1)
    masks = F.interpolate(
        low_res_logits[..., :rows, :cols], (rows * factor, cols * factor), mode="bilinear",
        align_corners=False,
    )  # fmt: skip
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


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

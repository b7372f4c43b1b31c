"""From a run to weights: the decoders used at inference, SAM checkpoints and ONNX.

- ``load_models``: the *zero-shot* decoder (prompt encoder + mask decoder of the very checkpoint
  the cache was made with, found and sha256-verified by ``setup.find_sam_checkpoint``) and/or
  the *fine-tuned* one (``model`` of a run's ``best.pt`` / ``last.pt``), as ``PromptableDecoder``
  modules in eval mode. Every command after training (eval, predict, amg, export) loads here.
- ``export_sam_checkpoint``: a full SAM checkpoint in Meta's format (a plain ``Sam`` state dict:
  the original image encoder, the run's prompt encoder and mask decoder), or ``decoder_only``
  (``mask_decoder.*`` keys only, as fine-tuning tutorials save them). Written atomically.
- ``export_onnx``: the decoder with Meta's ONNX interface (``segment_anything/utils/onnx.py``,
  ``SamOnnxModel``): inputs ``image_embeddings`` (1, 256, 64, 64), ``point_coords`` (1, N, 2)
  coords_1024, ``point_labels`` (1, N) float (1 fg, 0 bg, -1 pad, 2 / 3 box corners),
  ``mask_input`` (1, 1, 256, 256), ``has_mask_input`` (1,), ``orig_im_size`` (2,) float (H, W);
  outputs ``masks`` (original frame logits), ``iou_predictions``, ``low_res_masks``. N is dynamic.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from shared.cache_format import CacheAttrs, check_same_model
from shared.cache_io import Cache, open_cache
from shared.sam_models import build_prompt_and_mask_decoder, load_state_dict
from stage2_decoder import checkpoints as ck
from stage2_decoder.guards import same_file
from stage2_decoder.model import PromptableDecoder, build_meta_modules
from stage2_decoder.setup import find_sam_checkpoint

ZERO_SHOT, FINE_TUNED = "zero_shot", "fine_tuned"
WHICH = {"best": ck.BEST, "last": ck.LAST}


# --------------------------------------------------------------------------- loading


def load_run_state(run: str | Path, which: str = "best") -> dict[str, Any]:
    """The training checkpoint ``best.pt`` / ``last.pt`` of a run folder (``weights_only``)."""
    if which not in WHICH:
        raise ValueError(f"--which {which!r} is not one of best, last")
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(
            f"run folder {run} does not exist; pass the --out of `decoder train`"
        )
    path = run / WHICH[which]
    if not path.is_file():
        other = "last" if which == "best" else "best"
        hint = (
            f"pass --which {other}"
            if (run / WHICH[other]).is_file()
            else f"train first with `decoder train --out {run}`"
        )
        raise FileNotFoundError(f"{run} holds no {path.name} (no checkpoint); {hint}")
    return ck.load_checkpoint(path)


def check_run_matches_cache(state: dict[str, Any], attrs: CacheAttrs, where: str) -> None:
    """Refuse a run trained from a cache of another model or checkpoint (names both)."""
    identity = state.get("cache") or {}
    check_same_model(
        attrs,
        str(identity.get("model_type", "?")),
        str(identity.get("checkpoint_sha256", "?")),
        f"the run's {identity.get('checkpoint_name', '?')}",
        where,
    )


def decoder_from_state(state: dict[str, Any]) -> PromptableDecoder:
    """A ``PromptableDecoder`` holding a run checkpoint's ``model`` weights (strict, eval)."""
    model = PromptableDecoder(*build_meta_modules())
    model.load_state_dict(ck.decoder_weights(state), strict=True)
    return model.eval()


def zero_shot_decoder(cache: Cache, checkpoint: str | None) -> tuple[PromptableDecoder, Path]:
    """The cache's own SAM checkpoint's decoder side, and the file it came from."""
    path = find_sam_checkpoint(cache.attrs, checkpoint, cache.name)
    prompt_encoder, mask_decoder = build_prompt_and_mask_decoder(cache.attrs.model_type, path)
    return PromptableDecoder(prompt_encoder, mask_decoder).eval(), path


@dataclass
class Models:
    """Decoders for inference (``ZERO_SHOT`` first, then ``FINE_TUNED``) and their sources."""

    cache: Cache
    decoders: dict[str, PromptableDecoder] = field(default_factory=dict)
    sam_checkpoint: Path | None = None
    run_state: dict[str, Any] | None = None
    run: Path | None = None

    def to(self, device: torch.device) -> Models:
        for model in self.decoders.values():
            model.to(device)
        return self


def load_models(
    cache_path: str,
    *,
    run: str | Path | None = None,
    checkpoint: str | None = None,
    which: str = "best",
    zero_shot: bool = True,
    fine_tuned: bool = True,
) -> Models:
    """Open the cache and load the decoders asked for; errors say what to pass.

    Without ``run`` only the zero-shot decoder exists. The fine-tuned decoder needs no SAM
    checkpoint file (the run holds its weights); the zero-shot one does.
    """
    cache = open_cache(cache_path)
    models = Models(cache=cache)
    if run is not None:
        models.run, models.run_state = Path(run), load_run_state(run, which)
        check_run_matches_cache(models.run_state, cache.attrs, cache.name)
    if zero_shot or run is None:
        models.decoders[ZERO_SHOT], models.sam_checkpoint = zero_shot_decoder(cache, checkpoint)
    if fine_tuned and models.run_state is not None:
        models.decoders[FINE_TUNED] = decoder_from_state(models.run_state)
    return models


# --------------------------------------------------------------------------- SAM checkpoints


def merged_sam_state_dict(
    original: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``original`` (a full ``Sam`` state dict) with the decoder-side tensors replaced.

    Every key of ``decoder`` must exist in ``original`` with the same shape; the result has
    exactly ``original``'s keys, so it loads strictly wherever the original does.
    """
    problems = [k for k in decoder if k not in original]
    problems += [
        f"{k} {tuple(v.shape)} vs {tuple(original[k].shape)}"
        for k, v in decoder.items()
        if k in original and v.shape != original[k].shape
    ]
    if problems:
        raise ValueError(f"the run's decoder does not fit the SAM checkpoint: {problems[:3]}")
    merged = dict(original)
    merged.update({k: v.detach().to(original[k].dtype).contiguous() for k, v in decoder.items()})
    return merged


def export_sam_checkpoint(
    run: str | Path,
    out: str | Path,
    *,
    which: str = "best",
    decoder_only: bool = False,
    checkpoint: str | None = None,
    cache: str | None = None,
) -> Path:
    """Write the run's decoder as a SAM checkpoint (full, or ``mask_decoder.*`` only).

    The full file is the original checkpoint (found through the run's cache, ``cache`` or
    ``checkpoint``, verified by sha256) with the run's ``prompt_encoder.*`` / ``mask_decoder.*``
    tensors; it loads with ``strict=True`` into Meta's ``sam_model_registry[model_type]``.
    """
    state = load_run_state(run, which)
    weights = ck.decoder_weights(state)
    if decoder_only:
        if state.get("config", {}).get("train_prompt_encoder"):
            raise ValueError(
                f"{run} also trained the prompt encoder; a --decoder-only file would drop it. "
                "Export the full checkpoint instead (omit --decoder-only)"
            )
        tensors = {k: v for k, v in weights.items() if k.startswith("mask_decoder.")}
    else:
        source = _original_checkpoint(state, checkpoint, cache, run)
        if same_file(Path(out), source):
            raise ValueError(f"--out {out} is the SAM checkpoint {source} it is made from")
        original = load_state_dict(source)
        tensors = merged_sam_state_dict(original, weights)
    return ck.atomic_write(out, lambda handle: torch.save(tensors, handle))


def _original_checkpoint(
    state: dict[str, Any], checkpoint: str | None, cache: str | None, run: str | Path
) -> Path:
    """The SAM checkpoint the run's cache was made with (sha256 checked against the run)."""
    identity = state.get("cache") or {}
    attrs = CacheAttrs(
        model_type=identity.get("model_type", "?"),
        checkpoint_sha256=identity.get("checkpoint_sha256", "?"),
        checkpoint_name=identity.get("checkpoint_name", "?"),
    )
    cache_path = cache or (state.get("config") or {}).get("cache")
    if cache_path:
        try:
            cached = open_cache(cache_path).attrs
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.checkpoint_sha256 == attrs.checkpoint_sha256:
            attrs = cached  # its checkpoint_path hint finds the file without a download
    given = checkpoint or (state.get("config") or {}).get("checkpoint")
    return find_sam_checkpoint(attrs, given, f"the run {run}")


# --------------------------------------------------------------------------- ONNX


class OnnxDecoder(nn.Module):
    """Meta's ``SamOnnxModel`` on a ``PromptableDecoder`` (same inputs, outputs, arithmetic).

    Differences from Meta's file, none in the numbers: the crop to the pre-padding size slices
    with tensors instead of ``int(...)`` so that ``orig_im_size`` stays dynamic in the exported
    graph; ``use_stability_score`` / ``return_extra_metrics`` are not offered.
    """

    def __init__(self, model: PromptableDecoder, return_single_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.img_size = int(model.prompt_encoder.input_image_size[0])
        self.return_single_mask = return_single_mask

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size
        embedding = pe.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            embedding = embedding + pe.point_embeddings[i].weight * (labels == i)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        dense = has_mask_input * pe.mask_downscaling(mask_input)
        return dense + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        size = orig_im_size.to(torch.float32)
        prepadded = torch.floor(self.img_size / torch.max(size) * size + 0.5).to(torch.int64)
        side = (self.img_size, self.img_size)
        masks = F.interpolate(masks, side, mode="bilinear", align_corners=False)
        masks = masks[..., : prepadded[0], : prepadded[1]]
        hw = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(hw[0], hw[1]), mode="bilinear", align_corners=False)

    def _select(
        self, masks: torch.Tensor, scores: torch.Tensor, num_points: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reweight = torch.zeros_like(scores[:1])
        reweight[:, 0] = 1000.0
        best = torch.argmax(scores + (num_points - 2.5) * reweight, dim=1)
        rows = torch.arange(masks.shape[0])
        return masks[rows, best].unsqueeze(1), scores[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.model._predict_masks(image_embeddings + dense, sparse)
        if self.return_single_mask:
            masks, scores = self._select(masks, scores, point_coords.shape[1])
        return self._postprocess(masks, orig_im_size), scores, masks


ONNX_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
               "has_mask_input", "orig_im_size")  # fmt: skip
ONNX_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def onnx_example_inputs(n_points: int = 5, orig_size: tuple[int, int] = (1500, 2250)) -> tuple:
    """Dummy inputs as Meta's ``scripts/export_onnx_model.py`` makes them."""
    return (
        torch.randn(1, 256, 64, 64),
        torch.randint(0, 1024, (1, n_points, 2), dtype=torch.float),
        torch.randint(0, 4, (1, n_points), dtype=torch.float),
        torch.randn(1, 1, 256, 256),
        torch.tensor([1], dtype=torch.float),
        torch.tensor(orig_size, dtype=torch.float),
    )


def export_onnx(
    model: PromptableDecoder, out: str | Path, *, return_single_mask: bool = False, opset: int = 17
) -> Path:
    """Trace ``OnnxDecoder(model)`` to ``out`` (TorchScript exporter, no onnxscript); atomic."""
    wrapper = OnnxDecoder(model.float().eval(), return_single_mask).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints / shapes
            torch.onnx.export(
                wrapper, onnx_example_inputs(), str(temp), dynamo=False,
                input_names=list(ONNX_INPUTS), output_names=list(ONNX_OUTPUTS),
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                opset_version=opset, do_constant_folding=True,
            )  # fmt: skip
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return out


def check_onnx(
    model: PromptableDecoder, path: str | Path, *, return_single_mask: bool = False, seed: int = 0
) -> float:
    """Largest |onnxruntime − torch| over all outputs, for two random prompt sets and sizes."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking the ONNX file needs onnxruntime: pip install 'samcache[onnx]'"
        ) from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = OnnxDecoder(model.float().eval(), return_single_mask).eval()
    worst = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n_points, size in ((2, (375, 500)), (4, (480, 321))):
            inputs = onnx_example_inputs(n_points, size)
            got = session.run(
                None, {k: v.numpy() for k, v in zip(ONNX_INPUTS, inputs, strict=True)}
            )
            expected = wrapper(*inputs)
            for a, b in zip(got, expected, strict=True):
                if tuple(a.shape) != tuple(b.shape):
                    raise RuntimeError(f"ONNX output is {a.shape}, torch gives {tuple(b.shape)}")
                worst = max(worst, float((torch.from_numpy(a) - b).abs().max()))
    return worst


# --------------------------------------------------------------------------- command

ONNX_TOLERANCE = 1e-3  # largest |onnxruntime − torch| accepted on the logits

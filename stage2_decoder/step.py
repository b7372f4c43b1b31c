"""One training micro-step: SAM's interactive prompt iterations on a batch of objects.

Iteration 0 gives each object its first prompt (``--prompts``: one point, a noisy box, or 50/50;
prompts.py). Each later iteration feeds the previous low-res logits back as ``mask_input``
(detached; the mask with the highest predicted IoU for multimask objects) and, except on the
*mask-only* iterations, adds one click sampled uniformly from the error region. SAM's recipe is
11 iterations: 1 + 8 clicks + 2 mask-only (the last one and one at a random position).
Multimask output (3 masks, only the lowest-loss one backpropagated) is used where the prompt is
ambiguous: exactly one point, no box, no mask.

Backward runs after every iteration. The mask fed forward is detached, so iteration k's graph
is independent of the others: gradients accumulated over k equal one backward of the sum, while
only one iteration's activations are alive at a time (≈ 1/iterations of the memory). Within an
iteration the decoder takes ``objects_per_call`` objects at a time (forward, loss, backward per
chunk, the loss weighted by the chunk's share): the same gradients, and on a CPU much faster
than one call on 32 objects, whose activations no longer fit in the caches.

Precision: ``fp32`` runs the model as it is (Meta's arithmetic); ``bf16`` runs forward and
backward on bf16 copies of the fp32 weights (``p.to(bfloat16)`` inside the graph, so the
gradients arrive in fp32 on the fp32 master weights the optimizer steps); ``fp16`` uses
``torch.autocast`` (CUDA, with a GradScaler). On a CPU with bf16 units the bf16 copies are
faster than autocast, which keeps normalisations and softmax in fp32 (bench/bench_train.py).

Loss is computed in the 256 target frame: the decoder's native output, the frame of
``mask_input``, and 16× fewer pixels than the 1024 frame (evaluation is at full resolution).
All randomness comes from the ``generator`` passed in (derived from the seed and the step),
drawn per *global row* of each object (``batch.object_rows`` of ``batch.rows_total``), so the
prompts of an object do not depend on the process that holds it in data-parallel training.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from stage2_decoder.dataset import ObjectBatch
from stage2_decoder.losses import mask_for_next_iteration, sam_loss
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.prompts import sample_error_clicks, sample_first_prompts


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss parts."""


@dataclass(frozen=True)
class StepSettings:
    """What a micro-step needs from TrainConfig (kept small so tests can build it)."""

    prompt_mode: str = "point,box"  # "point", "box" or "point,box" (prompts.py)
    iterations: int = 11
    loss: str = "focal_dice"
    objects_per_call: int = 4  # objects per decoder call (speed only; see the module docstring)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.objects_per_call < 1:
            raise ValueError(
                f"iterations ({self.iterations}) and objects_per_call "
                f"({self.objects_per_call}) must be >= 1"
            )


@dataclass
class StepResult:
    """Means over the iterations of the batch loss and its parts (floats), and counts."""

    loss: float
    parts: dict[str, float] = field(default_factory=dict)
    n_objects: int = 0
    prompt_iterations: int = 0


def mask_only_iterations(iterations: int, generator: torch.Generator) -> set[int]:
    """Iterations (1-based among the corrective ones) that add no click, only the mask.

    SAM: with 11 iterations, the last one and one at a random position among 1..9. With 3
    iterations only the last; with fewer, none (every corrective iteration adds a click). One
    random number is drawn whatever ``iterations`` is, keeping the stream aligned.
    """
    draw = float(torch.rand((), generator=generator, device=generator.device))
    if iterations < 3:
        return set()
    chosen = {iterations - 1}
    if iterations >= 4:
        chosen.add(1 + min(iterations - 3, math.floor(draw * (iterations - 2))))
    return chosen


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16 / fp16, a no-op for fp32 (precision already resolved)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def call_decoder(
    model: PromptableDecoder, precision: str, device: torch.device, *args: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(*args)`` at ``precision``: bf16 on bf16 copies of the parameters (gradients flow
    back to the fp32 ones), fp16 under autocast, fp32 as is."""
    if precision == "bf16":
        params = {name: p.to(torch.bfloat16) for name, p in model.named_parameters()}
        return functional_call(model, params, args)
    with autocast(device, precision):
        return model(*args)


def decoder_dtype(model: PromptableDecoder, precision: str) -> torch.dtype:
    """The dtype ``call_decoder`` computes in (autocast keeps the parameters' dtype)."""
    return torch.bfloat16 if precision == "bf16" else model.mask_decoder.iou_token.weight.dtype


def _to(batch: ObjectBatch, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The batch on ``device``; image embeddings in ``dtype`` and channels-last, so that the
    model's token-major view of them is free (converted once per step, not per call)."""
    embeddings = batch.image_embeddings.to(device, non_blocking=True)
    return {
        "image_embeddings": embeddings.to(dtype, memory_format=torch.channels_last),
        "image_index": batch.image_index.to(device),
        "targets": batch.targets.to(device),
        "valid": batch.valid.to(device),
        "boxes_1024": batch.boxes_1024.to(device),
        "input_sizes": batch.object_input_sizes().to(device),
    }


def _check_finite(value: torch.Tensor, parts: dict[str, torch.Tensor], where: str) -> None:
    if torch.isfinite(value):
        return
    shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
    raise NonFiniteLossError(
        f"loss is {float(value.detach())} at {where} ({shown}); lower --lr, keep --grad-clip "
        "on, or use --precision fp32 (`embed verify CACHE` checks the images' embeddings)"
    )


@dataclass
class _Call:
    """What one prompt iteration needs besides the prompts (fixed over a step)."""

    model: PromptableDecoder
    data: dict[str, torch.Tensor]
    settings: StepSettings
    device: torch.device
    precision: str
    scale: float  # loss_scale / iterations
    scaler: torch.amp.GradScaler | None


def _iteration(
    call: _Call,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None,
    multimask: torch.Tensor,
    where: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss and backward of one prompt iteration, ``objects_per_call`` objects at a
    time. Returns the next mask_input (B, 1, 256, 256) fp32, detached, and the batch means of
    the loss and its parts (detached tensors)."""
    data, batch = call.data, len(labels)
    fed, sums = [], {}
    for start in range(0, batch, call.settings.objects_per_call):
        part = slice(start, start + call.settings.objects_per_call)
        logits, iou_pred = call_decoder(
            call.model, call.precision, call.device, data["image_embeddings"],
            data["image_index"][part], coords[part], labels[part],
            None if mask_input is None else mask_input[part],
        )  # fmt: skip
        out = sam_loss(logits, iou_pred, data["targets"][part], data["valid"][part],
                       multimask[part], kind=call.settings.loss)  # fmt: skip
        _check_finite(out.loss, out.parts, where)
        share = len(logits) / batch  # the chunk's weight in the batch mean
        scaled = out.loss * (share * call.scale)
        (call.scaler.scale(scaled) if call.scaler is not None else scaled).backward()
        for name, value in {"loss": out.loss, **out.parts}.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * share
        fed.append(mask_for_next_iteration(logits, iou_pred, multimask[part]).float())
    return torch.cat(fed), sums


def interactive_step(
    model: PromptableDecoder,
    batch: ObjectBatch,
    settings: StepSettings,
    generator: torch.Generator,
    *,
    device: torch.device,
    precision: str = "fp32",
    loss_scale: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    where: str = "step ?",
) -> StepResult:
    """Run ``settings.iterations`` prompt iterations on ``batch`` with backward after each.

    The loss of iteration k is multiplied by ``loss_scale / iterations`` before backward (the
    caller passes 1 / micro-steps per optimizer step), so gradients are those of the mean.
    ``generator`` must live on ``device``. Raises NonFiniteLossError naming ``where``.
    """
    if batch.n_objects == 0:  # nothing to learn from (cannot happen with load_split's images)
        return StepResult(0.0)
    data = _to(batch, device, decoder_dtype(model, precision))
    targets, valid = data["targets"], data["valid"]
    # Draws per global object row (a batch built without rows is the whole micro-batch).
    rows = {"rows": None, "rows_total": None}
    if batch.rows_total:
        rows = {"rows": batch.object_rows.to(device), "rows_total": batch.rows_total}
    coords, labels, multimask = sample_first_prompts(
        targets, valid, data["boxes_1024"], generator,
        mode=settings.prompt_mode, input_size=data["input_sizes"], **rows,
    )  # fmt: skip
    mask_only = mask_only_iterations(settings.iterations, generator)
    call = _Call(model, data, settings, device, precision, loss_scale / settings.iterations, scaler)
    mask_input: torch.Tensor | None = None
    totals: dict[str, float] = {}
    for k in range(settings.iterations):
        mask_input, means = _iteration(
            call, coords, labels, mask_input, multimask, f"{where}, prompt iteration {k}"
        )
        for name, value in means.items():
            totals[name] = totals.get(name, 0.0) + value.item()
        totals.setdefault("iou_first", float(means["iou"]))
        totals["iou_last"] = float(means["iou"])
        if k + 1 == settings.iterations:
            break
        if k + 1 not in mask_only:
            pred = mask_input[:, 0] > 0
            new_coords, new_labels = sample_error_clicks(pred, targets, valid, generator, **rows)
            coords = torch.cat([coords, new_coords.to(coords.dtype)], dim=1)
            labels = torch.cat([labels, new_labels.to(labels.dtype)], dim=1)
        multimask = torch.zeros_like(multimask)  # clicks or a mask make the prompt unambiguous
    n = settings.iterations
    means = {k: v / n for k, v in totals.items() if k not in ("iou_first", "iou_last")}
    means.update(iou_first=totals["iou_first"], iou_last=totals["iou_last"])
    loss = means.pop("loss")
    return StepResult(loss, means, batch.n_objects, batch.n_objects * n)

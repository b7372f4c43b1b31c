"""Pretrain ``samcache_tiny`` end to end on the synthetic "home" domain (a demonstration model).

    python tools/pretrain_tiny.py --out shared/weights/samcache_tiny.pth   # ≈ 75 min, 2-core CPU
    python tools/pretrain_tiny.py --out shared/weights/samcache_tiny.pth --resume  # after a kill

What it trains: the whole ``Sam`` of model type ``samcache_tiny`` (``TinyConvEncoder`` image
encoder, Meta's ``PromptEncoder`` and ``MaskDecoder``), from random weights, on scenes drawn
on the fly by ``stage1_embed.synthetic.render_scene`` (textured shapes, 1-5 objects per image,
occlusions; JPEG-compressed at quality 90 like ``embed demo-data``).

Recipe: SAM's (arXiv:2304.02643 appendix), at a CPU's scale. Each step takes
``--images-per-step`` fresh scenes (up to 4× more at reduced sides) and up to
``--objects-per-image`` objects of each; stage 2's ``interactive_step`` runs the phase's prompt
iterations (first prompt: one point or a noisy box, 50/50; then corrective clicks sampled from
the error region with the previous logits fed back), multimask for single points (only the
lowest-loss mask backpropagated), loss 20·focal + dice + IoU MSE. The image embeddings are a
leaf for the decoder steps; their gradient is then backpropagated through the encoder once.
AdamW (lr 8e-4 after a linear warm-up, cosine to 10 %, weight decay 0.1, gradient clip 1.0).

Reduced cost (``--phases``): the encoder is fully convolutional and Meta's prompt encoder and
mask decoder have no size-bound weights, so the first steps run at input side 256 (a 16×16
grid, ≈ 16× cheaper per object), then at 512 and at the real 1024, each with a corrective click
after the first prompt. Each phase gets a share of ``--steps``; the lr follows the step (warm-up,
then cosine). The scenes, prompts and initial weights of step k depend only on ``--seed`` and
k, so a run is reproducible (same ``--threads``) whatever the machine's load: its speed only
changes the wall time.
Every ``--save-every`` steps the weights and ``<out>.state.pt`` (fp32 weights, optimizer, step)
are written atomically; ``--resume`` continues from there with the same options. The file
shipped is a plain ``Sam`` state dict in Meta's key format (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``), fp16 (``--dtype``) so that it ships in the package
small; ``build_sam`` casts it to fp32 on load. At use time the model takes 1024×1024 inputs only.

The model is trained on synthetic shapes only: it is NOT a substitute for SAM.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.files import atomic_write  # noqa: E402
from shared.sam_models import _new_sam, get_model_spec  # noqa: E402
from shared.transforms import (  # noqa: E402
    boxes_to_1024,
    normalize_and_pad,
    resize_longest_side,
)
from stage1_embed.annotations import VOID  # noqa: E402
from stage1_embed.synthetic import DEFAULT_SIZES, add_void, render_scene  # noqa: E402
from stage2_decoder.dataset import ObjectBatch  # noqa: E402
from stage2_decoder.model import PromptableDecoder  # noqa: E402
from stage2_decoder.step import StepSettings, interactive_step  # noqa: E402

MODEL_TYPE = "samcache_tiny"
_FREE = ("resume", "threads", "log_every", "save_every")  # may change on --resume


@dataclass(frozen=True)
class PretrainConfig:
    out: str
    phases: str = "256:2:0.5,512:2:0.3,1024:2:0.2"  # side:iterations:share of the steps
    steps: int = 2000
    threads: int = 1  # torch threads: 1 (2 threads on 2 busy cores thrash: ≈ 5× slower)
    images_per_step: int = 2
    objects_per_image: int = 4
    lr: float = 8e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float16"
    log_every: int = 10
    save_every: int = 100  # also the resume state (``<out>.state.pt``)
    resume: bool = False


def parse_phases(text: str) -> list[tuple[int, int, float]]:
    """``"256:1:0.6,1024:3:0.4"`` → [(256, 1, 0.6), (1024, 3, 0.4)]: input side, prompt
    iterations and share of ``--steps`` of each phase, in order."""
    phases = []
    for item in filter(None, text.split(",")):
        side, iterations, share = item.split(":")
        phases.append((int(side), int(iterations), float(share)))
        if int(side) % 64 or int(side) > 1024 or int(iterations) < 1 or float(share) <= 0:
            raise ValueError(
                f"--phases: bad phase {item!r} (side multiple of 64 up to 1024, "
                "iterations >= 1, share > 0)"
            )
    if abs(sum(p[2] for p in phases) - 1.0) > 1e-6:
        raise ValueError(f"--phases: the shares of {text!r} must add up to 1")
    return phases


def to_target(mask: np.ndarray, input_size: tuple[int, int], side: int) -> np.ndarray:
    """``shared.transforms.mask_to_target`` for an input side ``side`` (target side side/4)."""
    height, width = input_size
    resized = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    padded = np.zeros((side, side), np.float32)
    padded[:height, :width] = resized
    return cv2.resize(padded, (side // 4, side // 4), interpolation=cv2.INTER_AREA) >= 0.5


def scene_sample(
    rng: np.random.Generator, objects_per_image: int, side: int = 1024
) -> tuple[torch.Tensor, tuple[int, int], list[dict]]:
    """One home scene: (encoder input 3×side×side, input_size, up to N objects).

    Each object: ``target`` and ``valid`` bool (side/4)² (target frame, void and padding not
    valid) and ``box_1024`` XYXY in the side frame; at side 1024 exactly what the stage-2
    dataset reads from a cache. Smaller sides are Meta's preprocessing with that longest side.
    """
    rgb, objects, classes = render_scene(rng, DEFAULT_SIZES, max_instances=5)
    objects, _ = add_void(objects, classes)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    rgb = np.asarray(Image.open(buffer).convert("RGB"))
    resized = resize_longest_side(rgb, side)
    input_size = (int(resized.shape[0]), int(resized.shape[1]))
    image = normalize_and_pad(resized, side)
    valid = to_target(np.ones(objects.shape, bool), input_size, side)
    valid &= ~to_target(objects == VOID, input_size, side)
    ids = [int(v) for v in np.unique(objects) if v not in (0, VOID)]
    rng.shuffle(ids)
    out = []
    for value in ids:
        mask = objects == value
        target = to_target(mask, input_size, side)
        if not target.any():
            continue
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        box = boxes_to_1024(box, rgb.shape[:2]) * (side / 1024)
        out.append({"target": target, "valid": valid, "box_1024": box.astype(np.float32)})
        if len(out) == objects_per_image:
            break
    return image, input_size, out


def make_batch(
    step: int, config: PretrainConfig, side: int = 1024
) -> tuple[torch.Tensor, ObjectBatch]:
    """Images (I, 3, side, side) and an ObjectBatch (embeddings filled in later) for ``step``.

    Smaller sides are cheaper, so they get more images: ``images_per_step`` × (1024 / side)
    at most 4×.
    """
    images, sizes, parts = [], [], {"image_index": [], "target": [], "valid": [], "box_1024": []}
    for i in range(config.images_per_step * min(4, 1024 // side)):
        rng = np.random.default_rng([config.seed, step, i])
        image, input_size, objects = scene_sample(rng, config.objects_per_image, side)
        images.append(image)
        sizes.append(input_size)
        for obj in objects:
            parts["image_index"].append(i)
            for key in ("target", "valid", "box_1024"):
                parts[key].append(obj[key])
    batch = ObjectBatch(
        image_embeddings=torch.empty(0),
        image_index=torch.tensor(parts["image_index"], dtype=torch.int64),
        targets=torch.from_numpy(np.stack(parts["target"])),
        valid=torch.from_numpy(np.stack(parts["valid"])),
        boxes_1024=torch.from_numpy(np.stack(parts["box_1024"])),
        input_sizes=sizes,
    )
    return torch.stack(images), batch


def set_side(decoder: PromptableDecoder, side: int) -> None:
    """Make the prompt encoder work on a side×side input (grid side/16); weights unchanged."""
    decoder.prompt_encoder.input_image_size = (side, side)
    decoder.prompt_encoder.image_embedding_size = (side // 16, side // 16)
    decoder._dense_pe_cache.clear()


def train_step(
    sam: torch.nn.Module,
    decoder: PromptableDecoder,
    step: int,
    config: PretrainConfig,
    side: int,
    iterations: int,
) -> dict[str, float]:
    """Forward/backward of one step (gradients accumulated in the parameters)."""
    images, batch = make_batch(step, config, side)
    embeddings = sam.image_encoder(images)
    leaf = embeddings.detach().requires_grad_(True)
    batch.image_embeddings = leaf
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    settings = StepSettings(prompt_mode="point,box", iterations=iterations, objects_per_call=16)
    result = interactive_step(
        decoder, batch, settings, generator, device=torch.device("cpu"), precision="fp32",
        where=f"step {step}",
    )  # fmt: skip
    embeddings.backward(leaf.grad)
    return {
        "loss": result.loss,
        "iou_first": result.parts["iou_first"],
        "iou_last": result.parts["iou_last"],
    }


def save(sam: torch.nn.Module, config: PretrainConfig) -> Path:
    """The shipped file: a plain ``Sam`` state dict in ``config.dtype`` (written atomically)."""
    dtype = torch.float16 if config.dtype == "float16" else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sam.state_dict().items()}
    atomic_write(Path(config.out), lambda handle: torch.save(state, handle))
    return Path(config.out)


def state_path(config: PretrainConfig) -> Path:
    return Path(config.out + ".state.pt")


def save_state(sam: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               config: PretrainConfig) -> None:  # fmt: skip
    """What ``--resume`` continues from: fp32 weights, optimizer, next step, the config."""
    state = {"model": sam.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": asdict(config)}  # fmt: skip
    atomic_write(state_path(config), lambda handle: torch.save(state, handle))


def load_state(sam: torch.nn.Module, optimizer: torch.optim.Optimizer,
               config: PretrainConfig) -> int:  # fmt: skip
    """Restore ``<out>.state.pt``; returns the step to continue at. The schedule must match."""
    path = state_path(config)
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist; start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k not in _FREE}
    mine = {k: v for k, v in asdict(config).items() if k not in _FREE}
    if saved != mine:
        changed = sorted(k for k in mine if saved.get(k) != mine[k])
        raise SystemExit(f"--resume: options differ from the saved run ({', '.join(changed)})")
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def phase_ends(config: PretrainConfig) -> list[tuple[int, int, int]]:
    """(side, iterations, first step after the phase) per phase, in order."""
    ends, total = [], 0.0
    for side, iterations, share in parse_phases(config.phases):
        total += share
        ends.append((side, iterations, round(total * config.steps)))
    return ends


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` steps, then a cosine over ``steps`` to 10 %."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    floor = 0.1 * config.lr
    progress = min(1.0, step / max(1, config.steps))
    return warm * (floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress)))


def new_run(config: PretrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A randomly initialised ``samcache_tiny`` (seeded) and its AdamW optimizer."""
    torch.manual_seed(config.seed)
    sam = _new_sam(get_model_spec(MODEL_TYPE)).train()
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=config.lr)  # fmt: skip
    return sam, optimizer


def pretrain(config: PretrainConfig) -> Path:
    torch.set_num_threads(config.threads)
    sam, optimizer = new_run(config)
    step = load_state(sam, optimizer, config) if config.resume else 0
    decoder = PromptableDecoder(sam.prompt_encoder, sam.mask_decoder)
    params = [p for p in sam.parameters() if p.requires_grad]
    started, window = time.perf_counter(), []
    for side, iterations, phase_end in phase_ends(config):
        set_side(decoder, side)
        while step < phase_end:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            optimizer.zero_grad(set_to_none=True)
            window.append(train_step(sam, decoder, step, config, side, iterations))
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            if step % config.log_every == 0:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                minutes, lr = (time.perf_counter() - started) / 60, lr_at(step - 1, config)
                print(f"step {step:5d}/{config.steps}  side {side}  lr {lr:.2e}  "
                      f"loss {mean['loss']:.4f}  train IoU first {mean['iou_first']:.3f} "
                      f"last {mean['iou_last']:.3f}  {minutes:.1f} min", flush=True)  # fmt: skip
                window = []
            if step % config.save_every == 0:
                save(sam, config)
                save_state(sam, optimizer, step, config)
    set_side(decoder, 1024)
    return save(sam, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="shared/weights/samcache_tiny.pth")
    for name, default in vars(PretrainConfig("")).items():
        if name != "out":
            flag = f"--{name.replace('_', '-')}"
            if isinstance(default, bool):
                parser.add_argument(flag, action="store_true")
            else:
                parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    config = PretrainConfig(**vars(args))
    print(f"pretraining {MODEL_TYPE} (a demonstration model, NOT a substitute for SAM): {config}")
    path = pretrain(config)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

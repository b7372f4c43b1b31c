"""Preparing a training run: run folder, resume, device, the model from the cache's checkpoint.

Stage 2 never builds the image encoder: the prompt encoder and mask decoder are loaded through
``shared.sam_models.build_prompt_and_mask_decoder`` from the very checkpoint the cache was made
with. That file is found at ``--checkpoint``, else at the cache's ``checkpoint_path`` hint,
else by ``resolve_checkpoint``'s cache-dir lookup, and accepted only when its sha256 equals the
cache's ``checkpoint_sha256`` (``check_same_model`` names both otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.cache_format import CacheAttrs, check_same_model
from shared.cache_io import open_cache
from shared.hashing import file_sha256
from shared.sam_models import (
    CheckpointError,
    build_prompt_and_mask_decoder,
    detect_model_type,
    load_state_dict,
    resolve_checkpoint,
)
from stage2_decoder import checkpoints as ck
from stage2_decoder.config import ConfigError, TrainConfig, merge_resumed
from stage2_decoder.dataset import Split, load_split
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.schedule import default_warmup


@dataclass(frozen=True)
class Distributed:
    """Rank and world size: the one place the loop asks. Rank 0 writes files (DDP: later)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """Everything the loop needs, prepared by ``setup_run``."""

    config: TrainConfig
    out: Path
    device: torch.device
    precision: str
    split: Split
    model: PromptableDecoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    cache_identity: dict[str, str]
    start_step: int = 0
    best_metric: float = float("-inf")
    last_val: dict[str, float] = field(default_factory=dict)
    dist: Distributed = field(default_factory=Distributed)
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)

    def check_frozen(self) -> None:
        """Raise if a frozen parameter became trainable or changed."""
        params = dict(self.model.named_parameters())
        for name, before in self.frozen.items():
            if params[name].requires_grad or not torch.equal(params[name].detach().cpu(), before):
                raise RuntimeError(f"frozen parameter {name} was trained; this is a bug")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA with bf16 and on CPUs with bf16 units, fp16 on older GPUs, else
    fp32. fp16 needs CUDA (GradScaler)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    return precision


def find_sam_checkpoint(attrs: CacheAttrs, given: str | None, where: str) -> Path:
    """The SAM checkpoint file whose sha256 is the cache's; errors name both models."""
    if given:
        path = resolve_checkpoint(attrs.model_type, given)
        _require_same(attrs, path, where)
        return path
    tried = []
    hint = Path(attrs.checkpoint_path) if attrs.checkpoint_path else None
    if hint is not None and hint.is_file():
        if file_sha256(hint) == attrs.checkpoint_sha256:
            return hint
        tried.append(str(hint))
    try:
        found = resolve_checkpoint(attrs.model_type, None)
    except CheckpointError as error:
        raise CheckpointError(f"{where} was made with {attrs.describe_model()}: {error}") from None
    if file_sha256(found) == attrs.checkpoint_sha256:
        return found
    tried.append(str(found))
    raise CheckpointError(
        f"{where} was made with {attrs.describe_model()}; no file with that sha256 was found "
        f"(tried {', '.join(tried)}). Pass the checkpoint used for `embed run` with --checkpoint."
    )


def _require_same(attrs: CacheAttrs, path: Path, where: str) -> None:
    sha = file_sha256(path)
    if sha == attrs.checkpoint_sha256:
        return
    try:
        model_type = detect_model_type(load_state_dict(path, mmap=True))
    except CheckpointError:
        model_type = "an unknown model"
    check_same_model(attrs, model_type, sha, path.name, where)


def build_model(model_type: str, path: Path, train_prompt_encoder: bool) -> PromptableDecoder:
    """Prompt encoder + mask decoder from ``path``; mask decoder trainable, prompt encoder only
    with ``train_prompt_encoder``. Asserts that exactly those parameters require grad."""
    prompt_encoder, mask_decoder = build_prompt_and_mask_decoder(model_type, path)
    model = PromptableDecoder(prompt_encoder, mask_decoder)
    prompt_encoder.requires_grad_(train_prompt_encoder)
    mask_decoder.requires_grad_(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("mask_decoder.", "prompt_encoder.") if train_prompt_encoder else ("mask_decoder.",)
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    if trainable != expected:
        raise RuntimeError(f"trainable parameters differ from the plan: {trainable ^ expected}")
    return model


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: weight decay on matrices (ndim >= 2), none on biases, norms and scalars."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


def _resume_config(
    config: TrainConfig, explicit: set[str] | None, warn: Callable[[str], None]
) -> tuple[TrainConfig, dict[str, Any] | None]:
    out = Path(config.out)
    if not config.resume:
        if (out / ck.LAST).exists():
            raise ck.ResumeError(
                f"{out} already holds a run ({ck.LAST}); pass --resume to continue it, "
                "or choose another --out"
            )
        return config, None
    state = ck.load_checkpoint(out / ck.LAST)
    merged, conflicts = merge_resumed(TrainConfig.from_dict(state["config"]), config, explicit)
    for conflict in conflicts:
        warn(f"--resume keeps the checkpoint's options; ignoring {conflict}")
    return merged, state


def setup_run(
    config: TrainConfig,
    *,
    explicit: set[str] | None = None,
    warn: Callable[[str], None] = print,
    dist: Distributed | None = None,
) -> Run:
    """Prepare a fresh or resumed run (see the module docstring); writes ``config.json``."""
    dist = dist or Distributed()
    config, state = _resume_config(config, explicit, warn)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    cache = open_cache(config.cache)
    attrs = cache.attrs
    identity = {"model_type": attrs.model_type, "checkpoint_sha256": attrs.checkpoint_sha256,
                "checkpoint_name": attrs.checkpoint_name}  # fmt: skip
    if state is not None and state["cache"]["checkpoint_sha256"] != attrs.checkpoint_sha256:
        raise ck.ResumeError(
            f"the run in {config.out} was trained from a cache of {state['cache']['model_type']} "
            f"(sha256 {state['cache']['checkpoint_sha256'][:12]}…); {cache.name} was made with "
            f"{attrs.describe_model()}. Resume with the same --cache."
        )
    path = find_sam_checkpoint(attrs, config.checkpoint, cache.name)
    model = build_model(attrs.model_type, path, config.train_prompt_encoder).to(device)
    split = load_split(config.cache, config.val_fraction, config.seed)
    per_epoch = math.ceil(split.train.num_rows / (config.images_per_step * dist.world_size))
    steps_per_epoch = math.ceil(per_epoch / config.grad_accum)
    total = steps_per_epoch * config.epochs
    run = Run(
        config=config, out=Path(config.out), device=device, precision=precision, split=split,
        model=model, optimizer=make_optimizer(model, config),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        steps_per_epoch=steps_per_epoch, total_steps=total,
        warmup=default_warmup(total, config.warmup_steps), cache_identity=identity, dist=dist,
    )  # fmt: skip
    if state is not None:
        _restore(run, state, warn)
    run.frozen = {
        n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    if dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        ck.MetricSink(run.out / ck.METRICS).truncate_after(run.start_step)
        ck.write_json(run.out / ck.CONFIG, config.to_dict())
    return run


def _restore(run: Run, state: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Load model, optimizer, scaler and RNG states; start after the checkpoint's step."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ck.set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    run.best_metric = float(state["best_metric"])
    if state["schedule"]["total"] != run.total_steps:
        warn(
            f"the run had {state['schedule']['total']} steps, the cache now gives "
            f"{run.total_steps} (its images changed): the resumed run differs from the original"
        )

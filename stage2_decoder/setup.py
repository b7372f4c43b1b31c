"""Preparing a training run: run folder, resume, device, the model, the ranks (DDP).

Stage 2 never builds the image encoder: the prompt encoder and mask decoder are loaded through
``shared.sam_models.build_prompt_and_mask_decoder`` from the very checkpoint the cache was made
with. That file is found at ``--checkpoint``, else at the cache's ``checkpoint_path`` hint,
else by ``resolve_checkpoint``'s cache-dir lookup, and accepted only when its sha256 equals the
cache's ``checkpoint_sha256`` (``check_same_model`` names both otherwise).

Several processes (torchrun): ``Distributed`` is the one place that knows rank and world size.
It starts the process group (NCCL on CUDA, one GPU per process; gloo on CPU), wraps the model in
DistributedDataParallel and holds every other collective of a run (rank 0 reads ``last.pt`` and
sends it to all; sums of metrics over the ranks). Only rank 0 writes files.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from shared.cache_format import CacheAttrs, check_same_model
from shared.cache_io import open_cache
from shared.checkpoint_files import resolve_checkpoint
from shared.hashing import file_sha256
from shared.output_folders import claim_output_folder
from shared.sam_models import (
    CheckpointError,
    build_prompt_and_mask_decoder,
    detect_model_type,
    load_state_dict,
)
from stage2_decoder import checkpoints as ck
from stage2_decoder.config import ConfigError, TrainConfig, merge_resumed
from stage2_decoder.dataset import Split, load_split
from stage2_decoder.guards import check_cache_finished
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.replay import replay_images
from stage2_decoder.schedule import default_warmup

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and the collectives of a run (one process: rank 0 of 1, no-ops).
    Every rank calls the methods that communicate in the same order (the loop's schedule
    does not depend on the data)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Distributed:
        """From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (absent: one process)."""
        env = os.environ if environ is None else environ
        try:
            world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError(
                f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK="
                f"{env.get('LOCAL_RANK')!r} are not integers; start several processes with torchrun"
            ) from None
        if not (world >= 1 and 0 <= rank < world and local >= 0):
            raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, local)

    def device(self, name: str) -> torch.device:
        """``--device`` resolved; with several processes on CUDA, GPU ``LOCAL_RANK``."""
        device = resolve_device(name)
        if device.type != "cuda" or not self.enabled:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process LOCAL_RANK={self.local_rank} has no GPU ({torch.cuda.device_count()} "
                "visible): start one process per GPU (torchrun --nproc-per-node <GPUs>)"
            )
        return torch.device("cuda", self.local_rank)

    @contextmanager
    def started(self, device: torch.device) -> Iterator[Distributed]:
        """The process group for the run's lifetime: NCCL on CUDA, gloo on CPU."""
        if not self.enabled:
            yield self
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend, rank=self.rank, world_size=self.world_size,
            device_id=device if device.type == "cuda" else None,
        )  # fmt: skip
        try:
            yield self
        finally:
            torch_dist.destroy_process_group()

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 only and sent to every rank; its error is raised on all."""
        if not self.enabled:
            return make()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [("ok", make())]
            except Exception as error:  # every rank must leave the broadcast, then raise
                box = [("error", error)]
        torch_dist.broadcast_object_list(box, src=0, device=self._device())
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each key's sum over the ranks (a key a rank lacks counts 0 there), in float64."""
        if not self.enabled:
            return dict(values)
        every: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(every, sorted(values))
        keys = sorted(set().union(*every))
        totals = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64,
                              device=self._device())  # fmt: skip
        torch_dist.all_reduce(totals)
        return dict(zip(keys, totals.tolist(), strict=True))

    def wrap(self, model: torch.nn.Module, device: torch.device) -> DistributedDataParallel | None:
        """DistributedDataParallel around ``model`` for ``average_gradients`` (None: 1 process).

        Training runs on ``model`` itself: backward passes only accumulate gradients (as under
        ``no_sync``, however many calls step.py makes). Buffers (constants) are not broadcast.
        """
        if not self.enabled:
            return None
        # torch >= 2.13 renamed broadcast_buffers (a FutureWarning), older ones lack the new name
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(
            _AllParameters(model), device_ids=[device.index] if device.type == "cuda" else None,
            **no_buffer_sync,
        )  # fmt: skip

    def _device(self) -> torch.device:
        if torch_dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class _AllParameters(torch.nn.Module):
    """What DDP wraps: ``forward()`` is 0 · (sum of every trainable parameter of ``model``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self) -> torch.Tensor:
        trainable = [p.sum() for p in self.model.parameters() if p.requires_grad]
        return torch.stack(trainable).sum() * 0.0


def average_gradients(ddp: DistributedDataParallel) -> None:
    """Each rank's gradients become their mean over the ranks: the backward of DDP's zero adds
    0 to every trainable gradient and makes DDP all-reduce them (bucketed). Every rank calls it
    once per optimizer step, also one that had no object, so the collectives always match."""
    ddp().backward()


@dataclass
class Run:
    """Everything the loop needs, prepared by ``setup_run``."""

    config: TrainConfig
    out: Path
    device: torch.device
    precision: str
    split: Split
    replay_images: pa.Table | None  # train images of --replay (replay.py), or None
    model: PromptableDecoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    cache_identity: dict[str, str]
    start_step: int = 0
    saved_step: int = 0  # step of the last.pt on disk (0: none yet)
    best_metric: float = float("-inf")
    last_val: dict[str, float] = field(default_factory=dict)
    dist: Distributed = field(default_factory=Distributed)
    ddp: DistributedDataParallel | None = None  # for average_gradients (several ranks)
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
        claim_output_folder(out, "decoder train")
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
    """Prepare a fresh or resumed run (see the module docstring); rank 0 writes ``config.json``.

    With several processes ``dist`` must be started (``Distributed.started``): rank 0 checks the
    run folder and reads ``last.pt``, every rank gets the result (or the error).
    """
    dist = dist or Distributed()
    config, state = dist.from_main(lambda: _resume_config(config, explicit, warn))
    device = dist.device(config.device)
    precision = resolve_precision(config.precision, device)
    cache = open_cache(config.cache)
    if dist.is_main:
        check_cache_finished(cache, config.allow_partial_cache, warn)
    check_views(cache.name, cache.attrs.views, config.views)
    replayed = replay_images(config, cache.attrs, warn, dist.is_main)
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
    per_epoch = math.ceil(split.train.num_rows / config.images_per_step)  # global micro-batches
    steps_per_epoch = math.ceil(per_epoch / config.grad_accum)
    total = steps_per_epoch * config.epochs
    run = Run(
        config=config, out=Path(config.out), device=device, precision=precision, split=split,
        replay_images=replayed, model=model, optimizer=make_optimizer(model, config),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        steps_per_epoch=steps_per_epoch, total_steps=total,
        warmup=default_warmup(total, config.warmup_steps), cache_identity=identity, dist=dist,
    )  # fmt: skip
    if state is not None:
        _restore(run, state, warn)
    if dist.is_main and config.images_per_step < dist.world_size:
        warn(
            f"--images-per-step {config.images_per_step} is the batch of all "
            f"{dist.world_size} processes together: some get no image; use at least "
            f"{dist.world_size} (a multiple of {dist.world_size} balances the work)"
        )
    run.frozen = {
        n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    run.ddp = dist.wrap(model, device)
    if dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        removed = ck.remove_orphan_temps(run.out)
        if removed:
            warn(
                f"removed {len(removed)} temp file(s) left by a killed write: {', '.join(removed)}"
            )
        ck.MetricSink(run.out / ck.METRICS).truncate_after(run.start_step)
        ck.write_json(run.out / ck.CONFIG, config.to_dict())
    return run


def check_views(cache_name: str, stored: tuple[str, ...], asked: tuple[str, ...]) -> None:
    """Refuse ``--views`` the cache does not store, saying how to add them."""
    missing = [v for v in asked if v not in stored]
    if not missing:
        return
    have = f"stores the views {','.join(stored)}" if stored else "stores no views"
    raise ConfigError(
        f"--views {','.join(asked)}: {cache_name} {have}. Add them with `embed run --images DIR "
        f"--out {cache_name} --views {','.join(asked)}` (only the views are encoded), or drop "
        f"--views {','.join(missing)}"
    )


def _restore(run: Run, state: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Load model, optimizer, scaler and RNG states; start after the checkpoint's step."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ck.set_rng_state(state["rng"])
    run.start_step = run.saved_step = int(state["step"])
    run.best_metric = float(state["best_metric"])
    saved_world = int(state.get("world_size", 1))
    if saved_world != run.dist.world_size and run.dist.is_main:
        warn(
            f"resuming a run of {saved_world} process(es) with {run.dist.world_size}: the data "
            "order and prompts are the same, float sums add up in another order (weights "
            "agree to ~1e-6, not bit for bit)"
        )
    if state["schedule"]["total"] != run.total_steps:
        warn(
            f"the run had {state['schedule']['total']} steps, the cache now gives "
            f"{run.total_steps} (its images changed): the resumed run differs from the original"
        )

"""TrainConfig: the one frozen config of `decoder train`, validated on construction.

Every option of the command is a field (the CLI fills it, tests build it directly). It is written
to ``<out>/config.json`` and stored in every checkpoint, so a run says how it was made. On
``--resume`` the checkpoint's config wins (``merge_resumed``), except for the *operational*
options, which say where things are or how fast to go and do not change the result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

PROMPT_KINDS = ("point", "box")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOSSES = ("focal_dice", "bce_dice")

# Options the command line may change on --resume without changing the result: where the cache,
# SAM checkpoint and run folder are, the device, worker processes, how often to log/save.
OPERATIONAL = frozenset(
    {
        "cache",
        "out",
        "checkpoint",
        "device",
        "num_workers",
        "log_every",
        "checkpoint_every",
        "resume",
        "allow_partial_cache",
    }
)


class ConfigError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: float, minimum: float) -> None:
    if not value >= minimum:  # also catches NaN
        raise ConfigError(f"{_flag(name)} must be >= {minimum}, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_flag(name)} {value!r} is not one of {', '.join(allowed)}")


def parse_prompts(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"box,point"`` → ``("point", "box")`` (canonical order); errors name the bad kind."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not kinds:
        raise ConfigError("--prompts is empty; use point, box or point,box")
    for kind in kinds:
        if kind not in PROMPT_KINDS:
            raise ConfigError(f"--prompts: {kind!r} is not one of point, box (e.g. point,box)")
    return tuple(kind for kind in PROMPT_KINDS if kind in kinds)  # canonical order


def _parse_views(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    from shared.views import ViewError, parse_views

    try:
        return parse_views(text)
    except ViewError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class TrainConfig:
    """Options of `decoder train`; defaults are the documented recipe (see README / train.py).

    ``iterations``: prompt iterations per object and step (SAM's recipe: 11 = first prompt +
    8 corrective clicks + 2 mask-only; 1 = single shot). ``warmup_steps`` -1 means
    ``min(250, 5 % of all steps)``. ``lr`` 1e-4 with ``weight_decay`` 0.01: see train.py.
    ``replay``: a cache of the model's home domain mixed into every step (replay.py).
    """

    cache: str
    out: str
    prompts: tuple[str, ...] = ("point", "box")
    epochs: int = 20
    iterations: int = 11
    images_per_step: int = 8
    objects_per_image: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = -1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss: str = "focal_dice"
    precision: str = "auto"
    train_prompt_encoder: bool = False
    val_fraction: float = 0.1
    seed: int = 0
    checkpoint: str | None = None
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 0
    resume: bool = False
    allow_partial_cache: bool = False  # train while an `embed run` still writes the cache
    views: tuple[str, ...] = ()  # stored views each object may be seen in (() : originals only)
    replay: str | None = None  # a cache of home-domain images mixed into each step (replay.py)
    replay_images: int = -1  # replay images per micro-batch; -1: images_per_step

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_prompts(self.prompts))
        object.__setattr__(self, "views", _parse_views(self.views))
        for name in ("epochs", "iterations", "images_per_step", "objects_per_image", "grad_accum"):
            _at_least(name, getattr(self, name), 1)
        for name in ("num_workers", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        _at_least("log_every", self.log_every, 1)
        _at_least("warmup_steps", self.warmup_steps, -1)
        _at_least("replay_images", self.replay_images, -1)
        if self.replay_images == 0 or (self.replay_images > 0 and not self.replay):
            raise ConfigError(
                f"--replay-images {self.replay_images}: give --replay CACHE (images of the "
                "model's home domain) with a count >= 1, or leave both out"
            )
        _at_least("weight_decay", self.weight_decay, 0.0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in 0..1, got {self.min_lr_ratio}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        _choice("loss", self.loss, LOSSES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")

    @property
    def replay_images_per_step(self) -> int:
        """Images of ``replay`` added to each micro-batch (0 without ``replay``)."""
        if not self.replay:
            return 0
        return self.replay_images if self.replay_images > 0 else self.images_per_step

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["prompts"] = list(self.prompts)
        data["views"] = list(self.views)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys (from a newer samcache) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def merge_resumed(
    saved: TrainConfig, given: TrainConfig, explicit: set[str] | None = None
) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run uses, and one message per command-line option it overrode.

    ``saved`` (from the checkpoint) wins for every option that changes the result; operational
    options (``OPERATIONAL``) come from ``given``. ``explicit`` names the options the user typed;
    only those are reported (None: report every difference).
    """
    merged = dataclasses.replace(saved, **{k: getattr(given, k) for k in OPERATIONAL})
    conflicts = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in OPERATIONAL or (explicit is not None and name not in explicit):
            continue
        ours, theirs = getattr(saved, name), getattr(given, name)
        if ours != theirs:
            conflicts.append(f"{_flag(name)} {_show(theirs)} (checkpoint: {_show(ours)})")
    return merged, conflicts


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)

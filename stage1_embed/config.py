"""EmbedConfig: the one frozen config of `embed run`, validated on construction.

It is stored in the cache's attributes (``embed_config``) so a cache says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_tiny_random", "samcache_tiny")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
MASK_KINDS = ("auto", "binary", "instance")
DTYPES = ("float16", "float32")


class ConfigError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}"
        )


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class EmbedConfig:
    """Options of `embed run` (the CLI fills it; tests build it directly)."""

    images: str
    out: str
    model_type: str = "vit_b"
    checkpoint: str | None = None
    recursive: bool = True
    masks: str | None = None
    mask_kind: str = "auto"
    coco: str | None = None
    dtype: str = "float16"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 0  # 0: 1 image per forward on CPU, 8 on CUDA
    workers: int = 1
    scheduler: str | None = None
    max_pixels: int = 500_000_000
    download: bool = True
    repair: bool = False  # re-encode the rows `embed verify` finds damaged
    views: tuple[str, ...] = ()  # augmented views to store too (shared.views.VIEWS)

    def __post_init__(self) -> None:
        from shared.views import ViewError, parse_views

        try:
            object.__setattr__(self, "views", parse_views(self.views))
        except ViewError as exc:
            raise ConfigError(str(exc)) from None
        _choice("model_type", self.model_type, MODEL_TYPES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("mask_kind", self.mask_kind, MASK_KINDS)
        _choice("dtype", self.dtype, DTYPES)
        _positive("batch_size", self.batch_size, minimum=0)
        _positive("workers", self.workers)
        _positive("max_pixels", self.max_pixels, minimum=4)
        if self.masks and self.coco:
            raise ConfigError("give either --masks or --coco, not both")
        if self.scheduler and self.workers != 1:
            raise ConfigError(
                "--workers starts a local Dask cluster; with --scheduler the cluster's own "
                "workers are used: drop one of the two"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["views"] = list(self.views)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class LabelsConfig:
    """Options of `embed labels`: exactly one annotation source for the images of ``cache``."""

    cache: str
    masks: str | None = None
    mask_kind: str = "auto"
    coco: str | None = None
    voc: str | None = None

    def __post_init__(self) -> None:
        _choice("mask_kind", self.mask_kind, MASK_KINDS)
        given = [name for name in ("masks", "coco", "voc") if getattr(self, name)]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of --masks DIR, --coco instances.json or --voc VOC2007"
                + (f" (got {', '.join('--' + g for g in given)})" if given else "")
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

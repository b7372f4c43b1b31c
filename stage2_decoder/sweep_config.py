"""SweepConfig: the frozen config of `decoder sweep`, and its trials (pure: no files, no Dask).

A sweep varies some options of `decoder train` (``SWEPT``), each given as an ``Axis``: a list
of values (``--lr 1e-5,1e-4``; for ``--prompts`` the values are separated by ``;`` because
``point,box`` is one value) or a range ``low:high`` (``--lr 1e-5:1e-3``, only with ``--random``).

- grid (``random == 0``): every combination of the lists, in ``SWEPT`` order;
- random (``random == N``): N trials, each option drawn with ``random.Random(seed)``: a list
  uniformly, a range of ``lr`` / ``weight_decay`` log-uniformly (uniformly when ``low`` is 0),
  an integer range uniformly over its integers. Drawn floats keep 3 significant digits.

A trial's name is its index and the values of the options that vary, e.g.
``t003-lr3e-5-box-it11``; it names its run folder ``<out>/trials/<name>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from stage2_decoder.config import LOSSES, ConfigError, TrainConfig, parse_prompts

# Options of `decoder train` a sweep can vary, in the order of trial names and grid loops.
SWEPT = ("lr", "prompts", "iterations", "weight_decay", "warmup_steps", "images_per_step",
         "objects_per_image", "loss")  # fmt: skip
FLOATS = frozenset({"lr", "weight_decay"})
INTEGERS = frozenset({"iterations", "warmup_steps", "images_per_step", "objects_per_image"})
EARLY_STOPS = ("none", "median")
# Options `--resume` takes from the command line (where things are, how many workers): they do
# not change any trial's result.
OPERATIONAL = frozenset({"cache", "out", "checkpoint", "device", "workers", "scheduler", "threads"})
_PREFIX = {"lr": "lr", "iterations": "it", "weight_decay": "wd", "warmup_steps": "wu",
           "images_per_step": "ips", "objects_per_image": "opi"}  # fmt: skip


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Axis:
    """One swept option: ``values`` (a list) or ``low``..``high`` (a range, ``--random`` only).

    Values are stored as `decoder train` takes them: numbers, ``prompts`` as ``"point,box"``.
    """

    name: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None

    @property
    def varies(self) -> bool:
        return self.is_range or len(self.values) > 1

    def describe(self) -> str:
        """As typed: ``1e-5,1e-4``, ``1e-5:1e-3`` or ``point;box`` (prompts)."""
        if self.is_range:
            return f"{self.low:g}:{self.high:g}"
        return (";" if self.name == "prompts" else ",").join(str(v) for v in self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values), "low": self.low,
                "high": self.high}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Axis:
        return cls(data["name"], tuple(data.get("values") or ()), data.get("low"),
                   data.get("high"))  # fmt: skip


def _check_value(name: str, value: Any) -> Any:
    """``value`` as `decoder train` validates it (errors name the option and the value)."""
    config = TrainConfig(cache="-", out="-", **{name: value})
    got = getattr(config, name)
    return ",".join(got) if name == "prompts" else got


def _number(name: str, text: str) -> float | int:
    try:
        return int(text) if name in INTEGERS else float(text)
    except ValueError:
        kind = "an integer" if name in INTEGERS else "a number"
        raise ConfigError(f"{flag(name)}: {text!r} is not {kind}") from None


def parse_axis(name: str, text: str) -> Axis:
    """``"1e-5,1e-4"`` → a list, ``"1e-5:1e-3"`` → a range; ``prompts`` lists use ``;``."""
    if name not in SWEPT:
        raise ConfigError(f"{flag(name)} cannot be swept; these can: " +
                          ", ".join(flag(n) for n in SWEPT))  # fmt: skip
    text = text.strip()
    if ":" in text and name in FLOATS | INTEGERS:
        low_text, _, high_text = text.partition(":")
        low, high = _number(name, low_text), _number(name, high_text)
        _check_value(name, low)
        _check_value(name, high)
        if not low < high:
            raise ConfigError(f"{flag(name)} {text}: a range is low:high with low < high")
        return Axis(name, low=low, high=high)
    separator = ";" if name == "prompts" else ","
    items = [item.strip() for item in text.split(separator) if item.strip()]
    if not items:
        raise ConfigError(f"{flag(name)} is empty")
    if name == "prompts":
        values: list[Any] = [",".join(parse_prompts(item)) for item in items]
    elif name == "loss":
        values = items
        for value in values:
            if value not in LOSSES:
                raise ConfigError(f"--loss {value!r} is not one of {', '.join(LOSSES)}")
    else:
        values = [_check_value(name, _number(name, item)) for item in items]
    return Axis(name, tuple(dict.fromkeys(values)))


@dataclass(frozen=True)
class SweepConfig:
    """Options of `decoder sweep` (stored in ``<out>/sweep.json``); ``axes`` in ``SWEPT`` order.

    Options not swept keep `decoder train`'s defaults; ``epochs`` and those below it are the
    same for every trial. ``early_stop`` "median": see ``sweep_board.median_rule``.
    """

    cache: str
    out: str
    axes: tuple[Axis, ...] = ()
    random: int = 0
    seed: int = 0
    epochs: int = 10
    early_stop: str = "none"
    grace_epochs: int = 1
    val_fraction: float = 0.1
    precision: str = "auto"
    checkpoint_every: int = 20
    log_every: int = 10
    checkpoint: str | None = None
    device: str = "auto"
    workers: int = 2
    scheduler: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        names = [axis.name for axis in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError(f"an option is swept twice: {', '.join(names)}")
        object.__setattr__(
            self, "axes", tuple(sorted(self.axes, key=lambda a: SWEPT.index(a.name)))
        )
        for name in ("epochs", "grace_epochs", "workers", "threads"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.random < 0:
            raise ConfigError(f"--random must be >= 0 (0: the whole grid), got {self.random}")
        if self.early_stop not in EARLY_STOPS:
            raise ConfigError(f"--early-stop {self.early_stop!r} is not one of none, median")
        ranges = [flag(a.name) for a in self.axes if a.is_range]
        if ranges and not self.random:
            raise ConfigError(f"{', '.join(ranges)} given as a range low:high: pass --random N "
                              "to draw N trials, or give a list (a,b,c) for the grid")  # fmt: skip
        self.train_config("-")  # the fixed options are valid for `decoder train`

    def axis(self, name: str) -> Axis | None:
        return next((axis for axis in self.axes if axis.name == name), None)

    def train_config(self, out: str, options: dict[str, Any] | None = None) -> TrainConfig:
        """The `decoder train` config of a trial with ``options`` (a trial runs in one worker:
        no DataLoader processes)."""
        return TrainConfig(
            cache=self.cache or "-", out=out, epochs=self.epochs, val_fraction=self.val_fraction,
            precision=self.precision, seed=self.seed, checkpoint=self.checkpoint,
            device=self.device, num_workers=0, log_every=self.log_every,
            checkpoint_every=self.checkpoint_every, **(options or {}),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["axes"] = [axis.to_dict() for axis in self.axes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        kept["axes"] = tuple(Axis.from_dict(a) for a in data.get("axes", ()))
        return cls(**kept)


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: its index, name and the swept options' values."""

    index: int
    name: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(int(data["index"]), str(data["name"]), dict(data["options"]))


def short_number(value: float | int) -> str:
    """A number for a folder name: ``1e-4``, ``3.5e-5``, ``0.01``, ``11``."""
    if isinstance(value, int) or value == 0 or 0.01 <= abs(value) < 1e4:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def trial_name(index: int, options: dict[str, Any], varying: list[str]) -> str:
    """``t<index>`` plus the values of the ``varying`` options (prompts ``point+box``)."""
    parts = [f"t{index:03d}"]
    for name in varying:
        value = options[name]
        if name in _PREFIX:
            parts.append(_PREFIX[name] + short_number(value))
        else:  # prompts, loss: the value itself
            parts.append(str(value).replace(",", "+"))
    name = "-".join(parts)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ConfigError(f"trial name {name!r} is not a safe folder name; this is a bug")
    return name


def draw(axis: Axis, rng: random.Random) -> Any:
    """One value of ``axis``: a list uniformly, a range as the module docstring says."""
    if not axis.is_range:
        return rng.choice(axis.values)
    low, high = axis.low, axis.high
    assert low is not None and high is not None
    if axis.name in INTEGERS:
        return rng.randint(int(low), int(high))
    if low > 0:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return float(f"{value:.3g}")


def expand(config: SweepConfig) -> list[Trial]:
    """The trials of ``config``: the grid, or ``config.random`` seeded draws."""
    axes = config.axes
    if config.random:
        rng = random.Random(config.seed)
        combos = [tuple(draw(axis, rng) for axis in axes) for _ in range(config.random)]
    else:
        combos = list(itertools.product(*(axis.values for axis in axes)))
    varying = [axis.name for axis in axes if axis.varies]
    trials = []
    for index, combo in enumerate(combos):
        options = {axis.name: value for axis, value in zip(axes, combo, strict=True)}
        trials.append(Trial(index, trial_name(index, options, varying), options))
    return trials


def merge_resumed(saved: SweepConfig, given: SweepConfig, explicit: set[str]) -> SweepConfig:
    """``saved`` with the operational options of ``given``; an option typed with another value
    than the sweep's is refused (a resumed sweep must run the trials it started with)."""
    conflicts = []
    for name in sorted(explicit - OPERATIONAL - {"resume"}):
        ours = saved.axis(name) if name in SWEPT else getattr(saved, name, None)
        theirs = given.axis(name) if name in SWEPT else getattr(given, name, None)
        if ours != theirs:
            conflicts.append(f"{flag(name)} {_show(theirs)} (sweep.json: {_show(ours)})")
    if conflicts:
        raise ConfigError(
            f"--resume continues the sweep in {saved.out} as it was started; these options "
            f"differ: {'; '.join(conflicts)}. Drop them, or start a new sweep with another --out"
        )
    typed = (OPERATIONAL - {"out"}) & explicit
    return dataclasses.replace(saved, **{k: getattr(given, k) for k in typed})


def _show(value: Any) -> str:
    if value is None:
        return "(not given)"
    return value.describe() if isinstance(value, Axis) else str(value)

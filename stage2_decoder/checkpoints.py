"""The run folder's files: training checkpoints (``last.pt``, ``best.pt``) and ``metrics.jsonl``.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (STYLE.md 12). Keys:

- ``format`` / ``format_version``: ``"samcache-decoder-train"`` / 1;
- ``model``: the ``PromptableDecoder`` state dict, Meta's key names ``prompt_encoder.*`` and
  ``mask_decoder.*`` (loads into a SAM checkpoint's decoder side as is);
- ``optimizer``, ``scaler`` (GradScaler state or None), ``schedule`` (step, warmup, total);
- ``rng``: torch (CPU and the current CUDA device), Python and numpy generator states of rank
  0. Training derives every random number of step s from ``(seed, s)``, so these are saved for
  completeness only;
- ``epoch`` (epochs finished), ``step`` (optimizer steps done), ``best_metric``, ``config``
  (``TrainConfig.to_dict``), ``cache`` (model_type, checkpoint_sha256, checkpoint_name),
  ``world_size`` (processes that trained it; any number may resume it).

Only rank 0 of a distributed run writes these files, while holding ``train.lock`` (one
``decoder train`` per run folder; the file stays, the ``flock`` goes with its process).

Writes are atomic: a temp file in the same folder, fsync, ``os.replace``, fsync of the folder.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from shared.files import atomic_write

CHECKPOINT_FORMAT = "samcache-decoder-train"
CHECKPOINT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
METRICS, CONFIG = "metrics.jsonl", "config.json"
TRAIN_LOCK = "train.lock"  # held by the one `decoder train` writing the run folder
# atomic_write's temp files: ".<name>.<12 hex>.tmp" (left behind only by a killed write)
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


class ResumeError(ValueError):
    """A run cannot be resumed as asked; the message says what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk…); says what was kept and what to do."""


def remove_orphan_temps(folder: str | Path) -> list[str]:
    """Delete temp files of killed atomic writes in the run folder; returns their names.
    Call only while holding the run folder's lock (no other writer can be mid-write)."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and _TEMP_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Generator states of torch (CPU, current CUDA device), Python and numpy.

    Only the current CUDA device, and only once CUDA is in use: ``get_rng_state_all`` would
    open a context on every visible GPU from every process of a multi-GPU run.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state`` (the CUDA state goes to the current device, if CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"][0])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (adds ``format`` / ``format_version``)."""
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded with ``weights_only=True`` on CPU; errors say what to do."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(
            f"no checkpoint at {path} to resume from; run without --resume to start a new run"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ResumeError(
            f"cannot read checkpoint {path} ({error}); delete it or use another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a `decoder train` checkpoint ({CHECKPOINT_FORMAT})")
    if state.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ResumeError(
            f"{path} has format_version {state['format_version']}; this samcache reads "
            f"up to {CHECKPOINT_VERSION}. Upgrade samcache."
        )
    return state


def decoder_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``prompt_encoder.*`` / ``mask_decoder.*`` tensors of a training checkpoint."""
    return dict(state["model"])


# --------------------------------------------------------------------------- metrics.jsonl


class MetricSink:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed per line).

    ``truncate_after(step)`` drops every line whose ``step`` is larger, so a resumed run's
    curves have no duplicates (lines at the checkpoint's own step were written before it).
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._handle: IO[str] | None = None

    def truncate_after(self, step: int) -> int:
        """Keep lines with ``step <= step`` (atomic rewrite); returns how many were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _line_step(line) <= step]
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda handle: handle.write(text.encode()))
        return len(lines) - len(kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line (killed mid-write) is dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (torn or empty lines skipped)."""
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records

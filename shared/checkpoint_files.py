"""Checkpoint files: random checkpoints in Meta's format, the cache dir, verified downloads."""

from __future__ import annotations

import logging
import os
import urllib.request
from functools import partial
from pathlib import Path
from typing import IO

import torch

from shared.files import atomic_write
from shared.hashing import file_sha256
from shared.sam_models import (
    CheckpointError,
    SamModelSpec,
    _existing_file,
    _new_sam,
    bundled_checkpoint_path,
    get_model_spec,
)

log = logging.getLogger(__name__)


def make_random_checkpoint(model_type: str, path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised ``Sam`` of ``model_type`` in Meta's official format, atomically.

    The file is a plain ``Sam`` state dict with the same keys as Meta's files (Meta's
    ``sam_model_registry[...](checkpoint=path)`` loads it). Same seed → same bytes. The global
    torch RNG is left untouched (``torch.random.fork_rng``). Random weights: NOT pretrained.
    """
    spec = get_model_spec(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state_dict = _new_sam(spec).state_dict()
    atomic_write(Path(path), partial(torch.save, state_dict))
    return Path(path)


def default_checkpoint_dir() -> Path:
    """Where checkpoints are looked for (under their official file names) and downloaded to.

    ``$SAMCACHE_HOME/checkpoints`` if ``SAMCACHE_HOME`` is set, else
    ``~/.cache/samcache/checkpoints``.
    """
    home = os.environ.get("SAMCACHE_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "samcache"
    return root / "checkpoints"


def ensure_random_checkpoint(
    model_type: str = "vit_tiny_random", directory: Path | None = None
) -> Path:
    """The seed-0 random (NOT pretrained) checkpoint of ``model_type`` in ``directory``.

    Generated (deterministically) when missing; ``directory`` defaults to
    ``default_checkpoint_dir()``. File: ``samcache_<model_type>_random_seed0.pth`` for Meta's
    types, the spec's name (``samcache_vit_tiny_random_seed0.pth``) for ``vit_tiny_random``.
    """
    spec = get_model_spec(model_type)
    name = f"samcache_{model_type}_random_seed0.pth" if spec.pretrained else spec.checkpoint_name
    path = (default_checkpoint_dir() if directory is None else Path(directory)) / name
    if not path.is_file():
        log.info("generating random (NOT pretrained) %s checkpoint at %s", model_type, path)
        make_random_checkpoint(model_type, path, seed=0)
    return path


def _download_url(url: str, out: IO[bytes], timeout_s: float = 60.0) -> None:
    """Stream ``url`` into the open binary file ``out`` (tests replace this function)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        while block := response.read(1 << 20):
            out.write(block)


def _download_checkpoint(spec: SamModelSpec, directory: Path) -> Path:
    """Download ``spec``'s file into ``directory``; it appears only once its sha256 matches."""
    url, target = str(spec.url), directory / spec.checkpoint_name
    hint = f"download it from {url} and pass --checkpoint PATH, or put it in {directory}"
    digest: list[str] = []

    def write(out: IO[bytes]) -> None:
        _download_url(url, out)
        out.flush()
        digest.append(file_sha256(out.name))
        if digest[0] != spec.sha256:
            raise CheckpointError(
                f"downloaded {spec.checkpoint_name} has sha256 {digest[0]}, expected "
                f"{spec.sha256} (corrupt or changed download); {hint}"
            )

    log.info("downloading %s from %s", spec.checkpoint_name, url)
    try:
        atomic_write(target, write)
    except CheckpointError:
        raise
    except Exception as error:  # offline, HTTP error, disk full, …
        raise CheckpointError(
            f"could not download {spec.checkpoint_name} ({error}); {hint}"
        ) from error
    return target


def resolve_checkpoint(
    model_type: str,
    checkpoint: str | Path | None,
    *,
    download: bool = True,
    directory: Path | None = None,
) -> Path:
    """Path of the checkpoint file to use for ``model_type``.

    1. ``checkpoint`` given: it must exist. 2. Else ``<directory>/<official file name>``
    (``directory`` defaults to ``default_checkpoint_dir()``); such files are not re-hashed.
    3. Else ``vit_tiny_random`` is generated there (seed 0, NOT pretrained) and Meta's models are
    downloaded from Meta's URL (sha256 verified before the file appears) unless ``download`` is
    False. A ``bundled`` model (``samcache_tiny``) is always the file shipped in the package.
    Failures raise a CheckpointError saying what to pass.
    """
    spec = get_model_spec(model_type)
    if checkpoint is not None:
        return _existing_file(Path(checkpoint).expanduser())
    if spec.bundled:
        path = bundled_checkpoint_path(model_type)
        if not path.is_file():
            raise CheckpointError(
                f"the bundled {model_type} checkpoint {path} is missing; reinstall samcache or "
                "make it with `python tools/pretrain_tiny.py`"
            )
        return path
    directory = default_checkpoint_dir() if directory is None else Path(directory)
    cached = directory / spec.checkpoint_name
    if cached.is_file():
        return cached
    if not spec.pretrained:
        return ensure_random_checkpoint(model_type, directory)
    if not download:
        raise CheckpointError(
            f"{spec.checkpoint_name} is not in {directory} and downloading is off; download it "
            f"from {spec.url} and pass --checkpoint PATH, or put it in {directory}"
        )
    return _download_checkpoint(spec, directory)

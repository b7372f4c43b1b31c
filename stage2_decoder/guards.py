"""Guards that keep a user's files whole: one `decoder train` per run folder, no surprise
training on a cache an `embed run` is still writing, and no `decoder export` over an input.

- ``run_folder_lock``: ``train.lock`` in the run folder (``flock``, as ``embed run`` holds
  ``embed.lock`` on a cache), held by rank 0 for the whole run;
- ``check_cache_finished``: the cache's ``embed.lock`` held means images are still pending;
- ``export_inputs`` / ``check_export_out``: the files an export must never replace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.cache_format import LOCK_NAME
from shared.cache_io import Cache, ok_rows, open_cache
from shared.output_folders import claim_output_folder
from shared.storage import CacheLock, parse_location
from stage2_decoder import checkpoints as ck
from stage2_decoder.config import ConfigError

if TYPE_CHECKING:
    from stage2_decoder.setup import Distributed


def check_cache_finished(cache: Cache, allow_partial: bool, warn: Callable[[str], None]) -> None:
    """Refuse (or, with ``allow_partial``, warn about) a cache an `embed run` is still writing:
    training would see only the images committed so far."""
    holder = CacheLock(cache.location, LOCK_NAME).holder()
    if holder is None:
        return
    committed = ok_rows(cache.location, ["image_id"]).num_rows
    text = (
        f"{cache.name} is being written by an `embed run` ({holder}); {committed} images are "
        "committed so far, the others are pending"
    )
    if not allow_partial:
        raise ConfigError(
            f"{text}. Wait for it to finish, or pass --allow-partial-cache to train on those "
            f"{committed}"
        )
    warn(f"{text}: training on those {committed} (--allow-partial-cache)")


@contextmanager
def run_folder_lock(out: Path, dist: Distributed) -> Iterator[None]:
    """One `decoder train` per run folder: rank 0 holds ``train.lock`` in ``out`` for the whole
    run (flock: released by the OS if the process dies); a second train or ``--resume`` of a
    run that is still training is refused on every rank."""
    held: list[CacheLock] = []

    def take() -> None:
        # Never clobber a user's folder: only a new, empty or own run folder (one that holds
        # our last.pt is ours, also from before the marker existed).
        claim_output_folder(out, "decoder train", adopt=(out / ck.LAST).is_file())
        lock = CacheLock(
            parse_location(out), ck.TRAIN_LOCK, writer="`decoder train`",
            hint="Wait for it to finish (or stop it), then --resume it; or choose another --out.",
        )  # fmt: skip
        held.append(lock.__enter__())

    dist.from_main(take)
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.expanduser().resolve() == b.expanduser().resolve()


def export_inputs(
    run: str | Path, state: dict[str, Any], checkpoint: str | None, cache: str | None
) -> tuple[list[Path], list[Path]]:
    """(files, folders) an export reads or that the run and its cache need: the run's
    checkpoints, config and metrics; the SAM checkpoint (given, in the run's config, recorded by
    the cache); the cache itself. An export never writes over (or into) any of them."""
    run = Path(run)
    files = [run / ck.LAST, run / ck.BEST, run / ck.CONFIG, run / ck.METRICS]
    config = state.get("config") or {}
    files += [Path(p) for p in (checkpoint, config.get("checkpoint")) if p]
    folders = []
    for cache_path in (cache, config.get("cache")):
        if not cache_path or "://" in str(cache_path):
            continue
        folders.append(Path(cache_path))
        try:
            recorded = open_cache(cache_path).attrs.checkpoint_path
        except (OSError, ValueError):
            continue
        if recorded:
            files.append(Path(recorded))
    return files, folders


def check_export_out(out: Path, files: list[Path], folders: list[Path], *, overwrite: bool) -> None:
    """Refuse an ``out`` that is an input (even with ``overwrite``) or lies inside the cache;
    an existing file is replaced only with ``overwrite``."""
    for path in files:
        if same_file(out, path):
            raise ValueError(
                f"--out {out} is {path}, an input of this export or of the run (the run's "
                "checkpoints, the SAM checkpoint of its cache): choose another --out"
            )
    resolved = out.expanduser().resolve()
    for folder in folders:
        root = folder.expanduser().resolve()
        if resolved == root or root in resolved.parents:
            raise ValueError(f"--out {out} is inside the cache {folder}: choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out {out} exists; pass --overwrite to replace it, or choose another --out"
        )

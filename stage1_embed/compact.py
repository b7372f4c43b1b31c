"""`embed compact`: one manifest file, no superseded rows, embedding rows nothing uses freed.

The steps and why a ``kill -9`` at any moment is safe are in cache_layout.md "Compaction": the
new manifest is written under a new name, then ``manifest/_current.json`` is replaced in one
step (the switch); only after the switch are the merged files and the chunks of freed rows
deleted. Winning rows keep their ``row`` and their bytes: nothing in use is moved or rewritten.
Freed rows go to the pointer's ``free_rows``, which the next `embed run` reuses first. The view
arrays (``embeddings_<view>``) share the row index: a freed row is freed in each of them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared.cache_format import BASE_PREFIX, LOCK_NAME, TEMP_PREFIX
from shared.cache_io import (
    ManifestState,
    free_rows_on_disk,
    live_manifest_files,
    manifest_names,
    open_cache,
    read_manifest_files,
    read_manifest_state,
    remove_manifest_file,
    remove_stale_temps,
    stored_rows,
    upgrade_format,
    utc_now,
    winning_rows,
    write_base,
    write_manifest_state,
)
from shared.storage import CacheLock, parse_location

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class CompactSummary:
    cache: str
    files_before: int
    rows_before: int
    rows_after: int
    rows_freed: int  # embedding rows no winning row uses (now in the free list)
    chunks_deleted: int
    seconds: float = 0.0

    @property
    def rows_dropped(self) -> int:
        return self.rows_before - self.rows_after


def compact_cache(target: str, progress: Progress | None = None) -> CompactSummary:
    """Compact the cache at ``target``; refused (CacheLockedError) while `embed run` writes it."""
    started = time.perf_counter()
    step = progress or (lambda phase, done, total: None)
    location = parse_location(target)
    with CacheLock(location, LOCK_NAME):
        cache = open_cache(location, read_only=False)
        upgrade_format(cache)
        remove_stale_temps(location)
        state = read_manifest_state(location)
        names = manifest_names(location)
        merged = live_manifest_files(names, state)
        history = read_manifest_files(location, merged)
        winners = winning_rows(history)
        step("read", 1, 1)

        base = write_base(location, winners)
        step("base", 1, 1)
        rows = winners.column("row").to_numpy(zero_copy_only=False)
        in_use = set(rows[rows >= 0].tolist())
        free = tuple(r for r in range(cache.embeddings.shape[0]) if r not in in_use)
        new_state = ManifestState(base, tuple(merged), free, compacted_at=utc_now())
        write_manifest_state(location, new_state)  # the switch
        step("switch", 1, 1)

        garbage = [*merged, *_leftovers(names, state, base)]
        for i, name in enumerate(garbage, start=1):
            remove_manifest_file(location, name)
            step("remove", i, len(garbage))
        write_manifest_state(location, replace(new_state, merged=()))
        step("pointer", 1, 1)

        stored = set().union(*(stored_rows(cache, a.basename) for a in cache.arrays()))
        doomed = sorted(set(free) & stored)  # a row's view rows are freed with it
        for i, row in enumerate(doomed, start=1):
            free_rows_on_disk(cache, [row])
            step("free", i, len(doomed))
    return CompactSummary(
        cache=location.display,
        files_before=len(merged),
        rows_before=history.num_rows,
        rows_after=winners.num_rows,
        rows_freed=len(set(free) - set(state.free_rows)),
        chunks_deleted=len(doomed),
        seconds=time.perf_counter() - started,
    )


def _leftovers(names: list[str], state: ManifestState, base: str) -> list[str]:
    """Files no reader reads: bases not named by the pointer, merged files a killed compaction
    left behind, temps."""
    merged = set(state.merged)
    return [
        n
        for n in names
        if (n.startswith(BASE_PREFIX) and n not in (base, state.base))
        or n in merged
        or n.startswith(TEMP_PREFIX)
    ]

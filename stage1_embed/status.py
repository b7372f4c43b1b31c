"""`embed status`: what a cache holds, what failed and why, how much disk it takes.

Embedding rows are told apart by what names them (cache_layout.md "embeddings"): in use, left
by relabelling or changed images (superseded), unused (an interrupted run), free (compaction).
When compaction would free rows or merge many manifest files, the report suggests it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.cache_format import STATUS_FAILED, STATUS_OK
from shared.cache_io import (
    chunk_problem,
    live_manifest_files,
    manifest_files,
    manifest_names,
    open_cache,
    read_manifest_all,
    read_manifest_state,
    winning_rows,
)
from shared.storage import parse_location

COLUMNS = ["image_id", "committed_ns", "row", "status", "error", "n_objects", "has_masks", "split",
           "embedding_checksum", "views"]  # fmt: skip
COMPACT_FILES = 64  # more manifest files than this: reading them costs more than one file


@dataclass
class CacheStatus:
    cache: str
    model: str
    dtype: str
    created_at: str
    format_version: int
    rows_allocated: int
    ok: int
    failed: int
    superseded: int  # manifest rows that lost to a later row of the same image
    objects: int
    with_masks: int
    splits: dict[str, int]
    bytes_on_disk: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    rows_in_use: int = 0  # named by a winning row
    rows_superseded: int = 0  # named only by superseded rows (relabels of v1, changed images)
    rows_free: int = 0  # freed by `embed compact`, reused by the next run
    manifest_files: int = 0
    row_bytes: int = 0
    stray: list[str] = field(default_factory=list)  # files in manifest/ that readers ignore
    unverified: int = 0  # ok rows without an embedding checksum (written before checksums)
    bad_chunks: list[str] = field(default_factory=list)  # ok images whose chunk is missing/torn
    views: dict[str, int] = field(default_factory=dict)  # view → ok images that have it

    @property
    def unused_rows(self) -> int:
        """Rows named by no manifest row and not free: runs interrupted before committing."""
        return self.rows_allocated - self.rows_in_use - self.rows_superseded - self.rows_free

    @property
    def reclaimable_rows(self) -> int:
        return self.rows_superseded + self.unused_rows

    @property
    def compaction_pays(self) -> bool:
        return self.reclaimable_rows > 0 or self.manifest_files > COMPACT_FILES


def _rows(table: pa.Table, allocated: int) -> np.ndarray:
    rows = table.column("row").to_numpy(zero_copy_only=False)
    return np.unique(rows[(rows >= 0) & (rows < allocated)])


def cache_status(target: str) -> CacheStatus:
    location = parse_location(target)
    cache = open_cache(location)
    history = read_manifest_all(location, COLUMNS)
    winners = winning_rows(history)
    state = read_manifest_state(location)
    allocated = int(cache.embeddings.shape[0])
    in_use, named = _rows(winners, allocated), _rows(history, allocated)
    free = np.setdiff1d(np.asarray(state.free_rows, np.int64), named)
    free = free[free < allocated]
    is_ok = pc.equal(winners.column("status"), STATUS_OK)
    ok = winners.filter(is_ok)
    not_ok = winners.filter(pc.invert(is_ok)).select(["image_id", "error", "status"]).to_pylist()
    splits = pc.value_counts(pc.fill_null(ok.column("split"), "none")).to_pylist()
    return CacheStatus(
        cache=location.display,
        model=cache.attrs.describe_model(),
        dtype=cache.attrs.dtype,
        created_at=cache.attrs.created_at,
        format_version=cache.attrs.format_version,
        rows_allocated=allocated,
        ok=ok.num_rows,
        failed=sum(r["status"] == STATUS_FAILED for r in not_ok),
        superseded=history.num_rows - winners.num_rows,
        objects=int(pc.sum(ok.column("n_objects")).as_py() or 0),
        with_masks=int(pc.sum(pc.cast(ok.column("has_masks"), pa.int64())).as_py() or 0),
        splits={s["values"]: s["counts"] for s in splits},
        bytes_on_disk=int(location.fs.du(location.path, total=True)),
        failures=[(r["image_id"], r["error"] or "") for r in not_ok],
        rows_in_use=len(in_use),
        rows_superseded=len(np.setdiff1d(named, in_use)),
        rows_free=len(free),
        manifest_files=len(live_manifest_files(manifest_names(location), state)),
        row_bytes=int(np.prod(cache.embeddings.shape[1:])) * cache.embeddings.dtype.itemsize,
        stray=manifest_files(location)[1],
        unverified=pc.sum(pc.invert(pc.is_valid(ok.column("embedding_checksum")))).as_py() or 0,
        bad_chunks=_bad_chunks(cache, ok.select(["image_id", "row"]).to_pylist())
        if location.is_local
        else [],
        views=_view_counts(cache.attrs.views, ok.column("views").to_pylist()),
    )


def _view_counts(requested: tuple[str, ...], per_image: list[list[str] | None]) -> dict[str, int]:
    """view → number of ok images that have it (every view the cache was asked for)."""
    counts = dict.fromkeys(requested, 0)
    for views in per_image:
        for view in views or []:
            counts[view] = counts.get(view, 0) + 1
    return counts


def _bad_chunks(cache, rows: list[dict]) -> list[str]:  # noqa: ANN001 - Cache
    """Ok images whose chunk file is missing or of the wrong size (cheap: no data read; the
    checksums are `embed verify`'s)."""
    n_rows = int(cache.embeddings.shape[0])
    return [
        r["image_id"]
        for r in rows
        if not 0 <= int(r["row"]) < n_rows or chunk_problem(cache, int(r["row"])) is not None
    ]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def format_status(status: CacheStatus, max_failures: int = 20) -> str:
    per_image = status.bytes_on_disk / status.ok if status.ok else 0
    splits = ", ".join(f"{k} {v}" for k, v in sorted(status.splits.items())) or "-"
    lines = [
        f"cache        {status.cache} (format v{status.format_version}, "
        f"created {status.created_at})",
        f"model        {status.model}",
        f"embeddings   {status.dtype}, {status.rows_allocated} rows allocated: "
        f"{status.rows_in_use} in use, {status.rows_superseded} left by relabelling or changed "
        f"images, {status.unused_rows} unused (from interrupted runs), {status.rows_free} free",
        f"images       {status.ok} ok, {status.failed} failed, "
        f"{status.superseded} superseded manifest rows in {status.manifest_files} manifest files",
        f"masks        {status.with_masks} images with masks, {status.objects} objects; "
        f"splits: {splits}",
        f"on disk      {_size(status.bytes_on_disk)} ({_size(per_image)} per ok image)",
    ]
    if status.views:
        counts = ", ".join(f"{v} {n}/{status.ok}" for v, n in status.views.items())
        lines.append(f"views        {counts} ok images (`embed run --views` adds missing ones)")
    if status.compaction_pays:
        lines.append(
            f"compact      `embed compact {status.cache}` would free {status.reclaimable_rows} "
            f"rows (up to {_size(status.reclaimable_rows * status.row_bytes)}) and merge "
            f"{status.manifest_files} manifest files into 1"
        )
    if status.bad_chunks:
        shown = ", ".join(status.bad_chunks[:5]) + (" …" if len(status.bad_chunks) > 5 else "")
        lines.append(f"damage       {len(status.bad_chunks)} ok images have a missing or torn "
                     f"embedding chunk ({shown}): run `embed verify {status.cache}`")  # fmt: skip
    if status.unverified:
        lines.append(f"checksums    {status.unverified} ok images have none (written before "
                     "checksums): their embeddings are read unverified")  # fmt: skip
    if status.stray:
        names = ", ".join(status.stray[:10])
        lines.append(f"manifest/    {len(status.stray)} stray file(s), ignored by readers (not "
                     f"part of the format; remove them): {names}")  # fmt: skip
    if status.failures:
        lines.append("failures:")
        lines += [f"  {image_id}: {reason}" for image_id, reason in status.failures[:max_failures]]
        if len(status.failures) > max_failures:
            lines.append(f"  … and {len(status.failures) - max_failures} more (--failures N)")
    return "\n".join(lines)

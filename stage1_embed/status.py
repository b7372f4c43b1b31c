"""`embed status`: what a cache holds, what failed and why, how much disk it takes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared.cache_format import STATUS_FAILED, STATUS_OK
from shared.cache_io import (
    chunk_problem,
    manifest_files,
    open_cache,
    read_manifest,
    read_manifest_all,
)
from shared.storage import parse_location


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
    superseded: int
    objects: int
    with_masks: int
    splits: dict[str, int]
    bytes_on_disk: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # files in manifest/ that readers ignore
    unverified: int = 0  # ok rows without an embedding checksum (written before checksums)
    bad_chunks: list[str] = field(default_factory=list)  # ok images whose chunk is missing/torn

    @property
    def unused_rows(self) -> int:
        return self.rows_allocated - self.ok


def cache_status(target: str) -> CacheStatus:
    location = parse_location(target)
    cache = open_cache(location)
    columns = ["image_id", "status", "error", "n_objects", "has_masks", "split", "row",
               "embedding_checksum"]  # fmt: skip
    winners = read_manifest(location, columns).to_pylist()
    all_rows = read_manifest_all(location, ["image_id"]).num_rows
    statuses = Counter(r["status"] for r in winners)
    ok_rows = [r for r in winners if r["status"] == STATUS_OK]
    return CacheStatus(
        cache=location.display,
        model=cache.attrs.describe_model(),
        dtype=cache.attrs.dtype,
        created_at=cache.attrs.created_at,
        format_version=cache.attrs.format_version,
        rows_allocated=int(cache.embeddings.shape[0]),
        ok=statuses[STATUS_OK],
        failed=statuses[STATUS_FAILED],
        superseded=all_rows - len(winners),
        objects=sum(int(r["n_objects"]) for r in ok_rows),
        with_masks=sum(bool(r["has_masks"]) for r in ok_rows),
        splits=dict(Counter(r["split"] or "none" for r in ok_rows)),
        bytes_on_disk=int(location.fs.du(location.path, total=True)),
        failures=[(r["image_id"], r["error"] or "") for r in winners if r["status"] != STATUS_OK],
        stray=manifest_files(location)[1],
        unverified=sum(not r["embedding_checksum"] for r in ok_rows),
        bad_chunks=_bad_chunks(cache, ok_rows) if location.is_local else [],
    )


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
        f"embeddings   {status.dtype}, {status.rows_allocated} rows allocated, "
        f"{status.unused_rows} unused (from interrupted runs)",
        f"images       {status.ok} ok, {status.failed} failed, "
        f"{status.superseded} superseded manifest rows",
        f"masks        {status.with_masks} images with masks, {status.objects} objects; "
        f"splits: {splits}",
        f"on disk      {_size(status.bytes_on_disk)} ({_size(per_image)} per ok image)",
    ]
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

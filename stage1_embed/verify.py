"""`embed verify`: check a whole cache against its manifest (the source of truth).

For every winning ``ok`` row: the row lies inside ``embeddings``, its chunk file exists and has
the size of one chunk, and its bytes match the manifest's ``embedding_checksum`` (rows written
before checksums existed are counted as *unverified*). Also: rows that winning rows of images
with *different* bytes claim (identical images may share a row), and stray files in
``manifest/`` (readers ignore them). Each view a row has (``views``) is checked the same way in
``embeddings_<view>`` against ``view_checksums``. ``embed run --repair`` re-encodes the damaged
images (with every view of the cache).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.cache_format import EMBEDDING_SHAPE, EMBEDDINGS, view_array_name
from shared.cache_io import (
    Cache,
    chunk_problem,
    manifest_files,
    manifest_rows_needed,
    ok_rows,
    open_cache,
    read_row_into,
    row_checksum_problem,
)
from shared.storage import parse_location

Progress = Callable[[str, int, int], None]  # (phase, done, total)
SHARED_ROW = "shared row"  # the kind of problem a repair fixes with a new row, not in place


@dataclass(frozen=True)
class Damage:
    """One damaged image: its id, its row and what is wrong (one line)."""

    image_id: str
    row: int
    problem: str
    kind: str = "row"  # "row": re-encode into the same row; SHARED_ROW: into a new row


@dataclass
class VerifyReport:
    cache: str
    rows_allocated: int
    rows_needed: int
    checked: int = 0
    views_checked: int = 0  # view rows checked (one per view of each ok image)
    unverified: int = 0
    damaged: list[Damage] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and self.rows_allocated >= self.rows_needed


def verify_cache(target: str, progress: Progress | None = None) -> VerifyReport:
    """Check every ``ok`` row of the cache at ``target`` (see the module docstring)."""
    location = parse_location(target)
    cache = open_cache(location, check_rows=False)
    report = VerifyReport(
        location.display, int(cache.embeddings.shape[0]), manifest_rows_needed(location)
    )
    report.stray = manifest_files(location)[1]
    columns = ["image_id", "row", "sha256", "embedding_checksum", "views", "view_checksums"]
    records = ok_rows(location, columns).to_pylist()
    report.damaged.extend(_shared_rows(records))
    for i, record in enumerate(records, start=1):
        problem = _row_problem(cache, record, report.rows_allocated)
        if problem is not None:
            report.damaged.append(Damage(record["image_id"], int(record["row"]), problem))
        views = zip(record["views"] or [], record["view_checksums"] or [], strict=False)
        for view, checksum in views:
            problem = _row_problem(cache, record, report.rows_allocated, view, checksum)
            if problem is not None:
                problem = f"its {view} view: {problem}"
                report.damaged.append(Damage(record["image_id"], int(record["row"]), problem))
            report.views_checked += 1
        report.checked += 1
        report.unverified += not record["embedding_checksum"]
        if progress is not None and (i % 16 == 0 or i == len(records)):
            progress("verifying", i, len(records))
    return report


def _shared_rows(records: list[dict]) -> list[Damage]:
    """Images whose row is also claimed by an image with other bytes (other sha256)."""
    by_row: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        by_row[int(record["row"])].append(record)
    damaged = []
    for row, claims in sorted(by_row.items()):
        if len({r["sha256"] for r in claims}) < 2:
            continue
        ids = ", ".join(r["image_id"] for r in claims)
        for r in claims:
            problem = f"row {row} is claimed by images with different bytes ({ids})"
            damaged.append(Damage(r["image_id"], row, problem, SHARED_ROW))
    return damaged


def _row_problem(
    cache: Cache,
    record: dict,
    rows_allocated: int,
    view: str | None = None,
    checksum: str | None = None,
) -> str | None:
    """What is wrong with the record's row of ``embeddings`` (or of ``embeddings_<view>``)."""
    row = int(record["row"])
    name = EMBEDDINGS if view is None else view_array_name(view)
    if name not in cache.group:
        return f"the cache has no {name} array"
    array = cache.array(name)
    if not 0 <= row < min(rows_allocated, array.shape[0]):
        return f"row {row} is outside {name} ({array.shape[0]} rows)"
    problem = chunk_problem(cache, row, name)
    if problem is not None:
        return problem
    embedding = np.empty(EMBEDDING_SHAPE, dtype=array.dtype)
    problem = read_row_into(array, row, embedding)
    expected = record["embedding_checksum"] if view is None else checksum
    return problem or row_checksum_problem(embedding, expected)


def format_report(report: VerifyReport, max_listed: int = 50) -> str:
    lines = [
        f"cache        {report.cache}",
        f"checked      {report.checked} ok images ({report.unverified} without a checksum: "
        "written before checksums, unverified)"
        + (f" and {report.views_checked} view rows" if report.views_checked else ""),
    ]
    if report.rows_allocated < report.rows_needed:
        lines.append(
            f"embeddings   {report.rows_allocated} rows, but the manifest uses {report.rows_needed}"
            ": embeddings/zarr.json was edited; restore its shape"
        )
    if report.stray:
        lines.append(f"manifest/    {len(report.stray)} stray file(s) ignored by readers: "
                     + ", ".join(report.stray[:10]))  # fmt: skip
    if report.damaged:
        lines.append(f"damaged      {len(report.damaged)} image(s):")
        lines += [f"  {d.image_id} (row {d.row}): {d.problem}" for d in report.damaged[:max_listed]]
        if len(report.damaged) > max_listed:
            lines.append(f"  … and {len(report.damaged) - max_listed} more")
        lines.append(
            f"repair: embed run --images DIR --out {report.cache} --repair "
            "(re-encodes exactly these images)"
        )
    else:
        lines.append("damaged      none")
    return "\n".join(lines)

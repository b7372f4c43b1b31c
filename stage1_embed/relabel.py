"""Relabelling: new objects for images already in the cache, without the encoder.

An embedding row belongs to the image bytes, not to their labels (cache_layout.md
"Relabelling"). When only an annotation changed, a new manifest row names the same embedding
row with the new objects. The image is not decoded: masks are checked and resized with the
sizes and the EXIF orientation the manifest recorded when the image was encoded, so
`embed labels` works with the image folder gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.cache_format import LOCK_NAME, STATUS_FAILED, STATUS_OK
from shared.cache_io import (
    commit_fragment,
    manifest_table,
    open_cache,
    read_manifest_all,
    remove_stale_temps,
    upgrade_format,
    winning_rows,
)
from shared.storage import CacheLock, Location, parse_location
from stage1_embed.annotations import (
    NO_ANNOTATIONS,
    AnnotationError,
    annotation_fingerprint,
    load_annotations,
)
from stage1_embed.config import LabelsConfig
from stage1_embed.images import EXIF_TRANSPOSE, LoadedImage, header_orientation
from stage1_embed.sources import ImageSource, SourceError, attach_coco, attach_masks, attach_voc

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# What a relabel copies from the row whose embedding it shares, and what planning compares.
EMBEDDING_COLUMNS = [
    "image_id", "row", "path", "sha256", "annotation_sha256", "status", "committed_ns",
    "original_height", "original_width", "input_height", "input_width", "precision",
    "exif_orientation", "embedding_checksum", "split", "splits", "views", "view_checksums",
]  # fmt: skip
COMMIT_EVERY = 256  # relabel rows per manifest fragment


@dataclass(frozen=True)
class Relabel:
    """``source`` gets new objects on the embedding row of ``embedding`` (a manifest row)."""

    source: ImageSource
    sha256: str
    embedding: dict[str, Any]
    previous: dict[str, Any] | None = None  # the image's own winning row, when it has one


PLAN_COLUMNS = ["image_id", "committed_ns", "row", "sha256", "annotation_sha256", "status"]
Key = tuple[str, int]  # (image_id, committed_ns): one manifest row


@dataclass(frozen=True)
class ManifestIndex:
    """What planning needs of the manifest, kept small for 100k-image caches.

    known: image_id → its winning row's (sha256, annotation_sha256, status, row, committed_ns).
    by_sha: image sha256 → the key of the latest manifest row of those bytes with ``row ≥ 0``.
    """

    known: dict[str, tuple[str, str, str, int, int]]
    by_sha: dict[str, Key]

    @classmethod
    def read(cls, location: Location) -> ManifestIndex:
        history = read_manifest_all(location, PLAN_COLUMNS)
        winners = winning_rows(history)
        values = [winners.column(c).to_pylist() for c in PLAN_COLUMNS[1:]]
        ns, rows, shas, annotations, statuses = values
        known = dict(
            zip(
                winners.column("image_id").to_pylist(),
                zip(shas, annotations, statuses, rows, ns, strict=True),
                strict=True,
            )
        )
        with_rows = history.filter(pc.greater_equal(history.column("row"), 0))
        with_rows = with_rows.sort_by([("committed_ns", "ascending")])
        keys = zip(
            with_rows.column("image_id").to_pylist(),
            with_rows.column("committed_ns").to_pylist(),
            strict=True,
        )
        by_sha = dict(zip(with_rows.column("sha256").to_pylist(), keys, strict=True))
        by_sha.pop("", None)
        return cls(known, by_sha)


def manifest_records(location: Location, keys: set[Key]) -> dict[Key, dict[str, Any]]:
    """The ``EMBEDDING_COLUMNS`` of the manifest rows ``keys`` (read only when relabelling)."""
    if not keys:
        return {}
    history = read_manifest_all(location, EMBEDDING_COLUMNS)
    wanted = pa.array(sorted({image_id for image_id, _ in keys}))
    history = history.filter(pc.is_in(history.column("image_id"), value_set=wanted))
    records = {(r["image_id"], r["committed_ns"]): r for r in history.to_pylist()}
    return {key: records[key] for key in keys}


def winners_by_id(history: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["image_id"]: r for r in winning_rows(history).to_pylist()}


def _stand_in(embedding: dict[str, Any], image_path: Path | None) -> LoadedImage:
    """What ``load_annotations`` needs of a decoded image, from the manifest (no pixels)."""
    orientation = embedding.get("exif_orientation")
    if orientation is None:  # a version-1 row: ask the file's header when the file is here
        orientation = header_orientation(image_path) if image_path is not None else 1
    height, width = int(embedding["original_height"]), int(embedding["original_width"])
    swapped = orientation in (5, 6, 7, 8)
    return LoadedImage(
        rgb=np.zeros((0, 0, 3), np.uint8),
        sha256=embedding["sha256"],
        original_size=(height, width),
        exif_transposed=orientation in EXIF_TRANSPOSE,
        raw_size=(width, height) if swapped else (height, width),
        exif_orientation=int(orientation),
    )


def relabel_row(item: Relabel, image_present: bool = False) -> dict[str, Any]:
    """The manifest row of ``item``: the shared embedding row with freshly read objects.

    A mask that does not fit the image makes the row ``failed`` with the reason; it keeps the
    embedding row (valid), so fixing the mask later relabels again without encoding.
    """
    source, emb, previous = item.source, item.embedding, item.previous
    input_size = (int(emb["input_height"]), int(emb["input_width"]))
    loaded = _stand_in(emb, source.path if image_present else None)
    error = None
    try:
        annotations = load_annotations(source, loaded, input_size)
    except AnnotationError as exc:
        annotations, error = NO_ANNOTATIONS, str(exc)
    keep_split = previous is not None and source.split is None and not source.splits
    split_of = previous if keep_split and previous is not None else {}
    return {
        "image_id": source.image_id,
        "row": emb["row"],
        "path": str(source.path),
        "sha256": item.sha256,
        "annotation_sha256": annotation_fingerprint(source),
        "original_height": loaded.original_size[0],
        "original_width": loaded.original_size[1],
        "input_height": input_size[0],
        "input_width": input_size[1],
        "status": STATUS_OK if error is None else STATUS_FAILED,
        "error": error,
        "split": split_of["split"] if keep_split else source.split,
        "splits": list(split_of["splits"] or []) if keep_split else list(source.splits),
        "source": source.source,
        "has_masks": annotations.has_masks,
        "n_objects": len(annotations.objects),
        "objects": annotations.objects,
        "ignore_rle": annotations.ignore_rle,
        "ignore_target_rle": annotations.ignore_target_rle,
        "precision": emb["precision"],
        "exif_orientation": loaded.exif_orientation,
        "embedding_checksum": emb.get("embedding_checksum"),
        "views": emb.get("views"),  # the views of the shared row come with it
        "view_checksums": emb.get("view_checksums"),
    }


def commit_relabels(
    location: Location,
    items: Sequence[Relabel],
    *,
    image_present: bool = False,
    progress: Progress | None = None,
) -> list[tuple[str, str]]:
    """Read the new objects of ``items`` and commit them, a fragment per ``COMMIT_EVERY``.

    Returns the (image_id, reason) of the rows committed as ``failed``.
    """
    failed: list[tuple[str, str]] = []
    for start in range(0, len(items), COMMIT_EVERY):
        rows = [relabel_row(item, image_present) for item in items[start : start + COMMIT_EVERY]]
        commit_fragment(location, manifest_table(rows))
        failed += [(r["image_id"], r["error"]) for r in rows if r["status"] != STATUS_OK]
        if progress is not None:
            progress("relabelling", min(start + COMMIT_EVERY, len(items)), len(items))
    return failed


# --------------------------------------------------------------------------- `embed labels`


def cached_sources(winners: dict[str, dict[str, Any]]) -> list[ImageSource]:
    """One source per image that has an embedding row, at the path it was encoded from."""
    return [
        ImageSource(image_id=image_id, path=Path(record["path"]))
        for image_id, record in sorted(winners.items())
        if record["row"] is not None and record["row"] >= 0
    ]


def images_root(source: ImageSource) -> Path:
    """The folder ``image_id`` is relative to (``path`` minus ``image_id`` and the extension)."""
    depth = len(PurePosixPath(source.image_id).parts)
    return source.path.parents[depth - 1]


def label_sources(
    images: list[ImageSource],
    *,
    masks: Path | None = None,
    mask_kind: str = "auto",
    coco: Path | None = None,
    voc: Path | None = None,
) -> list[ImageSource]:
    """``images`` with the annotations of exactly one of masks / coco / voc attached."""
    if masks is not None:
        return attach_masks(images, masks, mask_kind)
    if voc is not None:
        return attach_voc(images, voc)
    assert coco is not None
    by_root: dict[Path, list[ImageSource]] = {}
    for source in images:
        by_root.setdefault(images_root(source), []).append(source)
    out, errors = [], []
    for root, group in by_root.items():
        try:
            out += attach_coco(group, root, coco)
        except SourceError as exc:  # a group none of whose images the JSON names
            errors.append(exc)
            out += [replace(s, source="coco") for s in group]
    if len(errors) == len(by_root):
        raise errors[0]
    return sorted(out, key=lambda s: s.image_id)


@dataclass
class LabelsSummary:
    cache: str
    cached: int  # images with an embedding row in the cache
    named: int  # of those, images the annotations name
    relabelled: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_labels(config: LabelsConfig, progress: Progress | None = None) -> LabelsSummary:
    """`embed labels`: re-read annotations for cached images; no image file, no encoder."""
    started = time.perf_counter()
    location = parse_location(config.cache)
    with CacheLock(location, LOCK_NAME):
        upgrade_format(open_cache(location, read_only=False))
        remove_stale_temps(location)
        winners = winners_by_id(read_manifest_all(location, EMBEDDING_COLUMNS))
        images = cached_sources(winners)
        if not images:
            raise ValueError(
                f"{location.display} holds no encoded image; run `embed run` before `embed labels`"
            )
        sources = label_sources(
            images,
            masks=Path(config.masks) if config.masks else None,
            mask_kind=config.mask_kind,
            coco=Path(config.coco) if config.coco else None,
            voc=Path(config.voc) if config.voc else None,
        )
        named = [s for s in sources if s.has_masks]
        summary = LabelsSummary(location.display, cached=len(images), named=len(named))
        todo = []
        for source in named:
            previous = winners[source.image_id]
            same = previous["annotation_sha256"] == annotation_fingerprint(source)
            if same and previous["status"] == STATUS_OK:
                summary.unchanged += 1
            else:
                todo.append(Relabel(source, previous["sha256"], previous, previous))
        summary.failed = commit_relabels(location, todo, progress=progress)
        summary.relabelled = len(todo) - len(summary.failed)
    summary.seconds = time.perf_counter() - started
    return summary

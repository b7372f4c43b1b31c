"""`embed run` from start to end: plan what is left, allocate rows, run batches, summarise.

The coordinator (this process) is the only one that creates the cache, grows ``embeddings``
and holds the lock; batches (``stage1_embed.work``) write rows and commit manifest fragments.
A rerun hashes the files, compares with the manifest and encodes only bytes the cache does not
have: an image whose annotation alone changed, or whose bytes another row already has, is
relabelled onto the existing embedding row (``stage1_embed.relabel``). When nothing must be
encoded, the model is never loaded.

Every file is hashed on every run (no size + mtime shortcut): an edit that keeps the size and
the mtime (``cp -p``/``rsync -a`` of an edited copy, tools that restore timestamps, file systems
with 1–2 s mtime resolution) would otherwise keep a stale embedding without a word.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from shared.cache_format import (
    LOCK_NAME,
    STATUS_OK,
    CacheAttrs,
    CacheMismatchError,
    check_same_model,
)
from shared.cache_io import (
    allocate_rows,
    cache_exists,
    commit_fragment,
    create_cache,
    ensure_view_arrays,
    manifest_table,
    ok_rows,
    open_cache,
    remove_stale_temps,
    upgrade_format,
    utc_now,
)
from shared.checkpoint_files import resolve_checkpoint
from shared.hashing import file_sha256
from shared.storage import CacheLock, Location, parse_location
from stage1_embed.annotations import annotation_fingerprint
from stage1_embed.config import EmbedConfig
from stage1_embed.executors import run_dask, run_local
from stage1_embed.relabel import Key, ManifestIndex, Relabel, commit_relabels, manifest_records
from stage1_embed.sources import ImageSource, plan_sources
from stage1_embed.verify import SHARED_ROW, Damage, verify_cache
from stage1_embed.work import BatchResult, EncodeSpec, WorkItem, with_views

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Plan:
    """What a run must do: encode ``todo``, relabel ``relabel``; the others are cached unchanged.

    ``duplicates``: images of ``todo`` whose bytes another image of ``todo`` has; they are
    relabelled onto its row once it is encoded.
    """

    total: int
    todo: list[ImageSource]
    cached: int
    changed: int
    retried: int
    relabel: list[Relabel] = field(default_factory=list)
    duplicates: list[ImageSource] = field(default_factory=list)
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)  # image_id → (image, ann)
    rows: dict[str, int] = field(default_factory=dict)  # image_id → row re-encoded in place


@dataclass
class RunSummary:
    cache: str
    total: int
    cached_before: int
    encoded: int = 0
    relabelled: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (image_id, skipped annotation)
    seconds: float = 0.0
    seconds_encoding: float = 0.0
    model_loaded: bool = False
    repaired: int = 0
    unrepaired: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    views: tuple[str, ...] = ()  # the cache's views: every image encoded gets all of them
    views_added: int = 0  # images already cached whose missing views were encoded now

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def hash_sources(
    sources: Sequence[ImageSource], progress: Progress | None = None
) -> list[tuple[str, str]]:
    """(image sha256, annotation sha256) of every source; "" for a file that cannot be read."""

    def digest(source: ImageSource) -> tuple[str, str]:
        try:
            image = file_sha256(source.path)
        except OSError:
            image = ""
        return image, annotation_fingerprint(source)

    out: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, value in enumerate(pool.map(digest, sources), start=1):
            out.append(value)
            if progress is not None and (i % 64 == 0 or i == len(sources)):
                progress("hashing", i, len(sources))
    return out


def make_plan(
    location: Location,
    sources: Sequence[ImageSource],
    hashes: Sequence[tuple[str, str]],
    damaged: Sequence[Damage] = (),
) -> Plan:
    """Compare with the manifest (cache_layout.md "Relabelling").

    Same bytes and annotation as the winning ``ok`` row: cached. Bytes some manifest row has an
    embedding of: relabelled onto that row (the image's own row first). Otherwise: encoded.
    ``damaged`` (from `embed verify`, for ``--repair``): those images are re-encoded, into
    their own row unless images of other bytes claim it too.
    """
    index = ManifestIndex.read(location)
    plan = Plan(len(sources), [], 0, 0, 0)
    repair = {d.image_id: d for d in damaged}
    first_of_sha: set[str] = set()
    pending: list[tuple[ImageSource, str, Key, Key | None]] = []  # relabels, by manifest key
    for source, (sha, annotation_sha) in zip(sources, hashes, strict=True):
        plan.hashes[source.image_id] = (sha, annotation_sha)
        if source.image_id in repair:
            plan.todo.append(source)
            if repair[source.image_id].kind != SHARED_ROW:
                plan.rows[source.image_id] = repair[source.image_id].row
            continue
        previous = index.known.get(source.image_id)
        own_key = None if previous is None else (source.image_id, previous[4])
        if previous is not None and previous[2] == STATUS_OK and sha:
            if previous[:2] == (sha, annotation_sha):
                plan.cached += 1
                continue
        own = own_key is not None and previous[0] == sha and previous[3] >= 0  # type: ignore[index]
        shared = own_key if own else index.by_sha.get(sha) if sha else None
        if shared is not None:
            pending.append((source, sha, shared, own_key))
        elif sha and sha in first_of_sha:
            plan.duplicates.append(source)
        else:
            first_of_sha.add(sha)
            plan.todo.append(source)
            if previous is None:
                continue
            if previous[2] != STATUS_OK:
                plan.retried += 1
            else:
                plan.changed += 1
    keys = {key for _, _, key, _ in pending} | {own for *_, own in pending if own is not None}
    records = manifest_records(location, keys)
    plan.relabel = [
        Relabel(source, sha, records[key], None if own is None else records[own])
        for source, sha, key, own in pending
    ]
    return plan


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return device


def _open_or_create(location: Location, config: EmbedConfig, ckpt: Path, sha: str) -> CacheAttrs:
    if cache_exists(location):
        cache = open_cache(location, read_only=False)
        check_same_model(cache.attrs, config.model_type, sha, ckpt.name, where=location.display)
        if cache.attrs.dtype != config.dtype:
            raise ValueError(
                f"{location.display} stores {cache.attrs.dtype} embeddings; --dtype "
                f"{config.dtype} was given. Drop --dtype or write a new cache with --out."
            )
        upgrade_format(cache)  # a version-1 cache becomes version 2 (cache_layout.md)
        return ensure_view_arrays(cache, config.views).attrs
    attrs = CacheAttrs(
        model_type=config.model_type,
        checkpoint_sha256=sha,
        checkpoint_name=ckpt.name,
        checkpoint_path=str(ckpt.resolve()),
        dtype=config.dtype,
        created_at=utc_now(),
        embed_config=config.to_dict(),
    )
    return ensure_view_arrays(create_cache(location, attrs), config.views).attrs


def run_embed(config: EmbedConfig, progress: Progress | None = None) -> RunSummary:
    """Run `embed run` for ``config``; raises ValueError/OSError subclasses for bad input."""
    started = time.perf_counter()
    sources = plan_sources(
        Path(config.images),
        recursive=config.recursive,
        masks_dir=Path(config.masks) if config.masks else None,
        mask_kind=config.mask_kind,
        coco_json=Path(config.coco) if config.coco else None,
    )
    location = parse_location(config.out)
    checkpoint = resolve_checkpoint(
        config.model_type,
        _known_checkpoint(location, config),
        download=config.download,
    )
    checkpoint_sha = file_sha256(checkpoint)
    _refuse_out_in_images(location, Path(config.images))
    _ensure_writable(location)
    with CacheLock(location, LOCK_NAME):
        views = _open_or_create(location, config, checkpoint, checkpoint_sha).views
        remove_stale_temps(location)
        damaged = verify_cache(location.display).damaged if config.repair else []
        plan = make_plan(location, sources, hash_sources(sources, progress), damaged)
        summary = RunSummary(location.display, plan.total, plan.cached, views=views)
        planned = {s.image_id for s in plan.todo}
        summary.repaired = sum(d.image_id in planned for d in damaged)
        summary.unrepaired = [
            (d.image_id, f"{d.problem}; its image is not under --images {config.images}")
            for d in damaged
            if d.image_id not in planned
        ]
        _relabel(location, plan.relabel, summary, progress)
        if plan.todo:
            summary.model_loaded = True
            _encode(config, location, checkpoint, checkpoint_sha, plan, summary, progress)
        if plan.duplicates:  # their bytes were just encoded for another image
            hashes = [plan.hashes[s.image_id] for s in plan.duplicates]
            again = make_plan(location, plan.duplicates, hashes)
            _relabel(location, again.relabel, summary, progress)
            if again.todo:  # the image they duplicate failed: so do they, with its reason
                summary.model_loaded = True
                again.todo += again.duplicates
                _encode(config, location, checkpoint, checkpoint_sha, again, summary, progress)
        if views:  # images cached before (or relabelled onto rows) without some of the views
            items, direct = plan_views(location, sources, plan.hashes, views)
            if direct:
                commit_fragment(location, manifest_table(direct))
            summary.views_added += len(direct)
            if items:
                summary.model_loaded = True
                spec = _spec(config, location, checkpoint, checkpoint_sha, [i.row for i in items])
                _execute(config, spec, items, summary, progress, "adding views")
    summary.seconds = time.perf_counter() - started
    return summary


def _relabel(
    location: Location, items: list[Relabel], summary: RunSummary, progress: Progress | None
) -> None:
    failed = commit_relabels(location, items, image_present=True, progress=progress)
    summary.relabelled += len(items) - len(failed)
    summary.failed += failed


def _encode(
    config: EmbedConfig,
    location: Location,
    checkpoint: Path,
    checkpoint_sha: str,
    plan: Plan,
    summary: RunSummary,
    progress: Progress | None,
) -> None:

    new = [source for source in plan.todo if source.image_id not in plan.rows]
    cache = open_cache(location, read_only=False)
    fresh = iter(allocate_rows(cache, len(new)))
    rows = [plan.rows[s.image_id] if s.image_id in plan.rows else next(fresh) for s in plan.todo]
    spec = _spec(config, location, checkpoint, checkpoint_sha, rows)
    views = cache.attrs.views
    items = [WorkItem(source, row, views) for source, row in zip(plan.todo, rows, strict=True)]
    _execute(config, spec, items, summary, progress, "encoding")


def _spec(
    config: EmbedConfig, location: Location, checkpoint: Path, checkpoint_sha: str, rows: list[int]
) -> EncodeSpec:
    from stage1_embed.encoder import resolve_precision

    device = resolve_device(config.device)
    return EncodeSpec(
        cache=location.display if not location.is_local else location.path,
        model_type=config.model_type,
        checkpoint=str(checkpoint),
        checkpoint_sha256=checkpoint_sha,
        precision=resolve_precision(config.precision, device),
        device=device,
        batch_size=config.batch_size or (8 if device == "cuda" else 1),
        max_pixels=config.max_pixels,
        n_rows=max(int(open_cache(location).embeddings.shape[0]), max(rows) + 1),
    )


def _execute(
    config: EmbedConfig,
    spec: EncodeSpec,
    items: list[WorkItem],
    summary: RunSummary,
    progress: Progress | None,
    phase: str,
) -> None:
    """Run ``items`` here or on Dask; count what they did in ``summary``."""
    done = 0
    encode_started = time.perf_counter()

    def on_done(result: BatchResult, n_images: int) -> None:
        nonlocal done
        done += n_images
        summary.encoded += result.ok
        summary.views_added += result.views_added
        summary.failed.extend(result.failed)
        summary.notes.extend(result.notes)
        if progress is not None:
            progress(phase, done, len(items))

    if config.workers == 1 and not config.scheduler:
        run_local(spec, items, on_done)
    else:
        run_dask(
            spec,
            items,
            on_done,
            workers=config.workers,
            scheduler=config.scheduler,
            images_per_task=_images_per_task(len(items), spec.batch_size, config.workers),
        )
    summary.seconds_encoding += time.perf_counter() - encode_started


VIEW_PLAN_COLUMNS = ["image_id", "row", "sha256", "views", "view_checksums"]


def plan_views(
    location: Location,
    sources: Sequence[ImageSource],
    hashes: dict[str, tuple[str, str]],
    views: tuple[str, ...],
) -> tuple[list[WorkItem], list[dict[str, Any]]]:
    """What adding ``views`` to the images of this run takes (cache_layout.md "Views").

    Returns (items that encode the views a row lacks, manifest rows to commit as they are: an
    image whose row another image of the same bytes has the views of already). Only winning
    ``ok`` rows whose bytes are the file's now are completed; the original is never re-encoded.
    """
    by_id = {s.image_id: s for s in sources}
    small = ok_rows(location, VIEW_PLAN_COLUMNS).to_pylist()
    lacking = {
        r["image_id"]
        for r in small
        if r["image_id"] in by_id
        and r["row"] >= 0
        and hashes.get(r["image_id"], ("",))[0] == r["sha256"]
        and set(views) - set(r["views"] or [])
    }
    if not lacking:
        return [], []
    table = ok_rows(location)
    table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(lacking))))
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for record in small:  # every image of those bytes on that row: views already stored
        groups[(int(record["row"]), record["sha256"])].append(record)
    items, direct = [], []
    todo: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for record in table.to_pylist():
        todo[(int(record["row"]), record["sha256"])].append(record)
    for key, records in sorted(todo.items()):
        known = {}
        for other in groups[key]:
            known.update(zip(other["views"] or [], other["view_checksums"] or [], strict=True))
        filled = [{**r, **with_views(r, known)} for r in records]
        need = tuple(v for v in views if v not in known)
        if need:
            items.append(WorkItem(by_id[records[0]["image_id"]], key[0], need, tuple(filled)))
        else:
            direct += filled
    return items, direct


def _images_per_task(n_images: int, batch_size: int, workers: int) -> int:
    """Images per Dask task: a few encoder batches, but small enough to keep every worker busy."""
    per_worker = -(-n_images // max(1, workers))
    return max(1, min(max(4, batch_size), per_worker))


def _known_checkpoint(location: Location, config: EmbedConfig) -> Path | None:
    """``--checkpoint``, else the file an existing cache was made with (if it is still there).

    The cache is read first: a cache of another model type is refused before any checkpoint is
    looked up or downloaded, naming the model type to pass.
    """
    if config.checkpoint:
        return Path(config.checkpoint)
    if not cache_exists(location):
        return None
    attrs = open_cache(location).attrs
    if attrs.model_type != config.model_type:
        raise CacheMismatchError(
            f"{location.display} was made with {attrs.describe_model()}; --model-type is "
            f"{config.model_type}. Pass --model-type {attrs.model_type} to add images to it, "
            "or write a new cache with another --out."
        )
    hint = Path(attrs.checkpoint_path) if attrs.checkpoint_path else None
    return hint if hint is not None and hint.is_file() else None


def _refuse_out_in_images(location: Location, images: Path) -> None:
    """A cache written among the user's images (``--out`` equal to or inside ``--images``)
    would mix with them and be read as images by the next run: refuse."""
    if not location.is_local:
        return
    out, root = Path(location.path), images.expanduser().resolve()
    if out == root or root in out.parents:
        raise ValueError(
            f"--out {location.display} is inside --images {images}: the cache would be written "
            "among your images. Choose an --out outside the images folder"
        )


def _ensure_writable(location: Location) -> None:
    """Create the cache folder now, so an unwritable --out fails before any work.

    On object stores the bucket must exist already: s3fs would create a mistyped one.
    """
    if not location.is_local:
        bucket = location.path.split("/", 1)[0]
        if not location.fs.exists(bucket):
            raise OSError(
                f"bucket {bucket!r} of --out {location.display} does not exist (or is not "
                "visible with these credentials); create it first"
            )
    if location.is_local and not cache_exists(location) and _has_entries(location.path):
        entries = sorted(os.listdir(location.path))
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise OSError(
            f"--out {location.display} is a folder that is not a samcache cache and is not "
            f"empty ({shown}); pass a new or empty folder (nothing there was changed)"
        )
    try:
        location.fs.makedirs(location.path, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot write --out {location.display}: {exc.strerror or exc}") from exc


def _has_entries(path: str) -> bool:
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise OSError(f"--out {path} is a file; pass a folder path for the cache")
    return any(True for _ in os.scandir(path))

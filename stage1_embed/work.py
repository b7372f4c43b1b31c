"""One unit of stage-1 work: read, annotate, encode and commit a batch of images.

``encode_batch`` runs in the coordinator (``--workers 1``) or in a Dask worker process. It
writes each embedding into the row the coordinator gave it, then commits one manifest fragment
for the batch, so a row is ``ok`` only once its embedding is on disk. A batch redone after a
worker died writes the same rows again and commits again: readers keep one row per image.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.cache_format import STATUS_FAILED, STATUS_OK
from shared.cache_io import commit_fragment, manifest_table, open_cache, write_embedding
from shared.storage import parse_location
from shared.transforms import prepare_image
from shared.views import apply_view
from stage1_embed.annotations import AnnotationError, annotation_fingerprint, load_annotations
from stage1_embed.images import ImageReadError, read_image
from stage1_embed.sources import ImageSource, storable


@dataclass(frozen=True)
class EncodeSpec:
    """What every batch needs besides its images (small and picklable, sent to workers)."""

    cache: str
    model_type: str
    checkpoint: str
    checkpoint_sha256: str
    precision: str  # resolved: fp32, bf16 or fp16
    device: str  # resolved: cpu or cuda
    batch_size: int
    max_pixels: int
    n_rows: int = 0  # rows of `embeddings` after the coordinator grew it for this run
    torch_threads: int = 0  # 0: leave torch's default


@dataclass(frozen=True)
class WorkItem:
    """Encode ``source`` into ``row`` of ``embeddings`` and of ``embeddings_<view>`` for each
    of ``views``. With ``keep`` (manifest rows that name ``row``, all of these bytes) only the
    views are encoded: the original row is in the cache already, and each kept row is committed
    again with the new views added (cache_layout.md "Views")."""

    source: ImageSource
    row: int
    views: tuple[str, ...] = ()
    keep: tuple[dict[str, Any], ...] = ()


@dataclass
class BatchResult:
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # ok images: skipped annotations
    seconds_encoding: float = 0.0
    views_added: int = 0  # manifest rows of cached images committed with new views


@dataclass
class Prepared:
    """An image ready for the encoder (or the reason it cannot be), without its pixels."""

    item: WorkItem
    sha256: str = ""
    original_size: tuple[int, int] = (0, 0)
    tensor: torch.Tensor | None = None
    input_size: tuple[int, int] = (0, 0)
    annotations: Any = None
    error: str | None = None
    exif_orientation: int | None = None
    checksum: str | None = None  # of the stored row (manifest ``embedding_checksum``)
    view_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # encoder inputs
    view_checksums: dict[str, str] = field(default_factory=dict)  # of the stored view rows


_PROCESS_STATE: dict[tuple[Any, ...], Any] = {}
_STATE_LOCK = threading.Lock()


def _runner(spec: EncodeSpec) -> Any:
    """The encoder of this process, built once per (model, checkpoint, precision, device)."""
    from shared.sam_models import build_image_encoder
    from stage1_embed.encoder import EncoderRunner

    key = ("runner", spec.model_type, spec.checkpoint_sha256, spec.precision, spec.device)
    with _STATE_LOCK:
        if key not in _PROCESS_STATE:
            worker = _dask_worker()
            threads = spec.torch_threads or _threads_for(worker)
            if threads:
                torch.set_num_threads(threads)
            module = build_image_encoder(spec.model_type, spec.checkpoint)
            _PROCESS_STATE[key] = EncoderRunner(
                module, precision=spec.precision, device=_device_for(spec.device, worker)
            )
        return _PROCESS_STATE[key]


def _dask_worker() -> Any:
    """The Dask worker running this task, or None in the coordinator (``--workers 1``)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _threads_for(worker: Any) -> int:
    """Torch threads of a worker of an existing cluster (``--scheduler``): host cores / threads.

    Dask sets OMP_NUM_THREADS=1 in workers, which would leave torch on one core; the README
    asks for one worker process per host (or per GPU) for stage 1.
    """
    if worker is None:
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads))


def _device_for(device: str, worker: Any) -> str:
    """One GPU per worker: ``cuda:<worker index mod GPUs>`` for a local cluster's workers."""
    if device != "cuda" or worker is None or torch.cuda.device_count() < 2:
        return device
    name = str(worker.name)
    index = int(name) if name.isdigit() else sum(name.encode())
    return f"cuda:{index % torch.cuda.device_count()}"


def _embeddings_array(spec: EncodeSpec, view: str | None = None) -> Any:
    """This process's handle on ``embeddings`` (or ``embeddings_<view>``), reopened when the
    coordinator has grown it.

    A handle caches the array's shape; one opened before the coordinator's resize would refuse
    the new rows (zarr never re-reads ``zarr.json`` by itself).
    """
    key = ("array", spec.cache, view)
    with _STATE_LOCK:
        array = _PROCESS_STATE.get(key)
        if array is None or array.shape[0] < spec.n_rows:
            cache = open_cache(parse_location(spec.cache), read_only=False)
            array = cache.embeddings if view is None else cache.view_array(view)
            _PROCESS_STATE[key] = array
        return array


def prepare(item: WorkItem, max_pixels: int) -> Prepared:
    """Read, check and preprocess one image and its masks; errors become a reason, not a raise.

    The decoded pixels are dropped before returning (only the 1024 tensor is kept), so memory
    per prepared image is ~12 MiB whatever the image's size.
    """
    prepared = Prepared(item)
    try:
        if item.source.name_error:
            raise ImageReadError(item.source.name_error)
        loaded = read_image(item.source.path, max_pixels=max_pixels)
        prepared.sha256, prepared.original_size = loaded.sha256, loaded.original_size
        prepared.exif_orientation = loaded.exif_orientation
        for view in item.views:  # each view is preprocessed like an image of its own
            prepared.view_tensors[view] = prepare_image(apply_view(view, loaded.rgb))[0]
        if item.keep:  # views only: the original row and its objects are in the cache
            if loaded.sha256 != item.keep[0]["sha256"]:
                raise ImageReadError("its bytes changed during the run; run `embed run` again")
            return prepared
        prepared.tensor, prepared.input_size = prepare_image(loaded.rgb)
        prepared.annotations = load_annotations(item.source, loaded, prepared.input_size)
    except (ImageReadError, AnnotationError) as exc:
        prepared.error = str(exc)
        prepared.tensor, prepared.view_tensors = None, {}
    except Exception as exc:  # one bad input never stops a run: it fails with the reason
        prepared.error = f"cannot be processed: {type(exc).__name__}: {exc}"[:500]
        prepared.tensor, prepared.view_tensors = None, {}
    return prepared


def failed(item: WorkItem, reason: str) -> Prepared:
    """A work item that could not be processed at all (e.g. it kept killing its worker)."""
    return Prepared(item, error=reason)


def _row(prepared: Prepared, precision: str) -> dict[str, Any]:
    source, ann = prepared.item.source, prepared.annotations
    ok = prepared.error is None
    height, width = prepared.original_size
    objects = ann.objects if (ok and ann is not None) else []
    return {
        "image_id": source.image_id,
        "row": prepared.item.row if ok else -1,
        "path": storable(str(source.path)),
        "sha256": prepared.sha256,
        "annotation_sha256": annotation_fingerprint(source),
        "original_height": height,
        "original_width": width,
        "input_height": prepared.input_size[0],
        "input_width": prepared.input_size[1],
        "status": STATUS_OK if ok else STATUS_FAILED,
        "error": prepared.error if not ok else ("; ".join(ann.notes) or None) if ann else None,
        "split": source.split,
        "splits": list(source.splits),
        "source": source.source,
        "has_masks": bool(ok and ann is not None and ann.has_masks),
        "n_objects": len(objects),
        "objects": objects,
        "ignore_rle": ann.ignore_rle if (ok and ann is not None) else None,
        "ignore_target_rle": ann.ignore_target_rle if (ok and ann is not None) else None,
        "precision": precision,
        "exif_orientation": prepared.exif_orientation,
        "embedding_checksum": prepared.checksum if ok else None,
        "coco_image_id": source.coco.coco_image_id if source.coco is not None else None,
        **with_views({}, prepared.view_checksums if ok else {}),
    }


def with_views(record: dict[str, Any], new: dict[str, str]) -> dict[str, Any]:
    """``views`` / ``view_checksums`` of ``record`` with the views of ``new`` added (or
    replaced), in canonical order; both null when there is no view."""
    from shared.views import VIEWS

    have = dict(zip(record.get("views") or [], record.get("view_checksums") or [], strict=False))
    have.update(new)
    views = [v for v in VIEWS if v in have]
    return {"views": views or None, "view_checksums": [have[v] for v in views] or None}


def _kept_rows(prepared: Prepared) -> list[dict[str, Any]]:
    """The manifest rows of a views-only item: its kept rows with the new views added."""
    return [{**r, **with_views(r, prepared.view_checksums)} for r in prepared.item.keep]


def encode_prepared(spec: EncodeSpec, prepared: list[Prepared]) -> BatchResult:
    """Encode the readable images, write their rows, then commit one fragment for all."""
    result = BatchResult()
    good = [p for p in prepared if p.error is None]
    started = time.perf_counter()
    step = max(1, spec.batch_size)
    for start in range(0, len(good), step):
        chunk = good[start : start + step]
        _encode_into(spec, [p for p in chunk if p.tensor is not None], None)
        for view in sorted({v for p in chunk for v in p.view_tensors}):
            _encode_into(spec, [p for p in chunk if view in p.view_tensors], view)
    result.seconds_encoding = time.perf_counter() - started
    rows = [_row(p, spec.precision) for p in prepared if not p.item.keep]
    rows += [row for p in good if p.item.keep for row in _kept_rows(p)]
    if rows:
        commit_fragment(parse_location(spec.cache), manifest_table(rows))
    result.ok = sum(not p.item.keep for p in good)
    result.views_added = sum(len(p.item.keep) for p in good)
    result.failed = [
        (p.item.source.image_id, p.error or "") for p in prepared if p.error and not p.item.keep
    ]
    result.notes += [
        (p.item.source.image_id, f"views not added: {p.error}")
        for p in prepared
        if p.error and p.item.keep
    ]
    result.notes += [
        (p.item.source.image_id, note)
        for p in good
        if p.annotations is not None
        for note in p.annotations.notes
    ]
    return result


def _encode_into(spec: EncodeSpec, chunk: list[Prepared], view: str | None) -> None:
    """Encode the images (``view`` None) or one view of ``chunk`` and write their rows."""
    if not chunk:
        return
    array = _embeddings_array(spec, view)
    if view is None:
        batch = torch.stack([p.tensor for p in chunk])  # type: ignore[misc]
    else:
        batch = torch.stack([p.view_tensors[view] for p in chunk])
    embeddings = _runner(spec).encode(batch).numpy()
    for p, embedding in zip(chunk, embeddings, strict=True):
        checksum = write_embedding(array, p.item.row, embedding)
        if view is None:
            p.checksum, p.tensor = checksum, None
        else:
            p.view_checksums[view] = checksum
            del p.view_tensors[view]


def encode_batch(spec: EncodeSpec, items: list[WorkItem]) -> BatchResult:
    """The Dask task: prepare every image of the batch, then encode and commit."""
    return encode_prepared(spec, [prepare(item, spec.max_pixels) for item in items])


def warm_up(spec: EncodeSpec) -> None:
    """Build this process's encoder before the first batch (keeps timing and errors early)."""
    _runner(spec)

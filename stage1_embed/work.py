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
    source: ImageSource
    row: int


@dataclass
class BatchResult:
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # ok images: skipped annotations
    seconds_encoding: float = 0.0


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


def _embeddings_array(spec: EncodeSpec) -> Any:
    """This process's handle on ``embeddings``, reopened when the coordinator has grown it.

    A handle caches the array's shape; one opened before the coordinator's resize would refuse
    the new rows (zarr never re-reads ``zarr.json`` by itself).
    """
    key = ("array", spec.cache)
    with _STATE_LOCK:
        array = _PROCESS_STATE.get(key)
        if array is None or array.shape[0] < spec.n_rows:
            array = open_cache(parse_location(spec.cache), read_only=False).embeddings
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
        prepared.tensor, prepared.input_size = prepare_image(loaded.rgb)
        prepared.annotations = load_annotations(item.source, loaded, prepared.input_size)
    except (ImageReadError, AnnotationError) as exc:
        prepared.error = str(exc)
        prepared.tensor = None
    except Exception as exc:  # one bad input never stops a run: it fails with the reason
        prepared.error = f"cannot be processed: {type(exc).__name__}: {exc}"[:500]
        prepared.tensor = None
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
    }


def encode_prepared(spec: EncodeSpec, prepared: list[Prepared]) -> BatchResult:
    """Encode the readable images, write their rows, then commit one fragment for all."""
    result = BatchResult()
    good = [p for p in prepared if p.error is None]
    array = _embeddings_array(spec) if good else None
    started = time.perf_counter()
    step = max(1, spec.batch_size)
    for start in range(0, len(good), step):
        chunk = good[start : start + step]
        batch = torch.stack([p.tensor for p in chunk])  # type: ignore[misc]
        embeddings = _runner(spec).encode(batch).numpy()
        for p, embedding in zip(chunk, embeddings, strict=True):
            p.checksum = write_embedding(array, p.item.row, embedding)  # type: ignore[arg-type]
            p.tensor = None
    result.seconds_encoding = time.perf_counter() - started
    table = manifest_table([_row(p, spec.precision) for p in prepared])
    commit_fragment(parse_location(spec.cache), table)
    result.ok = len(good)
    result.failed = [(p.item.source.image_id, p.error or "") for p in prepared if p.error]
    result.notes = [
        (p.item.source.image_id, note)
        for p in good
        if p.annotations is not None
        for note in p.annotations.notes
    ]
    return result


def encode_batch(spec: EncodeSpec, items: list[WorkItem]) -> BatchResult:
    """The Dask task: prepare every image of the batch, then encode and commit."""
    return encode_prepared(spec, [prepare(item, spec.max_pixels) for item in items])


def warm_up(spec: EncodeSpec) -> None:
    """Build this process's encoder before the first batch (keeps timing and errors early)."""
    _runner(spec)

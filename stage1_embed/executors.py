"""Where stage-1 batches run: in this process (``--workers 1``) or on a Dask cluster.

Both call the same functions of ``stage1_embed.work`` and report each finished batch through
``on_done(result, n_images)``. Memory stays flat: only a few batches are in flight at a time.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

from shared.dask_cluster import LOCAL_CLUSTER_CONFIG, dask_client  # noqa: F401 (re-exported)
from stage1_embed.work import (
    BatchResult,
    EncodeSpec,
    WorkItem,
    encode_batch,
    encode_prepared,
    failed,
    prepare,
)

OnDone = Callable[[BatchResult, int], None]
log = logging.getLogger(__name__)


def chunked(items: Sequence[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def run_local(spec: EncodeSpec, items: Sequence[WorkItem], on_done: OnDone) -> None:
    """Encode in this process; a thread decodes the next images while torch encodes.

    Decoding (PIL) and torch both release the GIL, so reading image k+1 overlaps encoding image
    k. Two groups are prefetched at most.
    """
    groups = chunked(items, max(1, spec.batch_size))

    def load(group: list[WorkItem]) -> list:
        return [prepare(item, spec.max_pixels) for item in group]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="samcache-decode") as pool:
        pending = deque(pool.submit(load, g) for g in islice(groups, 2))
        while pending:
            prepared = pending.popleft().result()
            following = next(groups, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            on_done(encode_prepared(spec, prepared), len(prepared))


def run_dask(
    spec: EncodeSpec,
    items: Sequence[WorkItem],
    on_done: OnDone,
    *,
    workers: int,
    scheduler: str | None,
    images_per_task: int,
    max_in_flight: int = 0,
) -> None:
    """Run batches as Dask tasks (``retries=2``); a batch whose worker keeps dying is split.

    A task whose worker dies is re-run elsewhere by Dask (up to
    ``distributed.scheduler.allowed-failures``); when it still fails, its images are retried
    one per task, and an image that alone kills its worker is committed as ``failed`` with the
    reason, so one poison image never takes the run down.
    """
    if not scheduler:
        spec = _with_threads(spec, max(1, (os.cpu_count() or 1) // workers))
    with dask_client(workers, scheduler, gpu=spec.device == "cuda") as client:
        n_workers = len(client.scheduler_info().get("workers", {})) or workers
        window = max_in_flight or 2 * max(1, n_workers)
        _drain(client, spec, items, on_done, images_per_task, window)


def _drain(
    client: Any,
    spec: EncodeSpec,
    items: Sequence[WorkItem],
    on_done: OnDone,
    images_per_task: int,
    window: int,
) -> None:
    """Keep ``window`` batches in flight until every batch is committed (or isolated)."""
    from dask.distributed import as_completed

    resources = {"GPU": 1} if spec.device == "cuda" else None
    batches = chunked(items, images_per_task)

    def submit(batch: list[WorkItem]):  # noqa: ANN202 - a dask Future
        future = client.submit(encode_batch, spec, batch, retries=2, pure=False,
                               resources=resources)  # fmt: skip
        future.samcache_batch = batch  # type: ignore[attr-defined]
        return future

    queue = as_completed([submit(b) for b in islice(batches, window)])
    for future in queue:
        batch = future.samcache_batch  # type: ignore[attr-defined]
        try:
            on_done(future.result(), len(batch))
        except Exception as exc:  # KilledWorker, or an unexpected error in the task
            for retry in _isolate(batch, exc, spec, on_done):
                queue.add(submit(retry))
        # Drop the result at once: Dask recomputes a result the client still holds when the
        # worker keeping it dies, which would encode and commit the batch a second time.
        future.release()
        following = next(batches, None)
        if following is not None:
            queue.add(submit(following))


def _isolate(batch: list[WorkItem], exc: BaseException, spec: EncodeSpec, on_done: OnDone):
    """Split a failed batch into single images; a single image that failed is recorded."""
    if len(batch) > 1:
        log.warning("batch of %d images failed (%s); retrying them one by one", len(batch), exc)
        return [[item] for item in batch]
    reason = f"encoding crashed its worker repeatedly: {type(exc).__name__}: {exc}"[:500]
    on_done(encode_prepared(spec, [failed(batch[0], reason)]), 1)
    return []


def _with_threads(spec: EncodeSpec, threads: int) -> EncodeSpec:
    from dataclasses import replace

    return replace(spec, torch_threads=threads)

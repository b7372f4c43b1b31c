"""The Dask cluster a command runs its tasks on: its own ``LocalCluster`` or a user's scheduler.

Used by `embed run --workers N` (stage 1 batches) and `decoder sweep` (one training trial per
task). Imports dask only inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# Settings for a cluster samcache starts itself (a user's own --scheduler keeps its own
# configuration; cache_layout.md / README say which of these to set there).
LOCAL_CLUSTER_CONFIG = {
    # One task per one-thread worker: Dask charges a worker's death to every task the worker
    # holds, so a batch merely queued behind a poison image would be split or failed with it.
    "distributed.scheduler.worker-saturation": 1.0,
    # LocalCluster closes for good a nanny whose worker has been away this long (default 15 s);
    # restarting after a crash (torch import, model load) can take that long, and after a few
    # crashes the cluster had no workers left and the run waited forever.
    "distributed.deploy.lost-worker-timeout": "1 hour",
}


@contextmanager
def dask_client(workers: int, scheduler: str | None, *, gpu: bool = False) -> Iterator[Any]:
    """A ``Client`` of the cluster at ``scheduler``, or of a new ``LocalCluster`` of ``workers``
    one-thread worker processes (each declaring the resource ``GPU=1`` when ``gpu``); closed
    (bounded, see ``close_bounded``) on exit."""
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({} if scheduler else LOCAL_CLUSTER_CONFIG):
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                resources={"GPU": 1} if gpu else None,
            )
            client = Client(cluster)
        try:
            yield client
        finally:
            close_bounded(client, cluster)


def close_bounded(client: Any, cluster: Any, timeout: float = 30.0) -> None:
    """Close the client and our own cluster without ever hanging the run at the end.

    Everything is committed by now; a shutdown that stalls (seen after killed workers: a lock
    error inside distributed's teardown) is logged and abandoned; worker processes are daemons
    of this process and end with it.
    """
    for what, closing in (("client", client), ("cluster", cluster)):
        if closing is None:
            continue
        try:
            closing.close(timeout=timeout)
        except Exception as exc:  # a teardown error must not fail a finished run
            log.warning("closing the Dask %s failed (%s); continuing", what, exc)

"""Stage 1 on a real Dask cluster of worker processes, under faults (SIGKILL, a poison image).

The test starts a ``LocalCluster`` of 2 worker processes (with nannies that restart a dead
worker) and gives its address to `embed run` as ``--scheduler``. Faults are injected by a Dask
*preload* module written into the test's tmp dir; it runs only in the workers and wraps
``stage1_embed.work`` functions there (a monkeypatch in the test process cannot reach them):

- ``hold-before`` / ``hold-after`` (files in the control dir): the first batch to commit after
  the file appears writes ``held-<stage>`` (its pid and image ids) and waits just before / just
  after committing its manifest fragment, so the test can SIGKILL that worker there;
- ``poison`` (a file holding an image id): the worker that reads that image calls ``os._exit``.

What is guaranteed (asserted below): a batch is committed by exactly one fragment, after its
rows are written. A worker killed before the commit leaves rows no fragment names; Dask reruns
the batch, which rewrites the same rows and commits once: no duplicate. A worker killed after
the commit but before its result reaches the scheduler is rerun too: its images get a second,
identical row (same row index, same bytes) and readers keep the latest. Nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shared.cache_format import STATUS_OK
from shared.cache_io import open_cache, read_embeddings, read_manifest, read_manifest_all
from shared.storage import parse_location
from stage1_embed.config import EmbedConfig
from stage1_embed.executors import LOCAL_CLUSTER_CONFIG
from stage1_embed.pipeline import RunSummary, run_embed
from stage1_embed.synthetic import make_synthetic_voc

distributed = pytest.importorskip("distributed")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # worker processes: minutes under load

N_IMAGES = 12  # 3 batches of 4 (`images_per_task` is max(4, batch_size))
SIZES = ((96, 128), (128, 96))

PLUGIN = '''
"""Test-only fault injection for samcache's Dask workers (a Dask preload module)."""
import json, os, time
from pathlib import Path

import stage1_embed.work as work

CONTROL = Path({control!r})
# Dask may import a preload more than once: always wrap the originals.
_commit = getattr(work.commit_fragment, "original", work.commit_fragment)
_prepare = getattr(work.prepare, "original", work.prepare)


def _log(event, ids):
    line = json.dumps({{"pid": os.getpid(), "event": event, "ids": ids}}) + "\\n"
    with open(CONTROL / "events.log", "a") as log:
        log.write(line)


def _hold(stage, ids):
    flag = CONTROL / f"hold-{{stage}}"
    try:
        skip = set(json.loads(flag.read_text() or "[]"))  # batches the test wants left alone
    except (FileNotFoundError, ValueError):
        return
    if skip & set(ids):
        return
    temp = CONTROL / f".held-{{stage}}-{{os.getpid()}}"
    temp.write_text(json.dumps({{"pid": os.getpid(), "ids": ids}}))
    try:
        os.link(temp, CONTROL / f"held-{{stage}}")  # atomic and exclusive: one worker holds
    except FileExistsError:
        return
    deadline = time.time() + 600
    while flag.exists() and time.time() < deadline:
        time.sleep(0.02)


def commit_fragment(location, table):
    ids = table.column("image_id").to_pylist()
    _log("encoded", ids)
    _hold("before", ids)
    name = _commit(location, table)
    _log("committed", ids)
    _hold("after", ids)
    return name


def prepare(item, max_pixels):
    poison = CONTROL / "poison"
    if poison.exists() and item.source.image_id == poison.read_text().strip():
        os._exit(1)
    return _prepare(item, max_pixels)


commit_fragment.original, prepare.original = _commit, _prepare
work.commit_fragment, work.prepare = commit_fragment, prepare
'''


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    voc = make_synthetic_voc(tmp_path_factory.mktemp("voc"), n_images=N_IMAGES, seed=5,
                             size_choices=SIZES)  # fmt: skip
    return voc / "JPEGImages"


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    return EmbedConfig(images=str(images), out=str(out), model_type="vit_tiny_random",
                       checkpoint=str(checkpoint), download=False, precision="fp32",
                       dtype="float32", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def reference(images, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same images encoded by one process (``--workers 1``)."""
    out = tmp_path_factory.mktemp("reference") / "cache.zarr"
    summary = run_embed(_config(images, out, tiny_checkpoint))
    assert summary.encoded == N_IMAGES and not summary.failed
    return out


CLUSTER_SCRIPT = """
import json, sys, time
import dask
from dask.distributed import LocalCluster

settings, plugin, ready = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with dask.config.set(settings):
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, preload=[plugin])
    with open(ready + ".tmp", "w") as f:
        f.write(cluster.scheduler_address)
    import os; os.replace(ready + ".tmp", ready)
    while True:  # ended by the test (SIGKILL of the whole process group)
        time.sleep(3600)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A scheduler with 2 one-thread worker processes running the fault plugin.

    The cluster lives in its own process group, started here and ended with SIGKILL: an
    in-process ``LocalCluster`` shut down after killed workers sometimes hung in its teardown
    (a lock error in distributed), which no test may depend on.
    """
    control = tmp_path_factory.mktemp("faults")
    plugin = control / "samcache_test_faults.py"
    plugin.write_text(PLUGIN.format(control=str(control)))
    # The settings `embed run --workers N` gives its own cluster (one task per worker, no
    # shrinking after crashes), plus 1 allowed failure: a worker death counts against the task
    # it ran, so the poison test costs 2 deaths per task instead of Dask's default 4.
    settings = {**LOCAL_CLUSTER_CONFIG, "distributed.scheduler.allowed-failures": 1}
    ready = control / "scheduler-address"
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(settings), str(plugin), str(ready)],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            assert process.poll() is None, "the Dask cluster process exited at start-up"
            assert time.monotonic() < deadline, "the Dask cluster did not start in 600 s"
            time.sleep(0.1)
        yield ready.read_text(), control
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # scheduler, nannies and workers at once
        process.wait(timeout=60)


def _run_in_thread(config: EmbedConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["summary"] = run_embed(config)
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _run_bounded(config: EmbedConfig, timeout: float = 900.0) -> RunSummary:
    """run_embed, failing the test (not hanging it) if the cluster stops making progress."""
    thread, box = _run_in_thread(config)
    thread.join(timeout)
    assert not thread.is_alive(), f"embed run did not finish in {timeout:.0f} s"
    assert "error" not in box, repr(box.get("error"))
    return box["summary"]


def _wait_for(path: Path, thread: threading.Thread, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert thread.is_alive(), "the run ended before the fault was injected"
        assert time.monotonic() < deadline, f"no worker reached {path.name}"
        time.sleep(0.02)
    return json.loads(path.read_text())


def _kill_at(control: Path, stage: str, thread: threading.Thread, skip: tuple = ()) -> dict:
    """Arm ``hold-<stage>`` (not for batches holding ``skip`` ids), SIGKILL the worker that
    reaches it, disarm."""
    flag = control / f"hold-{stage}"
    temp = control / f".hold-{stage}"
    temp.write_text(json.dumps(list(skip)))
    temp.replace(flag)
    held = _wait_for(control / f"held-{stage}", thread)
    os.kill(held["pid"], signal.SIGKILL)
    flag.unlink()
    return held


@pytest.fixture(scope="module")
def killed_run(cluster, images, tiny_checkpoint, tmp_path_factory) -> dict:
    """One run during which one worker is killed before a commit and one just after one."""
    address, control = cluster
    out = tmp_path_factory.mktemp("killed") / "cache.zarr"
    thread, box = _run_in_thread(_config(images, out, tiny_checkpoint, scheduler=address))
    before = _kill_at(control, "before", thread)
    after = _kill_at(control, "after", thread, skip=tuple(before["ids"]))
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after the kills"
    assert "error" not in box, repr(box.get("error"))
    events = [json.loads(line) for line in (control / "events.log").read_text().splitlines()]
    (control / "events.log").unlink()
    return {"out": out, "summary": box["summary"], "before": before, "after": after,
            "events": events}  # fmt: skip


def test_kills_lose_nothing_and_duplicate_only_a_lost_result(killed_run) -> None:
    summary: RunSummary = killed_run["summary"]
    assert summary.encoded == N_IMAGES and not summary.failed
    before, after = killed_run["before"], killed_run["after"]
    assert before["pid"] != after["pid"]  # the first killed worker was replaced
    everything = read_manifest_all(parse_location(killed_run["out"])).to_pylist()
    assert all(r["status"] == STATUS_OK for r in everything)
    counts = Counter(r["image_id"] for r in everything)
    assert len(counts) == N_IMAGES
    # Committed twice: exactly the batch whose worker died after its commit (its result was
    # lost); both rows point to the same row index with the same sha256.
    twice = {image_id for image_id, n in counts.items() if n == 2}
    assert twice == set(after["ids"]) and max(counts.values()) == 2
    for image_id in twice:
        pair = [r for r in everything if r["image_id"] == image_id]
        assert pair[0]["row"] == pair[1]["row"] and pair[0]["sha256"] == pair[1]["sha256"]
    # Killed before its commit: rows were written but never committed, then redone once.
    assert not set(before["ids"]) & twice
    assert read_manifest(parse_location(killed_run["out"])).num_rows == N_IMAGES


def test_killed_run_equals_single_process_cache(killed_run, reference) -> None:
    _assert_same_cache(killed_run["out"], reference)


def test_work_redone_is_measured(killed_run) -> None:
    """Encodes = every image once + the two killed batches (nothing else was redone)."""
    encoded = sum(len(e["ids"]) for e in killed_run["events"] if e["event"] == "encoded")
    redone = len(killed_run["before"]["ids"]) + len(killed_run["after"]["ids"])
    assert encoded == N_IMAGES + redone


def test_poison_image_is_failed_and_the_rest_ok(
    cluster, images, tiny_checkpoint, reference, tmp_path
) -> None:
    address, control = cluster
    out, poison = tmp_path / "c.zarr", "000006"
    (control / "poison").write_text(poison)
    try:
        summary = _run_bounded(_config(images, out, tiny_checkpoint, scheduler=address))
    finally:
        (control / "poison").unlink()
    assert [image_id for image_id, _ in summary.failed] == [poison]
    assert "crashed its worker" in summary.failed[0][1]
    assert summary.encoded == N_IMAGES - 1
    rows = {r["image_id"]: r for r in read_manifest(parse_location(out)).to_pylist()}
    assert len(rows) == N_IMAGES
    assert rows[poison]["status"] == "failed" and rows[poison]["row"] == -1
    assert "KilledWorker" in rows[poison]["error"]
    assert all(r["status"] == STATUS_OK for k, r in rows.items() if k != poison)
    # A batch is committed twice only when a worker died holding its finished, not yet
    # fetched result (Dask then recomputes it); such an image has two identical rows.
    history = Counter(r["image_id"] for r in read_manifest_all(parse_location(out)).to_pylist())
    assert max(history.values()) <= 2

    # Rerun on the same cluster once the image is fixed: only it is encoded, into a new row
    # (workers still holding the 12-row array from the first run must reopen it).
    again = _run_bounded(_config(images, out, tiny_checkpoint, scheduler=address))
    assert (again.cached_before, again.encoded, again.failed) == (N_IMAGES - 1, 1, [])
    fixed = read_manifest(parse_location(out)).to_pylist()
    assert [r["row"] for r in fixed if r["image_id"] == poison] == [N_IMAGES]
    _assert_same_cache(out, reference)


def _assert_same_cache(out: Path, reference: Path) -> None:
    """Same ok images with the same metadata and, at fp32, the same embeddings."""
    columns = ["image_id", "row", "sha256", "original_height", "original_width",
               "input_height", "input_width", "n_objects", "objects", "split"]  # fmt: skip
    got = {r["image_id"]: r for r in read_manifest(parse_location(out), columns).to_pylist()}
    want = {r["image_id"]: r for r in read_manifest(parse_location(reference), columns).to_pylist()}
    assert got.keys() == want.keys()
    for image_id in want:
        assert {**got[image_id], "row": 0} == {**want[image_id], "row": 0}, image_id
    ids = sorted(want)
    mine = read_embeddings(open_cache(out).embeddings, [got[i]["row"] for i in ids])
    theirs = read_embeddings(open_cache(reference).embeddings, [want[i]["row"] for i in ids])
    np.testing.assert_array_equal(mine, theirs)  # same fp32 kernels: bit-identical here

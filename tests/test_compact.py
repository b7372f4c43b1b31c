"""`embed compact`: winners kept bit for bit, superseded rows dropped, rows freed and reused,
safe against `kill -9` at any step (a real process, killed where it says it is), refused
under the lock; `embed status` tells the row kinds apart."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import shared.cache_io as cache_io
from shared.cache_format import LOCK_NAME
from shared.cache_io import (
    allocate_rows,
    commit_fragment,
    manifest_table,
    open_cache,
    read_manifest,
    read_manifest_all,
    read_manifest_state,
    stored_rows,
    write_embedding,
)
from shared.storage import CacheLock, CacheLockedError, parse_location
from stage1_embed.cli import app
from stage1_embed.compact import compact_cache
from stage1_embed.status import cache_status, format_status
from tests.cache_factory import make_cache

REPO = Path(__file__).resolve().parents[1]
KEY = ["image_id", "committed_ns", "row", "n_objects", "status"]


def messy_cache(path: Path, checkpoint: Path) -> Path:
    """6 images (rows 0-5) + a relabel of img0001 (same row), img0002 re-encoded (row 6, so
    row 2 is superseded) and a killed run's row 7 (written, never committed)."""
    make_cache(path, checkpoint, n_images=6, seed=1)
    cache = open_cache(path, read_only=False)
    rows = {r["image_id"]: r for r in read_manifest(cache.location).to_pylist()}
    relabel = {**rows["img0001"], "n_objects": 1, "objects": rows["img0001"]["objects"][:1]}
    commit_fragment(cache.location, manifest_table([_strip(relabel)]))
    rng = np.random.default_rng(7)
    (new_row,) = allocate_rows(cache, 1)
    write_embedding(cache.embeddings, new_row, rng.standard_normal((256, 64, 64)))
    changed = {**rows["img0002"], "row": new_row, "sha256": "f" * 64}
    commit_fragment(cache.location, manifest_table([_strip(changed)]))
    (orphan,) = allocate_rows(cache, 1)
    write_embedding(cache.embeddings, orphan, rng.standard_normal((256, 64, 64)))
    assert (new_row, orphan) == (6, 7)
    return path


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "committed_ns"}


def snapshot(path: Path) -> tuple[list[tuple], list[tuple], dict[str, bytes]]:
    """(every manifest row, winning rows, winners' embedding bytes) as comparable values."""
    location = parse_location(path)
    history = sorted(tuple(r.values()) for r in read_manifest_all(location, KEY).to_pylist())
    winners = read_manifest(location, KEY).to_pylist()
    array = open_cache(path).embeddings
    data = {r["image_id"]: array[r["row"]].tobytes() for r in winners if r["row"] >= 0}
    return history, sorted(tuple(r.values()) for r in winners), data


def test_compaction_keeps_winners_bit_for_bit_and_frees_rows(tmp_path, tiny_checkpoint) -> None:
    path = messy_cache(tmp_path / "c.zarr", tiny_checkpoint)
    history, winners, data = snapshot(path)
    status = cache_status(str(path))
    assert (status.rows_allocated, status.rows_in_use) == (8, 6)
    assert (status.rows_superseded, status.unused_rows, status.rows_free) == (1, 1, 0)
    report = format_status(status)
    assert "1 left by relabelling or changed images, 1 unused (from interrupted runs)" in report
    assert "`embed compact" in report and "would free 2 rows" in report

    summary = compact_cache(str(path))
    assert (summary.files_before, summary.rows_dropped, summary.rows_freed) == (3, 2, 2)
    assert summary.chunks_deleted == 2
    new_history, new_winners, new_data = snapshot(path)
    assert new_winners == winners and new_data == data  # bit for bit
    assert new_history == winners and len(history) == len(winners) + 2
    names = sorted(os.listdir(path / "manifest"))
    assert len(names) == 2 and names[0] == "_current.json" and names[1].startswith("base-")
    cache = open_cache(path, read_only=False)
    assert stored_rows(cache) == {0, 1, 3, 4, 5, 6}  # chunks of rows 2 and 7 deleted
    status = cache_status(str(path))
    assert (status.rows_free, status.reclaimable_rows, status.manifest_files) == (2, 0, 1)
    assert "`embed compact" not in format_status(status)
    assert allocate_rows(cache, 3) == [2, 7, 8]  # freed rows first, then after the end
    assert read_manifest_state(cache.location).free_rows == ()  # handed out once only
    assert allocate_rows(cache, 1) == [9]  # a killed run's rows are not handed out again
    again = compact_cache(str(path))
    assert (again.rows_dropped, again.rows_freed, again.chunks_deleted) == (0, 4, 0)
    assert read_manifest_state(cache.location).free_rows == (2, 7, 8, 9)


def test_compaction_is_refused_under_the_lock_and_holds_it(tmp_path, tiny_checkpoint) -> None:
    path = messy_cache(tmp_path / "c.zarr", tiny_checkpoint)
    location = parse_location(path)
    with CacheLock(location, LOCK_NAME):
        with pytest.raises(CacheLockedError, match="another `embed run`"):
            compact_cache(str(path))
        result = CliRunner().invoke(app, ["compact", str(path)])
        assert result.exit_code == 2 and "another `embed run`" in result.output
    refused = []

    def try_to_write(phase: str, done: int, total: int) -> None:
        if phase == "switch":
            with pytest.raises(CacheLockedError):
                CacheLock(location, LOCK_NAME).__enter__()
            refused.append(phase)

    compact_cache(str(path), try_to_write)
    assert refused == ["switch"]
    result = CliRunner().invoke(app, ["compact", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 manifest files -> 1, 0 superseded manifest rows dropped" in result.output
    status = CliRunner().invoke(app, ["status", str(path)])
    assert "2 free" in status.output and "`embed compact" not in status.output


def test_a_reader_during_compaction_sees_old_or_new(tmp_path, tiny_checkpoint, monkeypatch):
    """A compaction that runs between a reader's listing and its reading of the files."""
    path = messy_cache(tmp_path / "c.zarr", tiny_checkpoint)
    _, winners, _ = snapshot(path)
    real = cache_io.read_manifest_files
    calls, compacted = [], []

    def compact_in_between(location, names, columns=None):
        if not compacted:
            compacted.append(True)  # before: the compaction reads the manifest too
            compact_cache(str(path))  # deletes the files this reader listed
        calls.append(list(names))
        return real(location, names, columns)

    monkeypatch.setattr(cache_io, "read_manifest_files", compact_in_between)
    history = read_manifest_all(parse_location(path), KEY)
    assert sorted(tuple(r.values()) for r in history.to_pylist()) == winners
    assert calls[-1][0].startswith("base-") and not calls[-2][0].startswith("base-")


CHILD = """
import sys, time
from stage1_embed.compact import compact_cache

def stop_at(phase, done, total):
    if f"{phase}:{done}" == sys.argv[2]:
        print("AT", sys.argv[2], flush=True)
        time.sleep(600)

compact_cache(sys.argv[1], stop_at)
print("DONE", flush=True)
"""


def test_kill_9_at_any_step_leaves_old_or_new(tmp_path, tiny_checkpoint) -> None:
    template = messy_cache(tmp_path / "template.zarr", tiny_checkpoint)
    old_history, winners, data = snapshot(template)
    points: list[str] = []
    dry = tmp_path / "dry.zarr"
    shutil.copytree(template, dry)
    compact_cache(str(dry), lambda phase, done, total: points.append(f"{phase}:{done}"))
    assert {"read:1", "base:1", "switch:1", "remove:3", "pointer:1", "free:1"} <= set(points)
    chosen = ["base:1", "switch:1", *random.Random(11).sample(points, 4)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k, point in enumerate(chosen):
        path = tmp_path / f"try{k}.zarr"
        shutil.copytree(template, path)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), point],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            line = child.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == f"AT {point}", f"the child did not stop at {point}: {line!r}"
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
        history, now_winners, now_data = snapshot(path)
        assert history in (old_history, winners), point  # the old or the new manifest
        assert now_winners == winners and now_data == data, point
        compact_cache(str(path))  # a later compaction finishes the job
        history, now_winners, now_data = snapshot(path)
        assert history == winners and now_data == data, point
        assert len(os.listdir(path / "manifest")) == 2, point
        assert stored_rows(open_cache(path)) == {0, 1, 3, 4, 5, 6}, point
        assert read_manifest_state(parse_location(path)).free_rows == (2, 7), point


def test_compaction_on_object_storage(tmp_path, tiny_checkpoint) -> None:
    from tests.s3_server import s3_server

    local = messy_cache(tmp_path / "c.zarr", tiny_checkpoint)
    _, winners, data = snapshot(local)
    with s3_server() as server:
        server.create_bucket("bucket")
        location = parse_location("s3://bucket/c.zarr")
        location.fs.put(str(local), "bucket/c.zarr", recursive=True)
        url = "s3://bucket/c.zarr"
        summary = compact_cache(url)
        assert (summary.rows_dropped, summary.chunks_deleted) == (2, 2)
        history = read_manifest_all(parse_location(url), KEY).to_pylist()
        assert sorted(tuple(r.values()) for r in history) == winners
        cache = open_cache(url)
        assert stored_rows(cache) == {0, 1, 3, 4, 5, 6}
        assert {r: cache.embeddings[r].tobytes() for r in (0, 6)} == {
            0: data["img0000"],
            6: data["img0002"],
        }
        keys = server.list_keys("bucket", "c.zarr/manifest/")
        assert len(keys) == 2 and "c.zarr/manifest/_current.json" in keys

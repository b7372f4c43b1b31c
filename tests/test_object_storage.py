"""Caches on object storage: `embed run --out s3://…` against a real S3 server (moto, 127.0.0.1).

The same run is made to a local folder; the S3 cache must hold the same manifest and the same
embeddings, written as whole objects (one PUT per chunk and per manifest fragment), and be
readable through ``shared.cache_io`` as stage 2 reads it. The remote lease stands in for the
local ``flock``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from shared.cache_format import EMBEDDING_SHAPE, LOCK_NAME, MANIFEST_DIR
from shared.cache_io import (
    commit_fragment,
    manifest_table,
    ok_rows,
    open_cache,
    read_embeddings,
    read_manifest,
    read_manifest_all,
)
from shared.storage import CacheLock, CacheLockedError, Location, parse_location
from stage1_embed.cli import app
from stage1_embed.synthetic import make_synthetic_voc
from tests.s3_server import S3Server, s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "samcache-test"
URL = f"s3://{BUCKET}/runs/cache.zarr"
N_IMAGES = 4
runner = CliRunner()
# Columns that must agree between the local and the S3 cache (committed_ns is a clock value).
COMPARED = [
    "image_id", "row", "sha256", "status", "original_height", "original_width",
    "input_height", "input_width", "n_objects", "objects", "split", "precision",
]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> S3Server:
    with s3_server() as running:
        running.create_bucket(BUCKET)
        yield running


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    voc = make_synthetic_voc(tmp_path_factory.mktemp("voc"), n_images=N_IMAGES, seed=3,
                             size_choices=((96, 128), (128, 96)))  # fmt: skip
    return voc / "JPEGImages"


def _embed(images: Path, out: str, checkpoint: Path, *extra: str):
    args = ["run", "--images", str(images), "--out", out, "--model-type", "vit_tiny_random",
            "--checkpoint", str(checkpoint), "--no-download", "--precision", "fp32",
            "--dtype", "float32", *extra]  # fmt: skip
    return runner.invoke(app, args)


def _text(result) -> str:
    """The CLI output on one line (rich wraps long lines at the terminal width)."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def runs(server, images, tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """The same images embedded into S3 and into a local folder (each run once per module)."""
    local = str(tmp_path_factory.mktemp("local") / "cache.zarr")
    for out in (URL, local):
        result = _embed(images, out, tiny_checkpoint)
        assert result.exit_code == 0, result.output
        assert f"{N_IMAGES} encoded, 0 failed" in _text(result)
    return {"s3": URL, "local": local}


def test_s3_cache_equals_local_cache(runs) -> None:
    s3, local = parse_location(runs["s3"]), parse_location(runs["local"])
    remote_rows = ok_rows(s3).select(COMPARED).to_pylist()
    local_rows = ok_rows(local).select(COMPARED).to_pylist()
    assert len(remote_rows) == N_IMAGES and remote_rows == local_rows
    rows = [r["row"] for r in remote_rows]
    # Read as stage 2 does: through shared.cache_io on the URL.
    from_s3 = read_embeddings(open_cache(runs["s3"]).embeddings, rows)
    from_disk = read_embeddings(open_cache(runs["local"]).embeddings, rows)
    assert from_s3.shape == (N_IMAGES, *EMBEDDING_SHAPE) and from_s3.dtype == np.float32
    assert np.abs(from_s3).max() > 0  # not the fill value
    np.testing.assert_array_equal(from_s3, from_disk)
    skip = {"created_at", "embed_config"}  # embed_config names the --out
    remote_attrs, local_attrs = (open_cache(runs[k]).attrs.to_dict() for k in ("s3", "local"))
    assert {k: v for k, v in remote_attrs.items() if k not in skip} == {
        k: v for k, v in local_attrs.items() if k not in skip
    }


def test_objects_are_whole_chunks_and_final_fragments(runs, server: S3Server) -> None:
    keys = server.list_keys(BUCKET, "runs/cache.zarr/")
    prefix = "runs/cache.zarr/"
    rows = ok_rows(parse_location(runs["s3"]), ["row"]).column("row").to_pylist()
    chunk_bytes = int(np.prod(EMBEDDING_SHAPE)) * 4  # float32, no compressor
    for row in rows:  # one object per row, holding the whole raw chunk
        assert keys[f"{prefix}embeddings/c/{row}/0/0/0"] == chunk_bytes
    fragments = [k for k in keys if k.startswith(f"{prefix}{MANIFEST_DIR}/")]
    names = [k.rsplit("/", 1)[1] for k in fragments]
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    assert f"{prefix}{LOCK_NAME}" not in keys  # the lease is removed when the run ends
    assert {f"{prefix}zarr.json", f"{prefix}embeddings/zarr.json"} <= set(keys)


def test_rerun_on_s3_encodes_nothing(runs, images, tiny_checkpoint) -> None:
    before = read_manifest_all(parse_location(runs["s3"])).num_rows
    result = _embed(images, runs["s3"], tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert f"{N_IMAGES} already cached, 0 encoded" in _text(result)
    assert "model not loaded" in _text(result)
    assert read_manifest_all(parse_location(runs["s3"])).num_rows == before


def test_status_reads_s3(runs) -> None:
    result = runner.invoke(app, ["status", runs["s3"]])
    assert result.exit_code == 0, result.output
    assert f"{N_IMAGES} ok, 0 failed" in _text(result) and runs["s3"] in _text(result)
    assert "vit_tiny_random" in _text(result)


def test_lease_refuses_a_concurrent_writer(runs, images, tiny_checkpoint, server) -> None:
    location = parse_location(runs["s3"])
    with CacheLock(location, LOCK_NAME):
        result = _embed(images, runs["s3"], tiny_checkpoint)
        assert result.exit_code == 2, result.output
        assert "being written by another `embed run`" in _text(result)
        with pytest.raises(CacheLockedError):
            CacheLock(parse_location(runs["s3"]), LOCK_NAME).__enter__()
    assert f"runs/cache.zarr/{LOCK_NAME}" not in server.list_keys(BUCKET, "runs/")
    assert _embed(images, runs["s3"], tiny_checkpoint).exit_code == 0  # free again


def _put_lease(location, **holder) -> None:
    location.fs.pipe_file(location.join(LOCK_NAME), json.dumps(holder).encode())


def test_lease_heartbeat_stale_and_dead_holders(server) -> None:
    location = parse_location(f"s3://{BUCKET}/lease-test")
    with CacheLock(location, LOCK_NAME, stale_after=0.8):
        time.sleep(1.3)  # older than stale_after: only the heartbeat keeps the lease fresh
        with pytest.raises(CacheLockedError, match="being written by another"):
            CacheLock(location, LOCK_NAME, stale_after=0.8).__enter__()
    other_host = {"host": "elsewhere.example", "pid": 1, "token": "x"}
    _put_lease(location, **other_host, time=time.time())
    with pytest.raises(CacheLockedError, match="elsewhere.example"):
        CacheLock(location, LOCK_NAME).__enter__()
    _put_lease(location, **other_host, time=time.time() - 3600)  # stale: taken over
    with CacheLock(location, LOCK_NAME):
        pass
    dead_pid = _dead_pid()
    _put_lease(location, host=socket.gethostname(), pid=dead_pid, time=time.time(), token="y")
    with CacheLock(location, LOCK_NAME):  # holder was killed on this host: taken over at once
        pass
    assert not location.fs.exists(location.join(LOCK_NAME))


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_failed_fragment_write_uploads_nothing(server, monkeypatch) -> None:
    """A fragment is one PUT of its final name: a failure while serialising leaves no object."""
    import pyarrow.parquet as pq

    location = parse_location(f"s3://{BUCKET}/fragment-test")
    table = manifest_table([])

    def broken_write(tbl: pa.Table, where, **kw) -> None:
        where.write(b"PAR1 partial bytes")
        raise OSError("disk full while writing parquet")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        commit_fragment(location, table)
    assert server.list_keys(BUCKET, "fragment-test/") == {}
    monkeypatch.undo()
    name = commit_fragment(location, table)
    assert list(server.list_keys(BUCKET, "fragment-test/")) == [f"fragment-test/manifest/{name}"]
    assert read_manifest(location).num_rows == 0


@pytest.mark.slow
def test_dask_workers_write_to_s3(runs, images, tiny_checkpoint) -> None:
    """`--workers 2`: worker processes reach the server through the inherited environment; the
    coordinator then sees their fragments (no stale listing) and a rerun encodes nothing."""
    url = f"s3://{BUCKET}/runs/dask.zarr"
    result = _embed(images, url, tiny_checkpoint, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"{N_IMAGES} encoded, 0 failed" in _text(result)
    dask_rows = ok_rows(parse_location(url)).select(COMPARED).to_pylist()
    local_rows = ok_rows(parse_location(runs["local"])).select(COMPARED).to_pylist()
    assert dask_rows == local_rows
    rows = [r["row"] for r in dask_rows]
    np.testing.assert_array_equal(
        read_embeddings(open_cache(url).embeddings, rows),
        read_embeddings(open_cache(runs["local"]).embeddings, rows),
    )
    again = _embed(images, url, tiny_checkpoint)
    assert f"{N_IMAGES} already cached, 0 encoded" in _text(again), again.output


def test_fragments_committed_elsewhere_are_seen(runs) -> None:
    """s3fs caches listings per process: a fragment a Dask worker committed after this process
    listed the cache must still be read (read_manifest invalidates the cached listing)."""
    import s3fs

    first = read_manifest_all(parse_location(runs["s3"])).to_pylist()[0]
    row = {k: v for k, v in first.items() if k != "committed_ns"}
    location = parse_location(f"s3://{BUCKET}/listing-test")
    location.fs.pipe_file(location.join("zarr.json"), b"{}")
    location.fs.ls(location.path)  # cached here: a folder without manifest/
    worker_fs = s3fs.S3FileSystem(skip_instance_cache=True)  # what another process holds
    commit_fragment(Location(worker_fs, location.path, location.display), manifest_table([row]))
    assert read_manifest_all(location).column("image_id").to_pylist() == [row["image_id"]]


def test_missing_bucket_is_refused_not_created(server: S3Server, images, tiny_checkpoint) -> None:
    result = _embed(images, "s3://no-such-bucket/cache.zarr", tiny_checkpoint)
    assert result.exit_code == 2, _text(result)
    assert "does not exist" in _text(result)
    assert "no-such-bucket" not in server.list_buckets()

"""The cache notices its own damage: checksums, missing or truncated chunks, an edited
``zarr.json``, stray manifest files; `embed verify` reports it and `embed run --repair` fixes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from shared.cache_format import CacheDamageError
from shared.cache_io import (
    embedding_checksum,
    manifest_files,
    ok_rows,
    open_cache,
    read_embedding_rows,
    read_manifest,
    read_manifest_all,
)
from shared.storage import parse_location
from stage1_embed.cli import app as embed_app
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage2_decoder.dataset import TrainBatches, load_split
from tests.cache_factory import make_cache

runner = CliRunner()


def _chunk(cache: Path, row: int) -> Path:
    return cache / "embeddings" / "c" / str(row) / "0" / "0" / "0"


def _records(cache: Path) -> list[dict]:
    columns = ["image_id", "row", "embedding_checksum"]
    return ok_rows(parse_location(cache), columns).to_pylist()


@pytest.fixture()
def small_cache(tmp_path, tiny_checkpoint) -> Path:
    return make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=4, objects_per_image=1)


def test_checksums_are_written_and_match(small_cache: Path) -> None:
    cache = open_cache(small_cache)
    records = _records(small_cache)
    assert all(r["embedding_checksum"].startswith("xxh3_64:") for r in records)
    array = read_embedding_rows(cache, records)
    assert embedding_checksum(array[0]) == records[0]["embedding_checksum"]


def _flip_byte(path: Path, offset: int = 1001) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # a finite value changes a little: training would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "deleted", "truncated"])
def test_damaged_row_is_named_and_never_trained_on(small_cache: Path, damage: str) -> None:
    record = _records(small_cache)[1]
    chunk = _chunk(small_cache, record["row"])
    if damage == "flipped":
        _flip_byte(chunk)
    elif damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 4])
    with pytest.raises(CacheDamageError) as raised:
        read_embedding_rows(open_cache(small_cache), [record])
    message = str(raised.value)
    assert repr(record["image_id"]) in message and f"row {record['row']}" in message
    assert "embed verify" in message and "--repair" in message
    # the training dataset reads through the same path: the batch holding the image fails
    split = load_split(str(small_cache), 0.25, seed=0)
    data = TrainBatches(str(small_cache), split.train, images_per_step=4, objects_per_image=1,
                        seed=0, epochs=1)  # fmt: skip
    if record["image_id"] in split.train.column("image_id").to_pylist():
        with pytest.raises(CacheDamageError, match=record["image_id"]):
            data[0]


def test_rows_without_checksum_read_unverified(small_cache: Path) -> None:
    """A cache written before checksums (no column in its fragments) reads without error."""
    manifest = small_cache / "manifest"
    for path in manifest.glob("part-*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["embedding_checksum"]), path)
    records = _records(small_cache)
    assert all(r["embedding_checksum"] is None for r in records)
    assert read_embedding_rows(open_cache(small_cache), records).shape[0] == len(records)
    status = runner.invoke(embed_app, ["status", str(small_cache)])
    assert status.exit_code == 0 and "4 ok images have none" in status.output


def test_stray_manifest_file_is_ignored_and_reported(small_cache: Path) -> None:
    manifest = small_cache / "manifest"
    fragment = next(manifest.glob("part-*.parquet"))
    shutil.copy(fragment, manifest / (fragment.name + ".6aF8b1c2"))  # a sync tool's leftover
    (manifest / "notes.txt").write_text("not parquet")
    location = parse_location(small_cache)
    assert read_manifest_all(location).num_rows == 4
    assert read_manifest(location).num_rows == 4
    assert sorted(manifest_files(location)[1]) == sorted([fragment.name + ".6aF8b1c2", "notes.txt"])
    status = runner.invoke(embed_app, ["status", str(small_cache)])
    assert status.exit_code == 0, status.output
    assert "2 stray file(s)" in status.output and "notes.txt" in status.output
    verify = runner.invoke(embed_app, ["verify", str(small_cache)])
    assert "2 stray file(s)" in verify.output and verify.exit_code == 0, verify.output


def test_shrunk_embeddings_shape_is_refused_naming_both(small_cache: Path) -> None:
    meta_path = small_cache / "embeddings" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheDamageError, match=r"has 2 rows .* rows up to 3 \(4 rows needed\)"):
        open_cache(small_cache)
    verify = runner.invoke(embed_app, ["verify", str(small_cache)])
    assert verify.exit_code == 1 and "manifest uses 4" in verify.output, verify.output


def test_verify_finds_every_kind_of_damage(small_cache: Path) -> None:
    records = _records(small_cache)
    _flip_byte(_chunk(small_cache, records[0]["row"]))
    _chunk(small_cache, records[1]["row"]).unlink()
    chunk = _chunk(small_cache, records[2]["row"])
    chunk.write_bytes(chunk.read_bytes()[:1000])
    status = runner.invoke(embed_app, ["status", str(small_cache)])
    assert status.exit_code == 0 and "2 ok images have a missing or torn" in status.output
    result = runner.invoke(embed_app, ["verify", str(small_cache)])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "damaged      3 image(s)" in out
    assert f"{records[0]['image_id']} (row {records[0]['row']}): checksum" in out
    assert "chunk file is missing" in out and "chunk file is 1000 bytes" in out
    assert "embed run --images DIR" in out and "--repair" in out


def test_verify_flags_a_row_claimed_by_different_images(small_cache: Path, tiny_checkpoint) -> None:
    from shared.cache_io import commit_fragment, manifest_table

    location = parse_location(small_cache)
    row = read_manifest(location).to_pylist()[0]
    other = {k: v for k, v in row.items() if k != "committed_ns"}
    twin = {**other, "image_id": "twin_same_bytes"}
    stranger = {**other, "image_id": "stranger", "sha256": "f" * 64}
    commit_fragment(location, manifest_table([twin]))
    clean = runner.invoke(embed_app, ["verify", str(small_cache)])
    assert clean.exit_code == 0, clean.output  # identical image bytes may share a row
    commit_fragment(location, manifest_table([stranger]))
    result = runner.invoke(embed_app, ["verify", str(small_cache)])
    assert result.exit_code == 1 and "claimed by images with different bytes" in result.output


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    defaults = dict(model_type="vit_tiny_random", checkpoint=str(checkpoint), download=False,
                    precision="fp32")  # fmt: skip
    return EmbedConfig(images=str(images), out=str(out), **{**defaults, **kw})


def test_repair_reencodes_exactly_the_damaged_rows(tmp_path, voc_sample_dir, tiny_checkpoint):
    images = voc_sample_dir / "JPEGImages"
    out = tmp_path / "c.zarr"
    assert run_embed(_config(images, out, tiny_checkpoint)).encoded == 5
    before = {r["image_id"]: r for r in _records(out)}
    cache = open_cache(out)
    good = dict(zip(before, read_embedding_rows(cache, list(before.values())), strict=True))
    victim, lost = sorted(before)[0], sorted(before)[3]
    _flip_byte(_chunk(out, before[victim]["row"]))
    _chunk(out, before[lost]["row"]).unlink()
    rows_before = open_cache(out).embeddings.shape[0]
    summary = run_embed(_config(images, out, tiny_checkpoint, repair=True))
    assert summary.repaired == 2 and summary.encoded == 2 and not summary.failed
    after = {r["image_id"]: r for r in _records(out)}
    assert {k: v["row"] for k, v in after.items()} == {k: v["row"] for k, v in before.items()}
    assert open_cache(out).embeddings.shape[0] == rows_before  # same rows, none allocated
    repaired = read_embedding_rows(open_cache(out), [after[k] for k in before])
    for image_id, embedding in zip(before, repaired, strict=True):
        np.testing.assert_array_equal(embedding, good[image_id])
    verify = runner.invoke(embed_app, ["verify", str(out)])
    assert verify.exit_code == 0 and "damaged      none" in verify.output, verify.output


def test_out_inside_images_is_refused(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images = tmp_path / "imgs"
    shutil.copytree(voc_sample_dir / "JPEGImages", images)
    for out in (images, images / "cache.zarr"):
        with pytest.raises(ValueError, match="inside --images"):
            run_embed(_config(images, out, tiny_checkpoint))
    assert not (images / "cache.zarr").exists() and not (images / "zarr.json").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_train_on_a_damaged_row_stops_in_one_line(small_cache: Path, tmp_path, workers) -> None:
    """Through the CLI, also when a DataLoader worker process hits the damage."""
    from stage2_decoder.cli import app as decoder_app

    for record in _records(small_cache):
        _flip_byte(_chunk(small_cache, record["row"]))
    result = runner.invoke(decoder_app, [
        "train", "--cache", str(small_cache), "--out", str(tmp_path / "run"), "--epochs", "1",
        "--iterations", "1", "--images-per-step", "2", "--num-workers", workers,
        "--val-fraction", "0.25",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and lines[0].startswith("error:"), result.output
    assert "is damaged: checksum" in text and "embed verify" in text and "DataLoader" not in text

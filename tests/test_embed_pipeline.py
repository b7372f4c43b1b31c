"""`embed run` end to end on the tiny encoder: layout, equality with Meta, reruns, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shared.cache_format import CacheMismatchError
from shared.cache_io import open_cache, read_manifest, read_manifest_all
from shared.checkpoint_files import make_random_checkpoint
from shared.sam_models import build_sam
from shared.storage import CacheLock, CacheLockedError, parse_location
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage1_embed.synthetic import make_synthetic_voc


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    defaults = dict(model_type="vit_tiny_random", checkpoint=str(checkpoint), download=False)
    return EmbedConfig(images=str(images), out=str(out), **{**defaults, **kw})


@pytest.fixture(scope="module")
def voc_cache(tmp_path_factory, voc_sample_dir, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("voc") / "cache.zarr"
    config = _config(
        voc_sample_dir / "JPEGImages", out, tiny_checkpoint, precision="fp32", dtype="float32"
    )
    summary = run_embed(config)
    assert summary.encoded == 5 and not summary.failed
    return out


def test_layout_and_attributes(voc_cache: Path, tiny_checkpoint: Path) -> None:
    meta = json.loads((voc_cache / "zarr.json").read_text())
    attrs = meta["attributes"]["samcache"]
    assert attrs["format"] == "samcache-embeddings" and attrs["format_version"] == 2
    assert attrs["model_type"] == "vit_tiny_random"
    import hashlib

    assert attrs["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert attrs["preprocessing"]["pixel_mean"] == [123.675, 116.28, 103.53]
    array_meta = json.loads((voc_cache / "embeddings" / "zarr.json").read_text())
    assert array_meta["shape"] == [5, 256, 64, 64]
    assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 256, 64, 64]
    assert array_meta["data_type"] == "float32"
    assert [c["name"] for c in array_meta["codecs"]] == ["bytes"]  # no compressor
    table = pq.read_table(voc_cache / "manifest")
    for column in [
        "image_id",
        "row",
        "path",
        "sha256",
        "original_height",
        "original_width",
        "input_height",
        "input_width",
        "status",
        "error",
        "split",
        "n_objects",
    ]:
        assert column in table.column_names


def test_manifest_matches_voc_masks(voc_cache: Path, voc_sample_dir: Path) -> None:
    rows = read_manifest(parse_location(voc_cache)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["000032", "000033", "000039", "000068", "009436"]
    assert sorted(r["row"] for r in rows) == [0, 1, 2, 3, 4]
    for r in rows:
        mask = np.array(Image.open(voc_sample_dir / "SegmentationObject" / f"{r['image_id']}.png"))
        ids = set(np.unique(mask).tolist()) - {0, 255}
        assert r["status"] == "ok" and r["n_objects"] == len(ids)
        assert {o["instance_id"] for o in r["objects"]} == ids
        assert (r["original_height"], r["original_width"]) == mask.shape
        assert max(r["input_height"], r["input_width"]) == 1024
        assert r["ignore_rle"] is not None  # VOC void borders are kept as ignore regions
        assert r["split"] in {"train", "val", "test"}


def test_embedding_equals_meta_predictor(voc_cache: Path, voc_sample_dir, tiny_checkpoint) -> None:
    from tests.meta_reference import meta_predictor_class

    sam = build_sam("vit_tiny_random", tiny_checkpoint).eval()
    predictor = meta_predictor_class()(sam)
    cache = open_cache(voc_cache)
    rows = {r["image_id"]: r["row"] for r in read_manifest(cache.location).to_pylist()}
    for image_id in ["000032", "009436"]:
        rgb = np.array(Image.open(voc_sample_dir / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        predictor.set_image(rgb)
        expected = predictor.get_image_embedding()[0].numpy()
        got = cache.embeddings[rows[image_id]]
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_rerun_encodes_nothing_and_never_loads_model(
    voc_cache, voc_sample_dir, tiny_checkpoint, monkeypatch
) -> None:
    import shared.sam_models

    def refuse(*_a, **_k):
        raise AssertionError("the model must not be loaded on a rerun")

    monkeypatch.setattr(shared.sam_models, "build_image_encoder", refuse)
    before = read_manifest_all(parse_location(voc_cache)).num_rows
    config = _config(
        voc_sample_dir / "JPEGImages", voc_cache, tiny_checkpoint, precision="fp32", dtype="float32"
    )
    summary = run_embed(config)
    assert (summary.encoded, summary.cached_before, summary.model_loaded) == (0, 5, False)
    assert read_manifest_all(parse_location(voc_cache)).num_rows == before


def test_changed_image_is_reencoded(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images = tmp_path / "images"
    shutil.copytree(voc_sample_dir / "JPEGImages", images)
    out = tmp_path / "c.zarr"
    run_embed(_config(images, out, tiny_checkpoint))
    first = {r["image_id"]: r for r in read_manifest(parse_location(out)).to_pylist()}
    Image.open(images / "000033.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        images / "000033.jpg"
    )
    summary = run_embed(_config(images, out, tiny_checkpoint))
    assert (summary.encoded, summary.cached_before) == (1, 4)
    second = {r["image_id"]: r for r in read_manifest(parse_location(out)).to_pylist()}
    assert second["000033"]["sha256"] != first["000033"]["sha256"]
    assert second["000033"]["row"] == 5  # a new row; the old one is never read again
    assert {k: v["row"] for k, v in second.items() if k != "000033"} == {
        k: v["row"] for k, v in first.items() if k != "000033"
    }


def test_other_checkpoint_is_refused_naming_both(voc_cache, voc_sample_dir, tmp_path) -> None:
    other = make_random_checkpoint("vit_tiny_random", tmp_path / "other.pth", seed=1)
    with pytest.raises(CacheMismatchError) as info:
        run_embed(_config(voc_sample_dir / "JPEGImages", voc_cache, other))
    message = str(info.value)
    assert "other.pth" in message and "samcache_vit_tiny_random_seed0.pth" in message


def test_second_writer_is_refused(voc_cache, voc_sample_dir, tiny_checkpoint) -> None:
    with CacheLock(parse_location(voc_cache), "embed.lock"):
        with pytest.raises(CacheLockedError, match="another `embed run`"):
            run_embed(_config(voc_sample_dir / "JPEGImages", voc_cache, tiny_checkpoint))


def _write_bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """Files that must fail, with a word their reason must contain."""
    folder.mkdir()
    shutil.copy(good, folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notanimage.png").write_text("hello, I am text")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "onepixel.png")
    return {"empty": "empty", "truncated": "truncat", "notanimage": "not", "onepixel": "1×1"}


def test_bad_inputs_fail_with_reasons_and_valid_images_are_cached(
    tmp_path, voc_sample_dir, tiny_checkpoint
) -> None:
    expected = _write_bad_inputs(tmp_path / "imgs", voc_sample_dir / "JPEGImages" / "000032.jpg")
    out = tmp_path / "bad.zarr"
    summary = run_embed(_config(tmp_path / "imgs", out, tiny_checkpoint))
    reasons = dict(summary.failed)
    assert summary.encoded == 1 and set(reasons) == set(expected)
    for image_id, word in expected.items():
        assert word.lower() in reasons[image_id].lower(), reasons[image_id]
    rows = {r["image_id"]: r for r in read_manifest(parse_location(out)).to_pylist()}
    assert rows["good"]["status"] == "ok" and rows["empty"]["row"] == -1
    # failed images are retried by the next run (the failure may have been transient)
    again = run_embed(_config(tmp_path / "imgs", out, tiny_checkpoint))
    assert again.cached_before == 1 and len(again.failed) == 4


def test_mask_problems(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    src = voc_sample_dir / "JPEGImages" / "000032.jpg"
    width, height = Image.open(src).size
    for name in ["wrong_size", "no_object", "only_void"]:
        shutil.copy(src, images / f"{name}.jpg")
    Image.fromarray(np.zeros((height // 2, width), np.uint8)).save(masks / "wrong_size.png")
    Image.fromarray(np.zeros((height, width), np.uint8)).save(masks / "no_object.png")
    void = np.zeros((height, width), np.uint8)
    void[10:20, 10:20] = 255
    Image.fromarray(void).save(masks / "only_void.png")
    # instance maps: 255 is void (with --mask-kind auto, a {0, 255} mask is a binary object)
    config = _config(
        images, tmp_path / "m.zarr", tiny_checkpoint, masks=str(masks), mask_kind="instance"
    )
    summary = run_embed(config)
    assert [image_id for image_id, _ in summary.failed] == ["wrong_size"]
    assert "wrong_size.png" in summary.failed[0][1]
    rows = {
        r["image_id"]: r for r in read_manifest(parse_location(tmp_path / "m.zarr")).to_pylist()
    }
    for name in ["no_object", "only_void"]:
        assert rows[name]["status"] == "ok" and rows[name]["n_objects"] == 0
        assert rows[name]["has_masks"]


@pytest.mark.slow
def test_dask_workers_give_the_same_cache(tmp_path, tiny_checkpoint) -> None:
    voc = make_synthetic_voc(tmp_path / "data", n_images=6, seed=3)
    single = _config(voc / "JPEGImages", tmp_path / "one.zarr", tiny_checkpoint, precision="fp32")
    double = _config(
        voc / "JPEGImages", tmp_path / "two.zarr", tiny_checkpoint, precision="fp32", workers=2
    )
    assert run_embed(single).encoded == 6
    assert run_embed(double).encoded == 6
    a, b = open_cache(tmp_path / "one.zarr"), open_cache(tmp_path / "two.zarr")
    rows_a = {r["image_id"]: r["row"] for r in read_manifest(a.location).to_pylist()}
    rows_b = {r["image_id"]: r["row"] for r in read_manifest(b.location).to_pylist()}
    assert rows_a.keys() == rows_b.keys()
    for image_id in rows_a:
        np.testing.assert_array_equal(
            a.embeddings[rows_a[image_id]], b.embeddings[rows_b[image_id]]
        )


def test_edited_mask_is_relabelled_not_encoded(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    voc = tmp_path / "VOC2007"
    shutil.copytree(voc_sample_dir, voc)
    out = tmp_path / "c.zarr"
    run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    mask_path = voc / "SegmentationObject" / "000039.png"
    mask = Image.open(mask_path)
    pixels = np.array(mask)
    pixels[pixels == 1] = 0  # the annotator removed instance 1
    edited = Image.fromarray(pixels, mode="P")
    edited.putpalette(mask.getpalette())
    edited.save(mask_path)
    summary = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    assert (summary.encoded, summary.relabelled, summary.cached_before) == (0, 1, 4)
    row = next(
        r for r in read_manifest(parse_location(out)).to_pylist() if r["image_id"] == "000039"
    )
    assert 1 not in {o["instance_id"] for o in row["objects"]}

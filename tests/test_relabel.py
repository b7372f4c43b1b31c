"""Labels change, embeddings stay: relabelling never runs the encoder nor allocates a row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from shared.cache_io import open_cache, read_manifest, read_manifest_all
from shared.storage import parse_location
from stage1_embed.cli import app
from stage1_embed.config import ConfigError, EmbedConfig, LabelsConfig
from stage1_embed.pipeline import run_embed
from stage1_embed.relabel import run_labels
from tests.test_cache_versions import V1_COLUMNS_DROPPED


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    defaults = dict(model_type="vit_tiny_random", checkpoint=str(checkpoint), download=False)
    return EmbedConfig(images=str(images), out=str(out), **{**defaults, **kw})


@pytest.fixture()
def encoded(tmp_path, voc_sample_dir, tiny_checkpoint) -> tuple[Path, Path]:
    """A copy of the VOC sample and its cache (5 images encoded)."""
    voc = tmp_path / "VOC2007"
    shutil.copytree(voc_sample_dir, voc)
    out = tmp_path / "c.zarr"
    assert run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint)).encoded == 5
    return voc, out


@pytest.fixture()
def no_encoder(monkeypatch):
    """A spy: loading the image encoder fails the test."""
    import shared.sam_models

    def refuse(*_a, **_k):
        raise AssertionError("the image encoder must not be loaded for a label edit")

    monkeypatch.setattr(shared.sam_models, "build_image_encoder", refuse)


def _remove_instance(mask_path: Path, instance: int) -> None:
    mask = Image.open(mask_path)
    pixels = np.array(mask)
    assert (pixels == instance).any()
    pixels[pixels == instance] = 0
    edited = Image.fromarray(pixels, mode="P")
    edited.putpalette(mask.getpalette())
    edited.save(mask_path)


def _embeddings(out: Path) -> dict[str, bytes]:
    cache = open_cache(out)
    rows = read_manifest(cache.location, ["image_id", "row"]).to_pylist()
    return {r["image_id"]: cache.embeddings[r["row"]].tobytes() for r in rows}


def _winner(out: Path, image_id: str) -> dict:
    rows = read_manifest(parse_location(out)).to_pylist()
    return next(r for r in rows if r["image_id"] == image_id)


def test_mask_edit_encodes_nothing_and_allocates_no_row(
    encoded, tiny_checkpoint, no_encoder
) -> None:
    voc, out = encoded
    before_bytes = _embeddings(out)
    before = _winner(out, "000032")
    _remove_instance(voc / "SegmentationObject" / "000032.png", 1)
    summary = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    assert (summary.cached_before, summary.relabelled, summary.encoded) == (4, 1, 0)
    assert not summary.model_loaded
    after = _winner(out, "000032")
    assert after["row"] == before["row"] and after["sha256"] == before["sha256"]
    assert after["annotation_sha256"] != before["annotation_sha256"]
    assert {o["instance_id"] for o in before["objects"]} - {
        o["instance_id"] for o in after["objects"]
    } == {1}
    assert open_cache(out).embeddings.shape[0] == 5  # no row allocated
    assert _embeddings(out) == before_bytes  # every image's embedding bytes unchanged
    again = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    assert (again.cached_before, again.relabelled, again.encoded) == (5, 0, 0)


def test_identical_bytes_share_one_row(encoded, tiny_checkpoint, no_encoder) -> None:
    voc, out = encoded
    jpegs = voc / "JPEGImages"
    shutil.copy(jpegs / "000033.jpg", jpegs / "copy_of_33.jpg")
    summary = run_embed(_config(jpegs, out, tiny_checkpoint))
    assert (summary.relabelled, summary.encoded) == (1, 0)
    assert _winner(out, "copy_of_33")["row"] == _winner(out, "000033")["row"]
    assert open_cache(out).embeddings.shape[0] == 5


def test_identical_new_images_are_encoded_once(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(voc_sample_dir / "JPEGImages" / "000032.jpg", images / f"{name}.jpg")
    summary = run_embed(_config(images, tmp_path / "c.zarr", tiny_checkpoint))
    assert (summary.encoded, summary.relabelled) == (1, 2)
    rows = {r["image_id"]: r["row"] for r in read_manifest(parse_location(tmp_path / "c.zarr"))
            .select(["image_id", "row"]).to_pylist()}  # fmt: skip
    assert rows == {"a": 0, "b": 0, "c": 0}


def test_labels_with_the_image_folder_gone(encoded, no_encoder) -> None:
    voc, out = encoded
    before_bytes = _embeddings(out)
    shutil.rmtree(voc / "JPEGImages")
    _remove_instance(voc / "SegmentationObject" / "000032.png", 1)
    summary = run_labels(LabelsConfig(cache=str(out), voc=str(voc)))
    assert (summary.cached, summary.named, summary.relabelled, summary.unchanged) == (5, 5, 1, 4)
    assert not summary.failed
    assert 1 not in {o["instance_id"] for o in _winner(out, "000032")["objects"]}
    assert _winner(out, "000032")["split"] is not None
    assert _embeddings(out) == before_bytes and open_cache(out).embeddings.shape[0] == 5
    assert run_labels(LabelsConfig(cache=str(out), voc=str(voc))).relabelled == 0


def test_labels_from_masks_and_coco_keep_what_they_do_not_name(encoded, tmp_path) -> None:
    voc, out = encoded
    shutil.rmtree(voc / "JPEGImages")
    split_before = _winner(out, "000068")["split"]
    height, width = (
        _winner(out, "000068")["original_height"],
        _winner(out, "000068")["original_width"],
    )
    masks = tmp_path / "masks"
    masks.mkdir()
    square = np.zeros((height, width), np.uint8)
    square[10:60, 20:90] = 255
    Image.fromarray(square).save(masks / "000068.png")
    summary = run_labels(LabelsConfig(cache=str(out), masks=str(masks)))
    assert (summary.named, summary.relabelled) == (1, 1)
    row = _winner(out, "000068")
    assert row["source"] == "masks" and row["n_objects"] == 1 and row["objects"][0]["area"] == 3500
    assert split_before is not None and row["split"] == split_before  # the VOC split is kept
    untouched = _winner(out, "000032")
    assert untouched["source"] == "voc"

    rle = mask_utils.encode(np.asfortranarray((square > 0).astype(np.uint8)))
    coco = {
        "images": [{"id": 7, "file_name": "000068.jpg", "height": height, "width": width}],
        "annotations": [
            {"id": 70, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}},
            {"id": 71, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": [[100.0, 100.0, 140.0, 100.0, 140.0, 150.0]]},
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = run_labels(LabelsConfig(cache=str(out), coco=str(tmp_path / "coco.json")))
    assert (summary.named, summary.relabelled) == (1, 1)
    row = _winner(out, "000068")
    assert row["source"] == "coco" and {o["instance_id"] for o in row["objects"]} == {70, 71}


def test_a_relabel_whose_mask_does_not_fit_keeps_its_row(
    encoded, tmp_path, tiny_checkpoint, no_encoder
) -> None:
    voc, out = encoded
    row = _winner(out, "000032")["row"]
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(masks / "000032.png")
    summary = run_labels(LabelsConfig(cache=str(out), masks=str(masks)))
    assert [image_id for image_id, _ in summary.failed] == ["000032"]
    assert "000032.png is 9×7 px" in summary.failed[0][1]
    failed = _winner(out, "000032")
    assert failed["status"] == "failed" and failed["row"] == row
    shutil.rmtree(masks)
    run = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    assert (run.relabelled, run.encoded) == (1, 0)  # fixed by the next run, without encoding
    assert _winner(out, "000032")["status"] == "ok"


def test_version_1_cache_is_upgraded_and_relabelled(encoded, tiny_checkpoint, no_encoder) -> None:
    voc, out = encoded
    import pyarrow.parquet as pq

    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["samcache"]["format_version"] = 1
    (out / "zarr.json").write_text(json.dumps(meta))
    for fragment in (out / "manifest").glob("part-*.parquet"):
        pq.write_table(pq.read_table(fragment).drop_columns(list(V1_COLUMNS_DROPPED)), fragment)
    _remove_instance(voc / "SegmentationObject" / "000032.png", 1)
    summary = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint))
    assert (summary.relabelled, summary.encoded) == (1, 0)
    assert open_cache(out).attrs.format_version == 2
    assert _winner(out, "000032")["exif_orientation"] == 1  # read from the header for v1 rows


def test_labels_cli(encoded) -> None:
    voc, out = encoded
    _remove_instance(voc / "SegmentationObject" / "000032.png", 1)
    result = CliRunner().invoke(app, ["labels", "--cache", str(out), "--voc", str(voc)])
    assert result.exit_code == 0, result.output
    assert "1 relabelled, 4 unchanged, 0 failed, 0 encoded" in result.output
    result = CliRunner().invoke(app, ["labels", "--cache", str(out)])
    assert result.exit_code == 2 and "exactly one of --masks" in result.output
    with pytest.raises(ConfigError):
        LabelsConfig(cache="c", masks="m", coco="c.json")
    history = read_manifest_all(parse_location(out), ["image_id"]).num_rows
    assert history == 6

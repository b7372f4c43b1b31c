"""One bad input never stops a run: odd images and names, hostile COCO polygons, mask bombs,
hostile prompts and detections files, and one pixel limit for every command."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.cache_format import CacheAttrs
from shared.cache_io import read_manifest
from shared.storage import parse_location
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage1_embed.sources import plan_sources
from stage1_embed.work import WorkItem, prepare
from stage2_decoder.prompt_files import (
    ImageIds,
    PromptFileError,
    parse_detections_file,
    parse_prompts_file,
)
from stage2_decoder.visualize import read_image_rgb

LATIN1_NAME = os.fsdecode(b"caf\xe9.png")  # a Latin-1 byte: not valid UTF-8


def _image(path: Path | str, height: int, width: int, value: int = 128) -> None:
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


def _bad_folder(folder: Path) -> None:
    folder.mkdir()
    _image(folder / "a_ok.png", 40, 30, 10)
    _image(folder / "b_thin.png", 2, 20000)  # 2×20000: 0 px high at 1024
    _image(os.path.join(os.fsencode(folder), os.fsencode(LATIN1_NAME)), 40, 30, 20)
    _image(folder / "d_ok.png", 30, 40, 30)
    _image(folder / "e_ok.png", 32, 32, 40)


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    defaults = dict(model_type="vit_tiny_random", checkpoint=str(checkpoint), download=False,
                    precision="fp32")  # fmt: skip
    return EmbedConfig(images=str(images), out=str(out), **{**defaults, **kw})


def _check_bad_folder_run(out: Path, summary) -> None:  # noqa: ANN001 - RunSummary
    failed = dict(summary.failed)
    assert summary.encoded == 3 and len(failed) == 2, summary.failed
    assert "short side would be 0 px" in failed["b_thin"]
    assert "not valid UTF-8" in failed["caf\\xe9"]
    rows = {r["image_id"]: r["status"] for r in read_manifest(parse_location(out)).to_pylist()}
    assert rows == {"a_ok": "ok", "b_thin": "failed", "caf\\xe9": "failed", "d_ok": "ok",
                    "e_ok": "ok"}  # fmt: skip


def test_thin_image_and_non_utf8_name_fail_alone(tmp_path, tiny_checkpoint) -> None:
    _bad_folder(tmp_path / "imgs")
    out = tmp_path / "c.zarr"
    _check_bad_folder_run(out, run_embed(_config(tmp_path / "imgs", out, tiny_checkpoint)))


@pytest.mark.slow
def test_thin_image_and_non_utf8_name_fail_alone_on_dask(tmp_path, tiny_checkpoint) -> None:
    _bad_folder(tmp_path / "imgs")
    out = tmp_path / "c.zarr"
    config = _config(tmp_path / "imgs", out, tiny_checkpoint, workers=2)
    _check_bad_folder_run(out, run_embed(config))


def _coco(tmp_path: Path, polygons: list) -> Path:
    _image(tmp_path / "img.png", 30, 40)
    anns = [{"id": k + 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [p]}
            for k, p in enumerate(polygons)]  # fmt: skip
    data = {"images": [{"id": 9, "file_name": "img.png", "height": 30, "width": 40}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(data))  # NaN is written as NaN
    return tmp_path / "instances.json"


def test_hostile_coco_polygons_are_skipped_with_a_reason(tmp_path) -> None:
    """Huge coordinates crashed pycocotools (SIGSEGV), NaN ones grew memory without bound: they
    must never reach it. (Not run against the old code: it would kill the test process.)"""
    good = [2, 2, 12, 2, 12, 20, 2, 20]
    path = _coco(tmp_path, [good, [0, 0, 2e9, 0, 2e9, 2e9], [1, 1, float("nan"), 5, 9, 9]])
    (source,) = plan_sources(tmp_path, coco_json=path)
    prepared = prepare(WorkItem(source, 0), max_pixels=10**6)
    assert prepared.error is None
    assert [o["instance_id"] for o in prepared.annotations.objects] == [1]
    notes = prepared.annotations.notes
    assert len(notes) == 2 and "annotation 2" in notes[0] and "far outside" in notes[0]
    assert "annotation 3" in notes[1] and "not a finite number" in notes[1]


def _png_header_only(path: Path, width: int, height: int, mode_byte: int = 0) -> None:
    """A PNG whose header says width×height (8-bit gray) but holds almost no data: what a
    30000×30000 mask of 854 KiB looks like to anything that decodes it whole."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


def test_mask_bomb_is_refused_from_its_header(tmp_path, monkeypatch) -> None:
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    _image(images / "a.png", 30, 40)
    _png_header_only(masks / "a.png", 30000, 30000)
    (source,) = plan_sources(images, masks_dir=masks)
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda im: loads.append(im.size) or None)
    prepared = prepare(WorkItem(source, 0), max_pixels=500_000_000)  # the default limit
    assert "mask a.png is 30000×30000 px, image is 40×30 px" in (prepared.error or "")
    assert (30000, 30000) not in loads  # the mask's pixels were never decoded


def _ids() -> ImageIds:
    return ImageIds(["img1", "img2"])


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"img1": [{"points": [[1' + "0" * 5000 + ", 2]]}]}", "cannot be read as JSON"),
        ('{"img1": [{"points": [[1e400, 2]]}]}', "finite"),
        ('{"img1": [{"points": [[100000000000000000000000, 2]]}]}', "within"),
        ('{"img1": ' + "[" * 100000 + "]" * 100000 + "}", "too deeply"),
    ],
)
def test_hostile_prompts_give_one_line(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=needle) as raised:
        parse_prompts_file(path, _ids())
    assert "\n" not in str(raised.value)


def test_too_many_points_in_one_prompt_are_refused(tmp_path) -> None:
    path = tmp_path / "prompts.json"
    points = [[float(k % 40), 3.0] for k in range(20000)]
    path.write_text(json.dumps({"img1": [{"points": points}]}))
    with pytest.raises(PromptFileError, match="20000 points in one prompt; at most 100"):
        parse_prompts_file(path, _ids())


def test_detections_with_nan_scores_are_named_and_skipped(tmp_path) -> None:
    path = tmp_path / "dets.json"
    dets = [
        {"image_id": "img1", "bbox": [1, 2, 10, 10], "score": float("nan"), "category_id": 1},
        {"image_id": "img1", "bbox": [1, 2, 10, 10], "score": 0.9, "category_id": 1},
        {"image_id": "img2", "bbox": [1, float("inf"), 10, 10], "score": 0.8},
    ]
    path.write_text(json.dumps([dets[0]]))
    with pytest.raises(PromptFileError, match="all 1 detections are unusable"):
        parse_detections_file(path, _ids())  # was: "0 masks for 0 images", exit 0
    path.write_text(json.dumps(dets))
    skipped: list[str] = []
    found = parse_detections_file(path, _ids(), skipped=skipped)
    assert sum(len(v) for v in found.values()) == 1 and found["img1"][0].score == 0.9
    assert skipped[0].startswith("detection 0: score nan") and skipped[1].startswith("detection 2")


def test_one_pixel_limit_for_drawing_cached_images(tmp_path, monkeypatch) -> None:
    """An image `embed run` accepted under its --max-pixels is drawn by predict / amg too (PIL's
    own default limit refused a 196-megapixel image; here PIL's default is lowered to show it)."""
    path = tmp_path / "big.png"
    _image(path, 600, 500)  # 300k px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 300k > 2 × 100k: a bomb for PIL
    image, note = read_image_rgb(str(path), (600, 500))  # default: embed run's default limit
    assert note == "" and image.shape == (600, 500, 3)
    attrs = CacheAttrs("vit_b", "0" * 64, "x.pth", embed_config={"max_pixels": 400_000})
    image, note = read_image_rgb(str(path), (600, 500), attrs.max_pixels)
    assert note == "" and image.shape == (600, 500, 3) and int(image[0, 0, 0]) == 128
    image, note = read_image_rgb(str(path), (600, 500), 200_000)
    assert note == "image file is over the pixel limit"
    assert CacheAttrs("vit_b", "0" * 64, "x.pth").max_pixels == 500_000_000

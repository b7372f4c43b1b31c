"""load_annotations: VOC instances/void/classes, --masks kinds, COCO, sizes and EXIF frames."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from shared.transforms import preprocess_shape
from stage1_embed.annotations import (
    VOC_CLASSES,
    VOC_PALETTE,
    AnnotationError,
    load_annotations,
)
from stage1_embed.images import LoadedImage, orient_array, read_image
from stage1_embed.sources import ImageSource, plan_sources

VOC = Path(__file__).resolve().parent / "data/voc2007_sample/VOCdevkit/VOC2007"
needs_voc = pytest.mark.usefixtures("voc_sample_dir")  # ships in tests/data: never skipped


def _decode(counts: str, size) -> np.ndarray:
    return mask_utils.decode({"size": list(size), "counts": counts.encode()}).astype(bool)


def _reference_target(mask: np.ndarray, input_size) -> np.ndarray:
    """An independent (torch) version of the cache_layout.md target-frame rule."""
    h, w = input_size
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, 1024 - w, 0, 1024 - h))
    return (F.avg_pool2d(x, 4)[0, 0] >= 0.5).numpy()


def _annotate(source: ImageSource):
    loaded = read_image(source.path)
    return loaded, load_annotations(source, loaded, preprocess_shape(loaded.original_size))


def _loaded(h: int, w: int, *, orientation: int = 1) -> LoadedImage:
    raw = (w, h) if orientation >= 5 else (h, w)
    return LoadedImage(
        rgb=np.zeros((h, w, 3), np.uint8),
        sha256="0" * 64,
        original_size=(h, w),
        exif_transposed=orientation != 1,
        raw_size=raw,
        exif_orientation=orientation,
    )


def _mask_source(path: Path, kind: str = "auto") -> ImageSource:
    return ImageSource("m", path.with_suffix(".jpg"), "masks", mask_path=path, mask_kind=kind)


def _write_mask(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path)
    return path


@needs_voc
def test_voc_sample_objects_void_and_classes():
    for source in plan_sources(VOC / "JPEGImages"):
        loaded, ann = _annotate(source)
        objects = np.asarray(Image.open(source.mask_path))
        classes = np.asarray(Image.open(source.class_mask_path))
        ids = [v for v in np.unique(objects) if 0 < v < 255]
        assert ann.has_masks and [o["instance_id"] for o in ann.objects] == ids
        xml = (VOC / "Annotations" / f"{source.image_id}.xml").read_text()
        names = re.findall(r"<object>\s*<name>(\w+)</name>", xml)
        assert [o["category"] for o in ann.objects] == names  # VOC: instance k = k-th object
        for obj in ann.objects:
            inside = objects == obj["instance_id"]
            values, counts = np.unique(classes[inside], return_counts=True)
            assert obj["category_id"] == values[counts.argmax()]
            assert VOC_CLASSES[obj["category_id"] - 1] == obj["category"]
            np.testing.assert_array_equal(_decode(obj["rle"], loaded.original_size), inside)
            assert obj["area"] == inside.sum()
            ys, xs = np.nonzero(inside)
            assert obj["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        void = _decode(ann.ignore_rle, loaded.original_size)
        np.testing.assert_array_equal(void, objects == 255)
        assert void.sum() > 0


@needs_voc
def test_voc_target_frame_matches_reference():
    source = plan_sources(VOC / "JPEGImages")[0]
    loaded, ann = _annotate(source)
    input_size = preprocess_shape(loaded.original_size)
    objects = np.asarray(Image.open(source.mask_path))
    valid_h, valid_w = -(-input_size[0] // 4), -(-input_size[1] // 4)
    for obj in ann.objects:
        target = _decode(obj["target_rle"], (256, 256))
        reference = _reference_target(objects == obj["instance_id"], input_size)
        assert (target != reference).sum() <= 2  # float rounding at the 0.5 threshold only
        assert not target[valid_h:].any() and not target[:, valid_w:].any()
    ignore_target = _decode(ann.ignore_target_rle, (256, 256))
    assert (ignore_target != _reference_target(objects == 255, input_size)).sum() <= 4


@needs_voc
def test_voc_palette_is_the_real_one():
    assert Image.open(VOC / "SegmentationObject" / "000032.png").getpalette() == list(VOC_PALETTE)


@needs_voc
def test_voc_mask_saved_as_rgb_colours(tmp_path):
    source = plan_sources(VOC / "JPEGImages")[0]
    rgb_mask = tmp_path / "obj.png"
    Image.open(source.mask_path).convert("RGB").save(rgb_mask)
    _, expected = _annotate(source)
    _, got = _annotate(replace(source, mask_path=rgb_mask))
    assert got == expected


def test_mask_of_another_size_fails(tmp_path):
    mask = _write_mask(tmp_path / "000032.png", np.zeros((300, 500), np.uint8))
    with pytest.raises(AnnotationError, match=r"^mask 000032.png is 500×300 px, image is 500×375"):
        load_annotations(_mask_source(mask), _loaded(375, 500), (768, 1024))


def test_mask_in_raw_frame_of_exif_rotated_image_is_transposed(tmp_path):
    raw = np.zeros((30, 40), np.uint8)  # drawn on the stored (landscape) pixels
    raw[2:10, 5:25] = 1
    raw[20:28, 30:38] = 2
    mask = _write_mask(tmp_path / "r.png", raw)
    loaded = _loaded(40, 30, orientation=6)  # displayed portrait
    ann = load_annotations(_mask_source(mask), loaded, preprocess_shape((40, 30)))
    upright = orient_array(raw, 6)
    for obj in ann.objects:
        got = _decode(obj["rle"], (40, 30))
        np.testing.assert_array_equal(got, upright == obj["instance_id"])
    displayed = _write_mask(tmp_path / "d.png", upright)  # already upright: used as is
    again = load_annotations(_mask_source(displayed), loaded, preprocess_shape((40, 30)))
    assert again == ann


def test_void_only_and_background_only_masks(tmp_path):
    void = np.zeros((20, 30), np.uint8)
    void[5:10, 5:10] = 255
    ann = load_annotations(_mask_source(_write_mask(tmp_path / "v.png", void), "instance"),
                           _loaded(20, 30), (683, 1024))  # fmt: skip
    assert ann.has_masks and ann.objects == [] and ann.ignore_rle is not None
    empty = _write_mask(tmp_path / "e.png", np.zeros((20, 30), np.uint8))
    ann = load_annotations(_mask_source(empty), _loaded(20, 30), (683, 1024))
    assert ann.has_masks and ann.objects == [] and ann.ignore_rle is None


@pytest.mark.parametrize(
    ("values", "kind", "n_objects", "has_void"),
    [
        ((0, 255), "auto", 1, False),
        ((0, 1), "auto", 1, False),
        ((0, 1, 2), "auto", 2, False),
        ((0, 1, 255), "auto", 1, True),
        ((0, 1, 2), "binary", 1, False),
        ((0, 255), "instance", 0, True),
        ((0, 3, 7, 9), "instance", 3, False),
    ],
)
def test_binary_vs_instance(tmp_path, values, kind, n_objects, has_void):
    mask = np.zeros((16, 24), np.uint8)
    for i, v in enumerate(values):
        mask[:, i * 4 : i * 4 + 4] = v
    src = _mask_source(_write_mask(tmp_path / "m.png", mask), kind)
    ann = load_annotations(src, _loaded(16, 24), (683, 1024))
    assert len(ann.objects) == n_objects and (ann.ignore_rle is not None) == has_void
    if kind == "binary" or (kind == "auto" and n_objects == 1 and not has_void):
        np.testing.assert_array_equal(_decode(ann.objects[0]["rle"], (16, 24)), mask != 0)


def test_16bit_instance_map_and_gray_rgb_mask(tmp_path):
    ids = np.arange(1, 301, dtype=np.uint16).repeat(4).reshape(30, 40)
    ids[0, 0] = 0
    src = _mask_source(_write_mask(tmp_path / "big.png", ids), "instance")
    ann = load_annotations(src, _loaded(30, 40), (768, 1024))
    assert len(ann.objects) == 299 and ann.ignore_rle is not None  # 255 is void
    gray = np.zeros((10, 12, 3), np.uint8)
    gray[2:5, 2:5] = 255
    src = _mask_source(_write_mask(tmp_path / "g.png", gray))
    assert len(load_annotations(src, _loaded(10, 12), (853, 1024)).objects) == 1
    colour = gray.copy()
    colour[0, 0] = (10, 20, 30)
    src = _mask_source(_write_mask(tmp_path / "c.png", colour))
    with pytest.raises(AnnotationError, match="RGB image; save masks as single-channel"):
        load_annotations(src, _loaded(10, 12), (853, 1024))


def test_unreadable_mask_and_no_mask(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(AnnotationError, match="mask bad.png cannot be read"):
        load_annotations(_mask_source(tmp_path / "bad.png"), _loaded(4, 4), (1024, 1024))
    with pytest.raises(AnnotationError, match="does not exist"):
        load_annotations(_mask_source(tmp_path / "gone.png"), _loaded(4, 4), (1024, 1024))
    plain = ImageSource("x", tmp_path / "x.jpg")
    ann = load_annotations(plain, _loaded(4, 4), (1024, 1024))
    assert not ann.has_masks and ann.objects == [] and ann.ignore_rle is None


def test_speck_keeps_original_rle_with_empty_target(tmp_path):
    mask = np.zeros((400, 600), np.uint8)
    mask[100, 100] = 1
    mask[200:300, 200:400] = 2
    ann = load_annotations(_mask_source(_write_mask(tmp_path / "s.png", mask), "instance"),
                           _loaded(400, 600), preprocess_shape((400, 600)))  # fmt: skip
    speck = ann.objects[0]
    assert speck["area"] == 1 and not _decode(speck["target_rle"], (256, 256)).any()
    assert _decode(ann.objects[1]["target_rle"], (256, 256)).sum() > 100


def _coco_case(tmp_path: Path) -> tuple[Path, Path]:
    _ = Image.new("RGB", (40, 30)).save(tmp_path / "img.jpg")
    square = np.zeros((30, 40), np.uint8)
    square[5:15, 20:30] = 1
    fortran = np.asfortranarray(square)
    compressed = mask_utils.encode(fortran)
    flat = square.flatten(order="F")  # uncompressed RLE: run lengths in column-major order
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [30, 40], "counts": ([0] if flat[0] else []) + runs}
    anns = [
        {"id": 1, "image_id": 9, "category_id": 3, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 20, 2, 20]]},
        {"id": 2, "image_id": 9, "category_id": 5, "iscrowd": 0, "segmentation": uncompressed},
        {"id": 3, "image_id": 9, "category_id": 5, "iscrowd": 1,
         "segmentation": {"size": [30, 40], "counts": compressed["counts"].decode()}},
        {"id": 4, "image_id": 9, "category_id": 3, "iscrowd": 0, "segmentation": []},
    ]  # fmt: skip
    data = {
        "images": [{"id": 9, "file_name": "img.jpg", "height": 30, "width": 40}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "box"}, {"id": 5, "name": "square"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path, tmp_path / "instances.json"


def test_coco_polygon_uncompressed_rle_and_crowd(tmp_path):
    images, path = _coco_case(tmp_path)
    (source,) = plan_sources(images, coco_json=path)
    loaded, ann = _annotate(source)
    coco = COCO(str(path))
    assert [o["instance_id"] for o in ann.objects] == [1, 2]  # crowd → ignore; empty → dropped
    assert [(o["category_id"], o["category"]) for o in ann.objects] == [(3, "box"), (5, "square")]
    for obj in ann.objects:
        expected = coco.annToMask(coco.anns[obj["instance_id"]]).astype(bool)
        np.testing.assert_array_equal(_decode(obj["rle"], (30, 40)), expected)
    assert ann.objects[1]["area"] == 100
    crowd = coco.annToMask(coco.anns[3]).astype(bool)
    np.testing.assert_array_equal(_decode(ann.ignore_rle, (30, 40)), crowd)


def test_coco_entry_of_another_size_fails(tmp_path):
    images, path = _coco_case(tmp_path)
    data = json.loads(path.read_text())
    data["images"][0]["height"] = 31
    path.write_text(json.dumps(data))
    (source,) = plan_sources(images, coco_json=path)
    with pytest.raises(AnnotationError, match=r"COCO entry img.jpg is 40×31 px, image is 40×30"):
        _annotate(source)


def test_voc_class_is_majority_ignoring_background_and_void(tmp_path):
    objects = np.zeros((10, 12), np.uint8)
    objects[2:8, 2:8] = 1
    objects[0, :] = 255
    classes = np.zeros((10, 12), np.uint8)
    classes[2:4, 2:8] = 7  # 12 px of class 7, 8 px of 15, the rest of the instance says 0
    classes[4:6, 2:6] = 15
    classes[0, :] = 255
    obj, cls = tmp_path / "o.png", tmp_path / "c.png"
    for path, values in ((obj, objects), (cls, classes)):
        im = Image.fromarray(values)
        im.putpalette(list(VOC_PALETTE))
        im.save(path)
    src = ImageSource("x", tmp_path / "x.jpg", "voc", mask_path=obj, class_mask_path=cls,
                      mask_kind="voc")  # fmt: skip
    (o,) = load_annotations(src, _loaded(10, 12), (853, 1024)).objects
    assert (o["category_id"], o["category"]) == (7, "car")
    no_class = load_annotations(replace(src, class_mask_path=None), _loaded(10, 12), (853, 1024))
    assert (no_class.objects[0]["category_id"], no_class.objects[0]["category"]) == (0, "")

"""The synthetic VOC generator: layout, determinism, content, and that our readers parse it."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.transforms import preprocess_shape
from stage1_embed.annotations import VOC_PALETTE, load_annotations
from stage1_embed.images import read_image
from stage1_embed.sources import plan_sources
from stage1_embed.synthetic import make_synthetic_folder, make_synthetic_voc

FAMILIES = np.array([(205, 45, 40), (45, 170, 60), (40, 75, 205), (225, 200, 45)])


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("syn"), n_images=24, seed=0)


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout(voc):
    assert voc.name == "VOC2007" and voc.parent.name == "VOCdevkit"
    ids = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    assert ids == [f"{i:06d}" for i in range(1, 25)]
    for folder in ("SegmentationObject", "SegmentationClass"):
        assert sorted(p.stem for p in (voc / folder).glob("*.png")) == ids
        im = Image.open(voc / folder / "000001.png")
        assert im.mode == "P" and im.getpalette() == list(VOC_PALETTE)
    seg = voc / "ImageSets" / "Segmentation"
    lists = {n: (seg / f"{n}.txt").read_bytes() for n in ("train", "val", "trainval")}
    assert all(not data.endswith(b"\n") for data in lists.values())
    train, val = set(lists["train"].split()), set(lists["val"].split())
    assert not train & val and sorted(train | val) == [i.encode() for i in ids]
    assert set(lists["trainval"].split()) == train | val and len(val) == 6
    assert not list(voc.rglob(".tmp-*"))


def test_masks_have_void_borders_classes_and_sizes(voc):
    areas, counts = [], []
    for path in sorted((voc / "SegmentationObject").glob("*.png")):
        objects = np.asarray(Image.open(path))
        classes = np.asarray(Image.open(voc / "SegmentationClass" / path.name))
        rgb = np.asarray(Image.open(voc / "JPEGImages" / f"{path.stem}.jpg"))
        np.testing.assert_array_equal(objects == 255, classes == 255)
        np.testing.assert_array_equal(objects == 0, classes == 0)
        ids = [v for v in np.unique(objects) if 0 < v < 255]
        assert ids == list(range(1, len(ids) + 1)) and 1 <= len(ids) <= 5
        counts.append(len(ids))
        assert (objects == 255).any()
        for a, b in ((objects[1:], objects[:-1]), (objects[:, 1:], objects[:, :-1])):
            # like VOC, void separates every two labels: no two different labels touch
            assert not ((a != b) & (a != 255) & (b != 255)).any()
        for k in ids:
            inside = objects == k
            assert len(np.unique(classes[inside])) == 1 and 1 <= classes[inside][0] <= 4
            mean = rgb[inside].mean(0)
            nearest = np.argmin(((FAMILIES - mean) ** 2).sum(1)) + 1
            assert nearest == classes[inside][0], (path.name, k, mean)
            areas.append(inside.sum() / inside.size)
    assert min(areas) < 0.01 and max(areas) > 0.15  # small to large
    assert max(counts) >= 4 and min(counts) <= 2


def test_occlusion_happens(voc):
    """Ellipses, rectangles, triangles are convex: one much smaller than its hull is occluded."""
    ratios = []
    for path in (voc / "SegmentationObject").glob("*.png"):
        objects = np.asarray(Image.open(path))
        classes = np.asarray(Image.open(voc / "SegmentationClass" / path.name))
        for k in [v for v in np.unique(objects) if 0 < v < 255]:
            inside = objects == k
            if classes[inside][0] in (1, 2, 3):  # ellipse, rectangle, triangle
                ys, xs = np.nonzero(inside)
                hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))
                ratios.append(inside.sum() / max(cv2.contourArea(hull), 1.0))
    assert np.median(ratios) > 0.9 and min(ratios) < 0.7 and sum(r < 0.85 for r in ratios) >= 3


def test_deterministic_for_a_seed(voc, tmp_path):
    again = make_synthetic_voc(tmp_path / "a", n_images=24, seed=0)
    assert _digests(again) == _digests(voc)
    other = make_synthetic_voc(tmp_path / "b", n_images=24, seed=1)
    same = set(_digests(other).items()) & set(_digests(voc).items())
    assert {name for name, _ in same} == {
        ".samcache-synthetic",
        "ImageSets/Segmentation/trainval.txt",
    }
    fewer = make_synthetic_voc(tmp_path / "c", n_images=3, seed=0)
    for name in ("JPEGImages/000002.jpg", "SegmentationObject/000003.png"):
        assert (fewer / name).read_bytes() == (voc / name).read_bytes()


def test_rewrites_its_own_folder_but_refuses_others(tmp_path):
    voc = make_synthetic_voc(tmp_path, n_images=4, seed=0)
    assert len(list((make_synthetic_voc(tmp_path, n_images=2) / "JPEGImages").iterdir())) == 2
    (voc / ".samcache-synthetic").unlink()
    with pytest.raises(ValueError, match="was not written by samcache"):
        make_synthetic_voc(tmp_path, n_images=2)


def test_parsed_by_our_sources_and_annotations(voc):
    sources = plan_sources(voc / "JPEGImages")
    assert len(sources) == 24 and {s.source for s in sources} == {"voc"}
    assert sum(s.split == "val" for s in sources) == 6
    assert all(s.splits in (("train", "trainval"), ("val", "trainval")) for s in sources)
    for s in sources[:8]:
        loaded = read_image(s.path)
        ann = load_annotations(s, loaded, preprocess_shape(loaded.original_size))
        objects = np.asarray(Image.open(s.mask_path))
        assert len(ann.objects) == len([v for v in np.unique(objects) if 0 < v < 255])
        assert {o["category_id"] for o in ann.objects} <= {1, 2, 3, 4}
        assert ann.ignore_rle is not None
        assert loaded.original_size in ((375, 500), (500, 375), (333, 500), (500, 333))


@pytest.mark.parametrize("kind", ["binary", "instance"])
def test_synthetic_folder_for_masks(tmp_path, kind):
    images, masks = make_synthetic_folder(tmp_path, n_images=4, seed=3, kind=kind)
    sources = plan_sources(images, masks_dir=masks)
    assert [s.image_id for s in sources] == ["000001", "000002", "000003", "000004"]
    n_objects = []
    for s in sources:
        values = np.unique(np.asarray(Image.open(s.mask_path)))
        loaded = read_image(s.path)
        ann = load_annotations(s, loaded, preprocess_shape(loaded.original_size))
        n_objects.append(len(ann.objects))
        if kind == "binary":
            assert set(values.tolist()) == {0, 255} and len(ann.objects) == 1
        else:
            assert len(ann.objects) == len(values) - 1 and ann.ignore_rle is None
    if kind == "instance":
        assert max(n_objects) >= 2  # read as instance maps, not as binary

"""Image discovery, VOC detection and splits, --masks and --coco planning."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_embed.sources import (
    ImageSource,
    SourceError,
    discover_images,
    plan_sources,
    read_voc_splits,
)

VOC = Path(__file__).resolve().parent / "data/voc2007_sample/VOCdevkit/VOC2007"
needs_voc = pytest.mark.usefixtures("voc_sample_dir")  # ships in tests/data: never skipped


def _img(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path, format="PNG")
    return path


def _tree(root: Path) -> Path:
    for name in ["a.jpg", "B.JPG", "c.Png", "sub/d.tiff", "sub/deeper/e.webp", "sub/a.bmp"]:
        _img(root / name)
    _img(root / ".hidden.jpg")
    _img(root / ".cache" / "f.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "readme.md").write_text("x")
    return root


def test_discover_recursive_sorted_ids(tmp_path):
    sources = discover_images(_tree(tmp_path / "imgs"))
    ids = [s.image_id for s in sources]
    assert ids == ["B", "a", "c", "sub/a", "sub/d", "sub/deeper/e"]
    assert all(s.path.is_absolute() and s.path.is_file() for s in sources)
    assert sources[3].path.name == "a.bmp" and sources[3].source == "folder"
    assert not any(s.has_masks for s in sources)


def test_discover_not_recursive(tmp_path):
    ids = [s.image_id for s in discover_images(_tree(tmp_path / "imgs"), recursive=False)]
    assert ids == ["B", "a", "c"]


def test_same_stem_two_extensions_is_an_error(tmp_path):
    _img(tmp_path / "x" / "photo.jpg")
    _img(tmp_path / "x" / "photo.PNG")
    _img(tmp_path / "x" / "other.png")
    with pytest.raises(SourceError, match=r"photo\.PNG and photo\.jpg|photo\.jpg and photo\.PNG"):
        discover_images(tmp_path / "x")


def test_symlinked_folder_followed_once(tmp_path):
    _img(tmp_path / "data" / "real" / "a.png")
    (tmp_path / "data" / "link").symlink_to(tmp_path / "data" / "real")
    (tmp_path / "data" / "real" / "loop").symlink_to(tmp_path / "data")  # a cycle
    ids = [s.image_id for s in discover_images(tmp_path / "data")]
    assert ids == ["link/a"] or ids == ["real/a"]


def test_missing_empty_and_file_images_dir(tmp_path):
    with pytest.raises(SourceError, match="does not exist; pass --images"):
        plan_sources(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="no images .* found in"):
        plan_sources(tmp_path / "empty")
    with pytest.raises(SourceError, match="is a file, not a folder"):
        plan_sources(tmp_path / "empty" / "readme.txt")


def test_masks_and_coco_together_refused(tmp_path):
    _img(tmp_path / "i" / "a.png")
    with pytest.raises(SourceError, match="either --masks or --coco"):
        plan_sources(tmp_path / "i", masks_dir=tmp_path, coco_json=tmp_path / "c.json")
    with pytest.raises(SourceError, match="--mask-kind 'semantic'"):
        plan_sources(tmp_path / "i", masks_dir=tmp_path, mask_kind="semantic")


@needs_voc
@pytest.mark.parametrize("given", ["JPEGImages", "."])
def test_voc_sample_detected_with_splits(given):
    sources = plan_sources(VOC / given)
    assert [s.image_id for s in sources] == sorted(p.stem for p in (VOC / "JPEGImages").iterdir())
    lists = {
        f.stem: set((VOC / "ImageSets/Segmentation" / f.name).read_text().split())
        for f in (VOC / "ImageSets/Segmentation").glob("*.txt")
    }
    for s in sources:
        assert s.source == "voc" and s.mask_kind == "voc" and s.has_masks
        assert s.mask_path == VOC / "SegmentationObject" / f"{s.image_id}.png"
        assert s.class_mask_path == VOC / "SegmentationClass" / f"{s.image_id}.png"
        assert set(s.splits) == {name for name, ids in lists.items() if s.image_id in ids}
        specific = [n for n in ("train", "val", "test") if s.image_id in lists.get(n, ())]
        assert s.split == (specific[0] if specific else None)
    by_id = {s.image_id: s for s in sources}
    assert by_id["000032"].split == "train" and by_id["000032"].splits == ("train", "trainval")
    assert by_id["000039"].split == "val"
    assert by_id["000068"].split == "test"


@needs_voc
def test_voc_without_masks_and_messy_split_files(tmp_path):
    voc = tmp_path / "VOC2007"
    shutil.copytree(VOC, voc)
    voc.chmod(0o755)
    for folder in voc.rglob("*"):
        folder.chmod(0o755 if folder.is_dir() else 0o644)
    (voc / "SegmentationObject" / "000033.png").unlink()
    seg = voc / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_bytes(b"000032\r\n\r\n   \n000033")  # CRLF, blanks, no final \n
    (seg / "val.txt").write_bytes(b"")
    (seg / "trainval.txt").write_bytes(b"000032\n000033\n000039\n")
    by_id = {s.image_id: s for s in plan_sources(voc / "JPEGImages")}
    assert not by_id["000033"].has_masks and by_id["000033"].mask_path is None
    assert by_id["000033"].splits == ("train", "trainval") and by_id["000033"].split == "train"
    assert by_id["000039"].splits == ("trainval",) and by_id["000039"].split is None
    assert read_voc_splits(seg)["000032"] == ("train", "trainval")


def test_masks_dir(tmp_path, caplog):
    images = tmp_path / "data"
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        _img(images / name)
    masks = images / "masks"  # inside the images folder: must not be taken as images
    _img(masks / "a.png")
    _img(masks / "sub" / "c.PNG")
    with caplog.at_level(logging.INFO, logger="stage1_embed.sources"):
        sources = plan_sources(images, masks_dir=masks, mask_kind="instance")
    assert [s.image_id for s in sources] == ["a", "b", "sub/c"]
    assert [s.has_masks for s in sources] == [True, False, True]
    assert sources[2].mask_path == masks / "sub" / "c.PNG"
    assert {s.source for s in sources} == {"masks"} and {s.mask_kind for s in sources} == {
        "instance"
    }
    assert "2 of 3 images have a mask" in caplog.text


def test_masks_dir_matching_nothing(tmp_path):
    _img(tmp_path / "i" / "a.jpg")
    _img(tmp_path / "m" / "zzz.png")
    with pytest.raises(SourceError, match=r"none of the 1 images has a mask .* <image_id>\.png"):
        plan_sources(tmp_path / "i", masks_dir=tmp_path / "m")
    with pytest.raises(SourceError, match="masks folder .* does not exist"):
        plan_sources(tmp_path / "i", masks_dir=tmp_path / "nope")


def _coco_json(path: Path, images: list[dict], anns: list[dict]) -> Path:
    cats = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_matching_by_file_name_then_basename(tmp_path, caplog):
    root = tmp_path / "imgs"
    for name in ("train/a.jpg", "other/b.jpg", "x/dup.jpg", "y/dup.jpg", "lonely.jpg"):
        _img(root / name)
    images = [
        {"id": 1, "file_name": "train/a.jpg", "height": 6, "width": 8},
        {"id": 2, "file_name": "b.jpg", "height": 6, "width": 8},
        {"id": 3, "file_name": "dup.jpg", "height": 6, "width": 8},
        {"id": 4, "file_name": "missing.jpg", "height": 6, "width": 8},
    ]
    poly = {"segmentation": [[1, 1, 5, 1, 5, 4]], "iscrowd": 0, "area": 6, "bbox": [1, 1, 4, 3]}
    anns = [
        {"id": 10, "image_id": 1, "category_id": 7, **poly},
        {"id": 11, "image_id": 1, "category_id": 1, **poly},
        {"id": 12, "image_id": 2, "category_id": 1, **poly},
    ]
    coco = _coco_json(tmp_path / "instances.json", images, anns)
    with caplog.at_level(logging.INFO, logger="stage1_embed.sources"):
        sources = plan_sources(root, coco_json=coco)
    by_id = {s.image_id: s for s in sources}
    assert {s.source for s in sources} == {"coco"}
    a, b = by_id["train/a"].coco, by_id["other/b"].coco
    assert a.matched_by == "file_name" and a.coco_image_id == 1
    assert [x["id"] for x in a.annotations] == [10, 11]
    assert a.categories == ((1, "cat"), (7, "dog"))
    assert b.matched_by == "basename" and [x["id"] for x in b.annotations] == [12]
    assert by_id["x/dup"].coco is None and by_id["y/dup"].coco is None  # ambiguous basename
    assert not by_id["lonely"].has_masks
    assert "1 images matched by file_name" in caplog.text and "1 by basename" in caplog.text
    restored = pickle.loads(pickle.dumps(sources))
    assert restored == sources and isinstance(restored[0], ImageSource)
    assert hash(restored[0]) == hash(sources[0])


def test_coco_errors(tmp_path):
    _img(tmp_path / "i" / "a.jpg")
    with pytest.raises(SourceError, match="does not exist; pass --coco"):
        plan_sources(tmp_path / "i", coco_json=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SourceError, match="bad.json is not a COCO instances file"):
        plan_sources(tmp_path / "i", coco_json=tmp_path / "bad.json")
    other = [{"id": 1, "file_name": "zzz.jpg", "height": 6, "width": 8}]
    coco = _coco_json(tmp_path / "c.json", other, [])
    with pytest.raises(SourceError, match=r"no image under .* matches a file_name .*'zzz.jpg'"):
        plan_sources(tmp_path / "i", coco_json=coco)


def test_sources_are_picklable_with_numpy_free_fields(tmp_path):
    _img(tmp_path / "i" / "a.jpg")
    src = plan_sources(tmp_path / "i")[0]
    assert pickle.loads(pickle.dumps(src)) == src
    assert not any(isinstance(v, np.ndarray) for v in vars(src).values())

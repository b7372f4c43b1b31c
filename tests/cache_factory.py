"""Build tiny synthetic caches directly with ``shared.cache_io`` (no encoder, no images).

Reusable by any test: ``make_cache(tmp_path / "cache.zarr", checkpoint)`` writes a cache whose
attributes name a real ``vit_tiny_random`` checkpoint file (its sha256), whose embeddings are
seeded random float16 and whose manifest rows carry real pycocotools RLEs: ellipse objects in the
original frame, their 256-frame targets made with ``shared.transforms.mask_to_target``, a void
ring around the first object (``ignore_rle`` / ``ignore_target_rle``) and, optionally, VOC-style
``split`` values. Everything is a pure function of ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from shared.cache_format import CacheAttrs
from shared.cache_io import (
    commit_fragment,
    create_cache,
    grow_embeddings,
    manifest_table,
    write_embedding,
)
from shared.hashing import file_sha256
from shared.storage import parse_location
from shared.transforms import mask_to_target, preprocess_shape


def rle_counts(mask: np.ndarray) -> str:
    """COCO compressed RLE counts of a bool mask, as stored in the manifest."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_object(
    mask: np.ndarray, input_size: tuple[int, int], instance_id: int = 1
) -> dict[str, Any]:
    """A manifest ``objects`` entry for a bool original-frame mask."""
    ys, xs = np.nonzero(mask)
    bbox = (
        [
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
        if len(xs)
        else [0.0, 0.0, 0.0, 0.0]
    )
    return {
        "instance_id": instance_id,
        "category_id": 1,
        "category": "blob",
        "bbox": bbox,
        "area": int(mask.sum()),
        "rle": rle_counts(mask),
        "target_rle": rle_counts(mask_to_target(mask, input_size)),
    }


def _image_row(
    rng: np.random.Generator, index: int, row: int, n_objects: int, split: str | None
) -> dict[str, Any]:
    height, width = int(rng.integers(40, 72)), int(rng.integers(40, 88))
    input_size = preprocess_shape((height, width))
    objects, void = [], np.zeros((height, width), dtype=bool)
    for k in range(n_objects):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        mask = ellipse(height, width, cy, cx, ry, rx)
        if k == 0:  # a VOC-like void ring around the first object
            void = ellipse(height, width, cy, cx, ry + 1.5, rx + 1.5) & ~mask
        objects.append(make_object(mask, input_size, instance_id=k + 1))
    return {
        "image_id": f"img{index:04d}", "row": row, "path": f"/synthetic/img{index:04d}.jpg",
        "sha256": f"{index:064x}", "original_height": height, "original_width": width,
        "input_height": input_size[0], "input_width": input_size[1], "status": "ok",
        "error": None, "split": split, "splits": [split] if split else [], "source": "voc",
        "has_masks": True, "n_objects": n_objects, "objects": objects,
        "ignore_rle": rle_counts(void),
        "ignore_target_rle": rle_counts(mask_to_target(void, input_size)), "precision": "fp32",
    }  # fmt: skip


def make_cache(
    path: str | Path,
    checkpoint: str | Path,
    *,
    n_images: int = 6,
    objects_per_image: int | Sequence[int] = 2,
    splits: Sequence[str | None] | None = None,
    with_masks: bool = True,
    seed: int = 0,
    model_type: str = "vit_tiny_random",
) -> Path:
    """Write a synthetic cache at ``path`` and return it.

    ``objects_per_image``: one count for all images or one per image. ``splits``: one ``split``
    value per image (e.g. ``["train", "train", "val"]``) or None. ``with_masks=False`` writes rows
    with ``has_masks = False`` and no objects (a cache made from a plain folder of images).
    """
    rng = np.random.default_rng(seed)
    counts = (
        [int(objects_per_image)] * n_images
        if isinstance(objects_per_image, int)
        else [int(c) for c in objects_per_image]
    )
    attrs = CacheAttrs(
        model_type=model_type,
        checkpoint_sha256=file_sha256(checkpoint),
        checkpoint_name=Path(checkpoint).name,
        checkpoint_path=str(Path(checkpoint).resolve()),
        dtype="float16",
    )
    location = parse_location(path)
    cache = create_cache(location, attrs)
    rows = grow_embeddings(cache, n_images)
    records = []
    for index, row in enumerate(rows):
        embedding = rng.standard_normal((256, 64, 64), dtype=np.float32) * 0.5
        checksum = write_embedding(cache.embeddings, row, embedding)
        split = splits[index] if splits is not None else None
        record = _image_row(rng, index, row, counts[index] if with_masks else 0, split)
        record["embedding_checksum"] = checksum
        if not with_masks:
            record.update(has_masks=False, ignore_rle=None, ignore_target_rle=None)
        records.append(record)
    if records:
        commit_fragment(location, manifest_table(records))
    return Path(path)

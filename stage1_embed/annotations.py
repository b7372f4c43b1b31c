"""Masks → the ``objects`` of a manifest row (RLE in the original and 256 target frames) + void.

Rules are cache_layout.md "Masks: what becomes an object":

- VOC: ``SegmentationObject`` value k in 1..254 is instance k, 255 is the void border (the ignore
  region, never an object); an instance's class is the majority ``SegmentationClass`` value
  (1..254) under it;
- ``--masks``: ``auto`` reads a mask holding only {0, 255} or only {0, 1} as binary (one object:
  every non-zero pixel), anything else as an instance-id map (values ≥ 1 but 255 are instances,
  255 is void); ``binary`` / ``instance`` force the reading;
- COCO: polygons, uncompressed and compressed RLE decoded as pycocotools' ``COCO.annToMask``;
  ``iscrowd=1`` annotations form the ignore region.

A mask must have its image's size in the original frame (after the EXIF transposition). A mask
that instead has the *stored* size of an image whose EXIF orientation swaps width and height
(orientations 5–8) was drawn on the un-rotated pixels: it is transposed the same way as the image.
For orientations 2–4 (and square images) the two frames have the same size and the mask is taken
as already upright, as cache_layout.md says. Objects with no pixel are dropped.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from shared.hashing import file_sha256
from shared.transforms import mask_to_target
from stage1_embed.images import LoadedImage, orient_array
from stage1_embed.sources import CocoRef, ImageSource

VOID = 255
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
"""VOC class names; ``SegmentationClass`` value k (1..20) is ``VOC_CLASSES[k - 1]``."""


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (768 ints, RGB per index; 255 is (224, 224, 192))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE: tuple[int, ...] = tuple(voc_palette())


class AnnotationError(ValueError):
    """A mask or COCO entry cannot be used for its image; the message says why (one line)."""


@dataclass(frozen=True)
class Annotations:
    """The annotation columns of one manifest row (see cache_layout.md ``objects``).

    objects: dicts with instance_id, category_id, category, bbox (XYWH, original frame), area
    (pixels, original frame), rle and target_rle (pycocotools compressed counts as ASCII; the
    target RLE is 256×256). ignore_rle / ignore_target_rle: the void region, None when empty.
    """

    has_masks: bool
    objects: list[dict[str, Any]]
    ignore_rle: str | None = None
    ignore_target_rle: str | None = None
    notes: tuple[str, ...] = ()  # annotations skipped, with the reason (the row's ``error``)


NO_ANNOTATIONS = Annotations(has_masks=False, objects=[])


def annotation_fingerprint(source: ImageSource) -> str:
    """sha256 of what defines the image's objects: mask file bytes or COCO entries, and the kind.

    Stored per manifest row (``annotation_sha256``) so that a rerun re-does an image whose masks
    were edited even though its pixels did not change. "" when the image has no annotation.
    """
    if not source.has_masks:
        return ""
    digest = hashlib.sha256(f"{source.source}:{source.mask_kind}".encode())
    for path in (source.mask_path, source.class_mask_path):
        if path is not None:
            try:
                digest.update(file_sha256(path).encode())
            except OSError:
                digest.update(b"unreadable")
    if source.coco is not None:
        digest.update(json.dumps(source.coco.annotations, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load_annotations(
    source: ImageSource, loaded: LoadedImage, input_size: tuple[int, int]
) -> Annotations:
    """The objects and void region of ``source`` for the decoded image ``loaded``.

    input_size: (H, W) of the image inside the 1024 frame (``preprocess_shape``).
    Raises AnnotationError for unreadable masks or masks of another size than the image.
    """
    notes: list[str] = []
    if source.coco is not None:
        instances, ignore = _coco_instances(source.coco, loaded, notes)
    elif source.mask_path is None:
        return NO_ANNOTATIONS
    elif source.mask_kind == "voc":
        instances, ignore = _voc_instances(source, loaded)
    else:
        mask = _fit(_read_mask(source.mask_path, loaded), source.mask_path.name, loaded)
        instances, ignore = _mask_instances(mask, source.mask_kind)
    built = _build(instances, ignore, input_size)
    return replace(built, notes=tuple(notes)) if notes else built


# An instance before encoding: (instance_id, category_id, category, bool mask in original frame).
_Instance = tuple[int, int, str, np.ndarray]


def _voc_instances(source: ImageSource, loaded: LoadedImage) -> tuple[list[_Instance], np.ndarray]:
    assert source.mask_path is not None
    objects = _fit(_read_mask(source.mask_path, loaded, voc=True), source.mask_path.name, loaded)
    classes = None
    if source.class_mask_path is not None:
        path = source.class_mask_path
        classes = _fit(_read_mask(path, loaded, voc=True), f"SegmentationClass/{path.name}", loaded)
    instances = []
    for value in np.unique(objects):
        if value == 0 or value == VOID:
            continue
        inside = objects == value
        category_id = 0 if classes is None else _majority_class(classes[inside])
        name = VOC_CLASSES[category_id - 1] if 1 <= category_id <= len(VOC_CLASSES) else ""
        instances.append((int(value), category_id, name, inside))
    return instances, objects == VOID


def _majority_class(values: np.ndarray) -> int:
    """Most frequent value in 1..254 (ties → the smaller value); 0 when there is none."""
    counts = np.bincount(values.astype(np.int64).ravel(), minlength=256)[:256]
    counts[0] = counts[VOID] = 0
    return int(counts.argmax()) if counts.any() else 0


def _mask_instances(mask: np.ndarray, kind: str) -> tuple[list[_Instance], np.ndarray | None]:
    values = np.unique(mask)
    if kind == "auto":
        present = set(values.tolist())
        kind = "binary" if present <= {0, 255} or present <= {0, 1} else "instance"
    if kind == "binary":
        inside = mask != 0
        return ([(1, 0, "", inside)] if inside.any() else []), None
    instances = [(int(v), 0, "", mask == v) for v in values if v != 0 and v != VOID]
    return instances, mask == VOID


def _coco_instances(
    ref: CocoRef, loaded: LoadedImage, notes: list[str]
) -> tuple[list[_Instance], np.ndarray]:
    """Instances and ignore region of a COCO entry; an annotation that fails validation is
    skipped and its reason added to ``notes``."""
    height, width = ref.height, ref.width
    orientation = _frame_of(
        (height, width), loaded, f"COCO entry {ref.file_name} is {width}×{height} px"
    )
    names = dict(ref.categories)
    instances: list[_Instance] = []
    ignore = np.zeros(loaded.original_size, bool)
    for ann in ref.annotations:
        problem = coco_segmentation_problem(ann.get("segmentation"), height, width)
        if problem is not None:
            notes.append(f"skipped COCO annotation {ann.get('id')!r}: {problem}")
            continue
        rle = _coco_rle(ann, height, width, ref.file_name)
        if rle is None:
            continue
        mask = orient_array(mask_utils.decode(rle), orientation).astype(bool)
        if ann.get("iscrowd", 0):
            ignore |= mask
        else:
            category_id = int(ann.get("category_id", 0))
            instances.append((int(ann["id"]), category_id, names.get(category_id, ""), mask))
    return instances, ignore


MAX_POLYGON_VALUES = 1_000_000  # coordinates in one annotation's polygons


def coco_segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` must not reach pycocotools (None: safe). Huge polygon coordinates crash it
    (SIGSEGV), NaN ones make it grow memory without bound; so every value is checked first:
    finite numbers within one image size beyond each edge; RLE counts non-negative integers
    adding up to height × width."""
    if not segm:
        return None
    if isinstance(segm, list):
        margin = max(height, width)
        total = 0
        for polygon in segm:
            if not isinstance(polygon, list):
                return "a polygon is not a list of numbers"
            total += len(polygon)
            if total > MAX_POLYGON_VALUES:
                return f"its polygons have over {MAX_POLYGON_VALUES} coordinates"
            values = np.asarray(
                [v if isinstance(v, int | float) and not isinstance(v, bool) else np.nan
                 for v in polygon], dtype=np.float64,
            )  # fmt: skip
            if not np.isfinite(values).all():
                return "a polygon coordinate is not a finite number"
            xs, ys = values[0::2], values[1::2]
            if len(values) % 2 or (xs < -margin).any() or (xs > width + margin).any() or (
                ys < -margin).any() or (ys > height + margin).any():  # fmt: skip
                return (
                    f"a polygon has an odd number of values or a coordinate far outside the "
                    f"{width}×{height} px image"
                )
        return None
    if not isinstance(segm, dict) or "counts" not in segm:
        return "segmentation is neither polygons nor an RLE"
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return "its RLE counts are not non-negative integers"
        if sum(counts) != height * width:
            return f"its RLE counts add up to {sum(counts)}, not {height}×{width}"
    elif not isinstance(counts, str | bytes):
        return "its RLE counts are neither a list nor a string"
    return None


def _coco_rle(ann: dict[str, Any], height: int, width: int, file_name: str) -> dict | None:
    """The annotation's RLE at (height, width), as ``COCO.annToRLE``; None without a shape."""
    segm = ann.get("segmentation")
    if not segm:
        return None
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]  # pycocotools needs ≥ 3 points
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    size = [int(s) for s in segm.get("size", (height, width))]
    if size != [height, width]:
        raise AnnotationError(
            f"COCO annotation {ann.get('id')} of {file_name} has an RLE of size {size[1]}×"
            f"{size[0]} px, its image entry says {width}×{height} px"
        )
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    counts = segm["counts"]
    return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _build(
    instances: list[_Instance], ignore: np.ndarray | None, input_size: tuple[int, int]
) -> Annotations:
    objects = []
    for instance_id, category_id, category, mask in instances:
        rle = _encode(mask)
        area = int(mask_utils.area(rle))
        if area == 0:
            continue
        objects.append(
            {
                "instance_id": instance_id,
                "category_id": category_id,
                "category": category,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": area,
                "rle": rle["counts"].decode("ascii"),
                "target_rle": _encode(mask_to_target(mask, input_size))["counts"].decode("ascii"),
            }
        )
    if ignore is None or not ignore.any():
        return Annotations(has_masks=True, objects=objects)
    return Annotations(
        has_masks=True,
        objects=objects,
        ignore_rle=_encode(ignore)["counts"].decode("ascii"),
        ignore_target_rle=_encode(mask_to_target(ignore, input_size))["counts"].decode("ascii"),
    )


def _encode(mask: np.ndarray) -> dict[str, Any]:
    return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))


def _read_mask(path: Path, loaded: LoadedImage, *, voc: bool = False) -> np.ndarray:
    """A 2-D integer array of mask values (palette indices for P images).

    The size is read from the header and checked against the image's before any pixel is
    decoded (a 30000×30000 PNG of 1 MiB would take GiBs): a mask is never larger than its
    image, which passed the pixel limit.
    """
    try:
        with warnings.catch_warnings():  # the size check below gives the message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            what = f"mask {path.name} is {im.width}×{im.height} px"
            _frame_of((im.height, im.width), loaded, what)
            im.load()
            return _mask_values(im, path.name, voc)
    except AnnotationError:
        raise
    except FileNotFoundError:
        raise AnnotationError(f"mask {path.name} does not exist any more") from None
    except Image.DecompressionBombError as exc:
        raise AnnotationError(f"mask {path.name} is over the pixel limit: {exc}") from None
    except Exception as exc:
        raise AnnotationError(f"mask {path.name} cannot be read: {exc}") from None


def _mask_values(im: Image.Image, name: str, voc: bool) -> np.ndarray:
    if im.mode in ("P", "L", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.asarray(im)
    if im.mode in ("1", "LA", "PA"):
        return np.asarray(im.getchannel(0)).astype(np.uint8)
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)
        if voc:
            return _palette_indices(rgb, name)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.uint8)
    raise AnnotationError(
        f"mask {name} is a {im.mode} image; save masks as single-channel PNGs (mode L or P) "
        "holding 0 for background and object ids"
    )


def _palette_indices(rgb: np.ndarray, name: str) -> np.ndarray:
    """VOC masks saved as RGB colours → palette indices (every VOC palette colour is unique)."""
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal = np.asarray(VOC_PALETTE, np.int32).reshape(256, 3)
    lut = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(lut)
    pos = np.clip(np.searchsorted(lut[order], codes), 0, 255)
    if not (lut[order][pos] == codes).all():
        raise AnnotationError(f"mask {name} holds colours outside the VOC palette")
    return order[pos].astype(np.uint8)


def _fit(mask: np.ndarray, name: str, loaded: LoadedImage) -> np.ndarray:
    """``mask`` in the original frame, or AnnotationError when its size fits no frame."""
    orientation = _frame_of(
        mask.shape[:2], loaded, f"mask {name} is {mask.shape[1]}×{mask.shape[0]} px"
    )
    return orient_array(mask, orientation)


def _frame_of(size: tuple[int, int], loaded: LoadedImage, what: str) -> int:
    """1 when ``size`` (H, W) is the original frame; the EXIF orientation when it is the raw one."""
    if tuple(size) == tuple(loaded.original_size):
        return 1
    if loaded.exif_transposed and tuple(size) == tuple(loaded.raw_size):
        return loaded.exif_orientation
    height, width = loaded.original_size
    raise AnnotationError(
        f"{what}, image is {width}×{height} px; a mask must have its image's size"
    )

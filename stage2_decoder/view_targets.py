"""Training targets of an object in a stored *view* of its image (`decoder train --views`).

Pure functions (no I/O). The object's original-frame mask (its manifest ``rle``) is transformed
with the view (``shared.views.apply_view``), then the target is built exactly as for an ordinary
image whose ``original_size`` is the view's: ``mask_to_target`` with the view's ``input_size``.
The void region (``ignore_rle``) goes the same way; the box is the manifest ``bbox`` mapped into
the view (it equals the box of the transformed mask). Frames: targets and valid masks in the 256
target frame of the view, ``boxes_1024`` XYXY in the view's 1024 frame.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from shared.cache_format import TARGET_SIZE
from shared.transforms import boxes_to_1024, mask_to_target, target_valid_size
from shared.views import apply_view, boxes_orig_to_view, view_input_size, view_original_size


def decode_rle(counts: str | None, height: int, width: int) -> np.ndarray:
    """A COCO compressed RLE string as a bool (height, width) mask (None: all False); the one
    decoder of manifest RLEs in stage 2 (``dataset`` uses it too)."""
    if not counts:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()}).astype(bool)


def original_size_of(record: dict) -> tuple[int, int]:
    return int(record["original_height"]), int(record["original_width"])


def view_sizes(record: dict, view: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(``original_size``, ``input_size``) of the view of the record's image, (H, W) each."""
    original_size = original_size_of(record)
    return view_original_size(view, original_size), view_input_size(view, original_size)


def view_mask(counts: str | None, record: dict, view: str) -> np.ndarray:
    """A manifest RLE (original frame) as a bool mask in the view's original frame."""
    height, width = original_size_of(record)
    return apply_view(view, decode_rle(counts, height, width))


def view_target(obj: dict, record: dict, view: str) -> np.ndarray:
    """Bool 256×256 target of ``obj`` in the view's target frame."""
    _, input_size = view_sizes(record, view)
    return mask_to_target(view_mask(obj["rle"], record, view), input_size)


def view_box_1024(obj: dict, record: dict, view: str) -> np.ndarray:
    """XYXY box of ``obj`` in the view's 1024 frame, from its manifest ``bbox`` (XYWH)."""
    x, y, w, h = obj["bbox"]
    box_orig = np.array([x, y, x + w, y + h], dtype=np.float64)
    box_view = boxes_orig_to_view(view, box_orig, original_size_of(record))
    return boxes_to_1024(box_view, view_original_size(view, original_size_of(record)))


def view_valid_region(record: dict, view: str) -> np.ndarray:
    """Bool 256×256: inside the view's ``ceil(input/4)`` region and not void (in the view)."""
    _, input_size = view_sizes(record, view)
    valid = np.zeros((TARGET_SIZE, TARGET_SIZE), dtype=bool)
    height, width = target_valid_size(input_size)
    valid[:height, :width] = True
    if record.get("ignore_rle"):
        valid &= ~mask_to_target(view_mask(record["ignore_rle"], record, view), input_size)
    return valid

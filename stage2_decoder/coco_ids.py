"""Integer COCO image ids for results, and the COCO ground truth of a cache with the same ids.

pycocotools matches results to a ground truth by integer ``image_id``. The manifest's
``image_id`` is a string (a path without extension, ``"000032"``), so `decoder predict` and
`decoder amg` write the integer id of `coco_image_ids` and, beside their results,
``gt_coco.json`` from `ground_truth_coco` with the same ids, so that::

    gt = COCO("gt_coco.json"); dt = gt.loadRes("results_zero_shot.json")
    COCOeval(gt, dt, "segm").evaluate()

runs as is. The rule for ids, over all ``ok`` rows of the cache (so the ids do not depend on
which images a command was asked for):

1. every row has ``coco_image_id`` (the cache was made with ``--coco``): those ids;
2. else, every ``image_id`` is all digits and their integers differ: those integers
   (``"000032"`` → 32);
3. else: 1 + the index of the ``image_id`` in the sorted list of the cache's image ids.

``gt_coco.json``: ``images`` (id, file_name = the manifest image id, height, width),
``annotations`` (id from 1, image_id, category_id, segmentation = the manifest's COCO RLE in
the original frame, area, bbox XYWH, iscrowd 0; objects with no pixel are left out, as the
ground-truth prompts of `decoder predict` leave them out), ``categories`` (id, name; the
manifest's, ``"category_<id>"`` when the name is not known). `decoder amg` results are class
agnostic (category 0): evaluate them with ``params.useCats = 0``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GROUND_TRUTH = "gt_coco.json"


def coco_image_ids(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Manifest ``image_id`` → integer COCO image id, by the rule of the module docstring."""
    rows = {r["image_id"]: r.get("coco_image_id") for r in records}
    if rows and all(v is not None for v in rows.values()):
        return {image_id: int(v) for image_id, v in rows.items()}  # type: ignore[arg-type]
    if all(i.isascii() and i.isdigit() for i in rows):
        numbers = {image_id: int(image_id) for image_id in rows}
        if len(set(numbers.values())) == len(numbers):
            return numbers
    return {image_id: k + 1 for k, image_id in enumerate(sorted(rows))}


def ground_truth_coco(records: Iterable[dict[str, Any]], ids: dict[str, int]) -> dict[str, Any]:
    """A COCO instances dict (images, annotations, categories) of ``records`` with ``ids``."""
    images, annotations, categories = [], [], {}
    for record in records:
        height, width = record["original_height"], record["original_width"]
        image_id = ids[record["image_id"]]
        images.append(
            {"id": image_id, "file_name": record["image_id"], "height": height, "width": width}
        )
        for obj in record["objects"] or []:
            if obj["area"] <= 0:
                continue
            category = int(obj["category_id"])
            categories.setdefault(category, obj["category"] or f"category_{category}")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "segmentation": {"size": [height, width], "counts": obj["rle"]},
                "area": int(obj["area"]), "bbox": [float(v) for v in obj["bbox"]], "iscrowd": 0,
            })  # fmt: skip
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in sorted(categories.items())],
    }

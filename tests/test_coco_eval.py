"""COCO image ids: results of `decoder predict` / `decoder amg` evaluate with pycocotools as is.

A two-image cache is made by `embed run --coco` (ids 9 and 41 in the COCO file, file names that
are not numbers); the results and ``gt_coco.json`` written beside them go straight into
``COCOeval(COCO(gt), COCO.loadRes(results), "segm")``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from shared.cache_format import MANIFEST_DIR
from shared.cache_io import manifest_table, ok_rows, open_cache
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage2_decoder.cli import app
from stage2_decoder.coco_ids import coco_image_ids

runner = CliRunner()


@pytest.fixture(scope="module")
def coco_cache(tmp_path_factory, tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for coco_id, name, (h, w) in ((9, "street", (48, 64)), (41, "field", (60, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.jpg"
        )
        images.append({"id": coco_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        for k, (x, y, bw, bh) in enumerate(((4, 6, 20, 16), (24, 30, 12, 14))):
            polygon = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            anns.append({"id": 100 * coco_id + k, "image_id": coco_id, "category_id": 3 + k,
                         "iscrowd": 0, "segmentation": [polygon]})  # fmt: skip
    categories = [{"id": 3, "name": "car"}, {"id": 4, "name": "dog"}]
    instances = root / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": categories}))  # fmt: skip
    config = EmbedConfig(
        images=str(root / "images"), out=str(root / "cache.zarr"), coco=str(instances),
        model_type="vit_tiny_random", checkpoint=str(tiny_checkpoint), precision="fp32",
        dtype="float32", download=False,
    )  # fmt: skip
    assert run_embed(config).encoded == 2
    return root / "cache.zarr"


def evaluate(gt_path: Path, results: list[dict], use_cats: bool = True) -> float:
    """AP (IoU .50:.95) of ``results`` against ``gt_path``, exactly as a pycocotools user does."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_manifest_keeps_the_coco_ids(coco_cache) -> None:
    rows = ok_rows(open_cache(coco_cache).location, ["image_id", "coco_image_id"]).to_pylist()
    assert {r["image_id"]: r["coco_image_id"] for r in rows} == {"street": 9, "field": 41}


def test_predict_results_evaluate_with_pycocotools(coco_cache, tmp_path) -> None:
    out = tmp_path / "preds"
    result = runner.invoke(app, ["predict", "--cache", str(coco_cache), "--out", str(out)])
    assert result.exit_code == 0, result.output
    gt = json.loads((out / "gt_coco.json").read_text())
    assert sorted(i["id"] for i in gt["images"]) == [9, 41]
    assert [c["id"] for c in gt["categories"]] == [3, 4] and len(gt["annotations"]) == 4
    results = json.loads((out / "results_zero_shot.json").read_text())
    assert {r["image_id"] for r in results} == {9, 41} and len(results) == 4
    ap = evaluate(out / "gt_coco.json", results)  # runs as is; random weights: any AP
    assert 0.0 <= ap <= 1.0
    # the ground truth itself, as results, is a perfect detector: the files agree on everything
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]  # fmt: skip
    assert evaluate(out / "gt_coco.json", perfect) == pytest.approx(1.0)


def test_amg_results_evaluate_with_pycocotools(coco_cache, tmp_path) -> None:
    out = tmp_path / "amg"
    result = runner.invoke(app, ["amg", "--cache", str(coco_cache), "--out", str(out),
                                 "--points-per-side", "2", "--pred-iou-thresh", "0",
                                 "--stability-score-thresh", "0", "--no-overlays"])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "amg_zero_shot.json").read_text())
    assert {r["image_id"] for r in results} <= {9, 41} and results
    assert 0.0 <= evaluate(out / "gt_coco.json", results, use_cats=False) <= 1.0


def test_integer_ids_without_coco() -> None:
    def ids(*names: str, coco: tuple = ()) -> dict[str, int]:
        coco = coco or (None,) * len(names)
        rows = zip(names, coco, strict=True)
        return coco_image_ids({"image_id": n, "coco_image_id": c} for n, c in rows)

    assert ids("000032", "000033") == {"000032": 32, "000033": 33}
    assert ids("b", "a", "000032") == {"000032": 1, "a": 2, "b": 3}  # sorted index, from 1
    assert ids("1", "01") == {"01": 1, "1": 2}  # equal integers: sorted index
    assert ids("a", "b", coco=(7, 5)) == {"a": 7, "b": 5}
    assert ids("a", "7", coco=(7, None)) == {"7": 1, "a": 2}  # not every row from --coco


def test_rows_written_before_the_column_read_as_null(coco_cache, tmp_path) -> None:
    """A fragment without ``coco_image_id`` (an older samcache) still reads: the id is null."""
    cache = open_cache(coco_cache)
    row = {**ok_rows(cache.location).to_pylist()[0], "image_id": "older"}
    old = manifest_table([row]).drop_columns(["coco_image_id"])
    name = f"part-{1:020d}-{'0' * 12}.parquet"  # a name the format gives (else: stray)
    fragment = Path(cache.location.join(MANIFEST_DIR, name))
    pq.write_table(old, fragment)
    try:
        rows = {r["image_id"]: r["coco_image_id"] for r in ok_rows(cache.location).to_pylist()}
        assert rows == {"street": 9, "field": 41, "older": None}
    finally:
        fragment.unlink()

"""`decoder predict` on the real VOC sample: masks equal Meta's SamPredictor.predict; bad input.

The cache is made by stage 1 in-process (tiny random encoder, fp32, float32 storage); Meta's
predictor runs its own encoder on the same JPEGs. Random weights: the masks are meaningless but
must be the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from shared.cache_io import commit_fragment, manifest_table, ok_rows, open_cache
from shared.sam_models import build_sam
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage2_decoder.cli import app
from stage2_decoder.prompt_files import safe_relative
from tests.cache_factory import make_cache
from tests.decoder_runs import make_run
from tests.meta_reference import meta_predictor_class

runner = CliRunner()
IMAGES = ("000032",)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def build_voc_cache(out: Path, voc_sample_dir: Path, checkpoint: Path) -> Path:
    """Stage 1 in-process on the VOC sample: tiny random encoder, fp32, float32 storage."""
    config = EmbedConfig(
        images=str(voc_sample_dir / "JPEGImages"), out=str(out), model_type="vit_tiny_random",
        checkpoint=str(checkpoint), precision="fp32", dtype="float32", download=False,
    )  # fmt: skip
    summary = run_embed(config)
    assert summary.encoded == 5 and not summary.failed
    return out


@pytest.fixture(scope="module")
def voc_cache(tmp_path_factory, voc_sample_dir, tiny_checkpoint) -> Path:
    return build_voc_cache(tmp_path_factory.mktemp("voc") / "cache.zarr", voc_sample_dir,
                           tiny_checkpoint)  # fmt: skip


@pytest.fixture(scope="module")
def records(voc_cache) -> dict[str, dict]:
    return {r["image_id"]: r for r in ok_rows(open_cache(voc_cache).location).to_pylist()}


@pytest.fixture(scope="module")
def meta_predictor(tiny_checkpoint):
    return meta_predictor_class()(build_sam("vit_tiny_random", tiny_checkpoint))


def set_image(predictor, record: dict) -> None:
    predictor.set_image(np.array(Image.open(record["path"]).convert("RGB")))


def predict(*args: str):
    return runner.invoke(app, ["predict", *args])


def read_mask(path: Path) -> np.ndarray:
    return np.array(Image.open(path)) > 0


def test_ground_truth_boxes_equal_meta_predictor(voc_cache, records, meta_predictor, tmp_path):
    out = tmp_path / "preds"
    result = predict("--cache", str(voc_cache), "--images", ",".join(IMAGES), "--out", str(out))
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "results_zero_shot.json").read_text())
    assert len(entries) == sum(records[i]["n_objects"] for i in IMAGES)
    for image_id in IMAGES:
        record = records[image_id]
        set_image(meta_predictor, record)
        for k, obj in enumerate(record["objects"]):
            x, y, w, h = obj["bbox"]
            masks, _, _ = meta_predictor.predict(
                box=np.array([x, y, x + w, y + h]), multimask_output=False
            )
            ours = read_mask(out / "masks" / "zero_shot" / image_id / f"{k:03d}.png")
            assert ours.shape == masks[0].shape
            assert iou(ours, masks[0]) >= 0.99, (image_id, k)
            entry = next(e for e in entries
                         if e["image_id"] == int(image_id) and e["prompt_index"] == k)  # fmt: skip
            rle = {"size": entry["segmentation"]["size"],
                   "counts": entry["segmentation"]["counts"].encode()}  # fmt: skip
            assert np.array_equal(mask_utils.decode(rle).astype(bool), ours)
            assert entry["category_id"] == obj["category_id"]
    overlay = Image.open(out / "overlays" / "000032.png")
    assert overlay.size[0] == records["000032"]["original_width"]


def test_prompts_file_equals_meta_predictor(voc_cache, records, meta_predictor, tmp_path):
    record = records["000033"]
    x, y, w, h = record["objects"][0]["bbox"]
    cx, cy = x + w / 2, y + h / 2
    prompts = [
        {"points": [[cx, cy]], "labels": [1]},  # ambiguous: multimask, best score kept
        {"points": [[cx, cy], [x + 2, y + 2]], "labels": [1, 0]},
        {"box": [x, y, x + w, y + h]},
        {"points": [[cx, cy]], "labels": [1], "box": [x, y, x + w, y + h]},
    ]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"000033": prompts}))
    out = tmp_path / "preds"
    result = predict("--cache", str(voc_cache), "--prompts", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    set_image(meta_predictor, record)
    for k, prompt in enumerate(prompts):
        points = np.array(prompt["points"]) if "points" in prompt else None
        labels = np.array(prompt["labels"]) if "labels" in prompt else None
        box = np.array(prompt["box"]) if "box" in prompt else None
        multimask = box is None and len(points) == 1
        masks, scores, _ = meta_predictor.predict(points, labels, box, multimask_output=multimask)
        expected = masks[int(np.argmax(scores))]
        ours = read_mask(out / "masks" / "zero_shot" / "000033" / f"{k:03d}.png")
        assert iou(ours, expected) >= 0.99, k
        assert iou(ours, masks[0]) < 1.0 or len(masks) == 1 or multimask  # a real choice


def test_detections_file_and_compare(voc_cache, records, tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    make_run(run, voc_cache, tiny_checkpoint)
    detections = [
        {"image_id": 32, "category_id": 3, "bbox": [10, 20, 100, 80], "score": 0.9},
        {"image_id": "000033", "category_id": 5, "bbox": [50, 60, 120, 90], "score": 0.2},
        {"image_id": "000033", "category_id": 7, "bbox": [0, 0, 200, 150], "score": 0.8},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(detections))
    out = tmp_path / "preds"
    result = predict("--cache", str(voc_cache), "--run", str(run), "--boxes", str(path),
                     "--score-threshold", "0.5", "--compare", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("zero_shot", "fine_tuned"):
        entries = json.loads((out / f"results_{name}.json").read_text())
        assert [(e["image_id"], e["category_id"], e["score"]) for e in entries] == [
            (32, 3, 0.9), ("000033", 7, 0.8)]  # fmt: skip
    zero = read_mask(out / "masks" / "zero_shot" / "000033" / "000.png")
    tuned = read_mask(out / "masks" / "fine_tuned" / "000033" / "000.png")
    assert iou(zero, tuned) < 0.99  # the perturbed decoder really is another model
    width = records["000033"]["original_width"]
    assert Image.open(out / "overlays" / "000033.png").size[0] == 2 * width + 8  # side by side


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def test_unknown_image_ids(voc_cache, tmp_path):
    result = predict("--cache", str(voc_cache), "--images", "000032,nope",
                     "--out", str(tmp_path / "p"))  # fmt: skip
    one_line_error(result, "'nope'", "000032", "5 images")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('{"000032": [{"points": [[1, 2]]', ["not valid JSON", "line 1"]),
        ('{"000032": [{"points": [[1, 2, 3]], "labels": [1]}]}', ["000032", "prompt 0", "(x, y)"]),
        ('{"000032": [{"points": [[1, 2]], "labels": [2]}]}', ["labels must be 1"]),
        ('{"000032": [{"box": [5, 5, 1, 1]}]}', ["x1 < x0"]),
        ('{"000032": [{"pts": []}]}', ["unknown key", "pts"]),
        ('{"999": [{"box": [0, 0, 5, 5]}]}', ["unknown image id", "'999'"]),
        ("[1, 2]", ["expected an object"]),
    ],
)
def test_malformed_prompts(voc_cache, tmp_path, text, needles):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    result = predict("--cache", str(voc_cache), "--prompts", str(path), "--out", str(tmp_path))
    one_line_error(result, *needles)


def test_malformed_detections(voc_cache, tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([{"image_id": 32, "bbox": [1, 2, 3]}]))
    result = predict("--cache", str(voc_cache), "--boxes", str(path), "--out", str(tmp_path))
    one_line_error(result, "detection 0", "(x, y, w, h)")


def test_output_names_never_escape_out(tmp_path, tiny_checkpoint):
    cache = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=1, objects_per_image=1)
    row = ok_rows(open_cache(cache).location).to_pylist()[0]
    row.pop("committed_ns")
    commit_fragment(open_cache(cache).location, manifest_table([{**row, "image_id": "../evil"}]))
    out = tmp_path / "deep" / "out"
    result = predict("--cache", str(cache), "--out", str(out))
    one_line_error(result, "'../evil'", "cannot name an output file")
    assert not (tmp_path / "deep").exists()
    for bad in ("/abs", "a/../b", "a//b", "", "a\\b"):
        with pytest.raises(ValueError):
            safe_relative(bad)
    assert str(safe_relative("sub/a")) == "sub/a"


def test_cache_without_masks_needs_prompts(tmp_path, tiny_checkpoint):
    cache = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=2, with_masks=False)
    result = predict("--cache", str(cache), "--out", str(tmp_path / "p"))
    one_line_error(result, "no ground truth", "--boxes or --prompts")
    result = predict("--cache", str(cache), "--out", str(tmp_path / "p"), "--compare")
    one_line_error(result, "--compare", "--run")
